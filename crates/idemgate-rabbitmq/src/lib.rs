//! RabbitMQ for idemgate consumers and producers, on [lapin].
//!
//! - [`RabbitMq::declare`] declares a durable queue whose dead-letter exchange routes to a
//!   `<queue>.dead` queue.
//! - [`RabbitSource`]: manual acks, a prefetch limit; the `redelivered` flag is passed on as a
//!   hint only (the store decides). `nack` with a delay moves the message to a retry queue
//!   (`<queue>.retry.<ms>`, a quorum queue whose message TTL dead-letters it back to `<queue>`,
//!   at least once), so a waiting retry holds no prefetch slot; the deliveries so far travel
//!   in the `idemgate-deliveries` header. `dead_letter`
//!   publishes the message with its reason (header `idemgate-dead-letter-reason`) through the
//!   queue's dead-letter exchange, confirmed, and then acks it. Every publish is `mandatory`:
//!   a message no queue takes (a dead-letter queue that was deleted, a wrong destination) is an
//!   error, and a dead letter that went nowhere sends the original back to its queue.
//! - [`RabbitSink`]: persistent messages with publisher confirms; the event id travels as the
//!   AMQP `message-id` and the `idemgate-event-id` header.
//!
//! A delivery dropped unsettled (the consumer died) stays unacked on its channel; RabbitMQ
//! requeues it when the channel or connection closes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use idemgate_consumer::{
    DEAD_LETTER_REASON, DEAD_LETTER_RETRY, Delivery, EVENT_ID, Error, Message, ORDERING_KEY,
    Outgoing, Result, Sink, Source,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

mod connection;
mod sink;
mod source;

use self::connection::*;
pub use self::connection::{RabbitMq, dead_queue};
pub use self::sink::RabbitSink;
pub use self::source::{RabbitDelivery, RabbitSource};

const BROKER: &str = "rabbitmq";

fn err(what: &str) -> impl FnOnce(lapin::Error) -> Error + '_ {
    move |e| Error::broker(BROKER, what, e)
}

/// An ack or nack's answer: lapin says `false` when its channel broke before the frame went out
/// (the broker then redelivers).
fn sent(r: lapin::Result<bool>, what: &str) -> Result<()> {
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::broker(
            BROKER,
            what,
            "the channel closed before the frame was sent",
        )),
        Err(e) => Err(err(what)(e)),
    }
}

//! NATS JetStream for idemgate consumers and producers, on [async-nats](async_nats).
//!
//! - [`NatsSink`] publishes with `Nats-Msg-Id` set to the event id, so JetStream drops a
//!   re-publish within the stream's duplicate window, and waits for the stream's ack.
//! - [`NatsSource`] pulls from a durable consumer with explicit acks. `ack` is a double ack
//!   (the server confirms it, so an ack lost on the way cannot cause a silent redelivery), `nack`
//!   is a `NAK` with the delay, a long handler sends `+WPI` (in progress) in step with its lease
//!   renewal, and `dead_letter` publishes the message with its reason to a dead-letter subject
//!   and then terminates it (`+TERM`). A dead letter that could not be stored (no subject, or
//!   no stream behind it) is an error, and the original comes back after a second.
//! - [`NatsSource::horizon`] is the redelivery horizon for the window check: `AckWait ×
//!   MaxDeliver`, or the stream's duplicate window if longer.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use idemgate_consumer::{
    DEAD_LETTER_REASON, DEAD_LETTER_RETRY, Delivery, EVENT_ID, Error, Horizon, Message,
    ORDERING_KEY, Outgoing, Result, Sink, Source,
};

mod connection;
mod sink;
mod source;

pub use self::connection::{ConsumerOptions, Nats};
pub use self::sink::NatsSink;
use self::sink::*;
pub use self::source::{NatsDelivery, NatsSource};

const BROKER: &str = "nats";

fn err<E: Into<idemgate_consumer::BoxError>>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::broker(BROKER, what, e)
}

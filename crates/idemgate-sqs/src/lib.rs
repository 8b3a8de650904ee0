//! Amazon SQS for idemgate consumers and producers, on [`aws_sdk_sqs`].
//!
//! - [`SqsSink`] sends with the event id as the `idemgate-event-id` message attribute. On a FIFO
//!   queue (`….fifo`) the event id is also the `MessageDeduplicationId` (SQS drops a re-send
//!   within its 5-minute window) and the ordering key the `MessageGroupId`.
//! - [`SqsSource`] long-polls in batches of up to ten. `ack` deletes the message; `nack(delay)`
//!   sets its visibility timeout to the delay, so SQS redelivers it then; `in_progress`, called
//!   in step with the lease while a handler runs, extends the visibility timeout so the message
//!   is not handed to another consumer meanwhile; `dead_letter` sends it with its reason to the
//!   dead-letter queue (the queue's redrive target, or one given) and then deletes it.
//!   `ApproximateReceiveCount` is the delivery count and a FIFO message's group its ordering key.
//! - [`SqsSource::horizon`]: visibility timeout × `maxReceiveCount` of the redrive policy (or
//!   the retention period when there is none).
//! - The redrive policy's `maxReceiveCount` is the source's
//!   [`delivery_limit`](Source::delivery_limit): a message that fails on its last receive is
//!   dead-lettered by the consumer, with its reason, before SQS's redrive moves it without one.
//!   [`Sqs::create_queue`] sets 10 by default, above the consumer's 5 attempts, so a consumer's
//!   death on a message's last attempt still leaves it receives to spare.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use bytes::Bytes;
use idemgate_consumer::{
    DEAD_LETTER_REASON, Delivery, EVENT_ID, Error, Horizon, Message, Outgoing, Result, Sink, Source,
};

mod connection;
mod sink;
mod source;

use self::connection::*;
pub use self::connection::{QueueOptions, Sqs};
pub use self::sink::SqsSink;
use self::sink::*;
pub use self::source::{SqsDelivery, SqsSource};

const BROKER: &str = "sqs";

/// An SDK error with its whole chain in the message (an SDK error's own `Display` is only
/// "service error").
fn err<E: std::error::Error>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| {
        let chain = aws_sdk_sqs::error::DisplayErrorContext(e).to_string();
        Error::broker(BROKER, what, chain)
    }
}

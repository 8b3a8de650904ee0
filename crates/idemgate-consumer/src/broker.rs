//! What a broker adapter implements.

use std::future::Future;
use std::time::Duration;

use crate::{Horizon, Message, Outgoing, Result};

/// One delivery of a message, to be settled exactly once: acked, nacked or dead-lettered.
///
/// Dropping a delivery without settling it must leave the message to be redelivered (the broker's
/// visibility timeout, the connection's unacked messages, the consumer's ack wait).
pub trait Delivery: Send + Sync + 'static {
    /// The message.
    fn message(&self) -> &Message;

    /// Done: the broker forgets the message.
    fn ack(self) -> impl Future<Output = Result<()>> + Send;

    /// Not done: the broker redelivers it, after `delay` where it supports one.
    fn nack(self, delay: Duration) -> impl Future<Output = Result<()>> + Send;

    /// Never to be retried: moved to the broker's dead-letter destination with `reason`.
    ///
    /// `Ok` once the broker stored the dead letter, even if settling the original then failed
    /// ([`dead_lettered`]): the consumer records the key, and the original, when it comes back,
    /// is acked as a duplicate. `Err` only when the dead letter is not stored (the original is
    /// then kept, to come back).
    fn dead_letter(self, reason: &str) -> impl Future<Output = Result<()>> + Send;

    /// Still working: extends the broker's redelivery timer (NATS `+WPI`, SQS visibility).
    /// Called in step with lease renewal while a handler runs. The default does nothing.
    fn in_progress(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// The stored position the message carries ([`Message::position`]) was stale: another
    /// consumer, or a commit whose answer was lost, moved it. Reload the stored positions and
    /// resume the partition from there. The default nacks at once.
    fn reposition(self) -> impl Future<Output = Result<()>> + Send
    where
        Self: Sized,
    {
        self.nack(Duration::ZERO)
    }
}

/// Settles the original of a stored dead letter with `settle` (its ack, or a terminate): `Ok`
/// whatever the broker answers, since the dead letter is stored. Reporting a failed ack as a
/// failed dead letter would roll back the key's record, and the original, back from the broker,
/// would be dead-lettered a second time.
pub async fn dead_lettered(settle: impl Future<Output = Result<()>>) -> Result<()> {
    if let Err(e) = settle.await {
        tracing::warn!(
            error = %e,
            "the dead letter is stored; settling the original failed, so it comes back as a duplicate"
        );
    }
    Ok(())
}

/// A stream of deliveries from one queue, subject, topic or subscription.
pub trait Source: Send + 'static {
    /// The delivery type.
    type Delivery: Delivery;

    /// The next delivery; `None` when the source has ended (it was closed or drained).
    fn recv(&mut self) -> impl Future<Output = Result<Option<Self::Delivery>>> + Send;

    /// How long after a first delivery the broker may still redeliver a message, as read from
    /// the broker where it can be (SQS queue attributes, the NATS consumer's config): the
    /// consumer checks its retention against it at start-up. `None`: unknown.
    fn horizon(&self) -> Option<Horizon> {
        None
    }

    /// How long the broker waits for a delivery's settlement before it redelivers (the NATS
    /// consumer's `AckWait`, the SQS visibility timeout): the consumer tells the broker a held
    /// delivery is in progress three times within it. `None`: no such timer.
    fn ack_wait(&self) -> Option<Duration> {
        None
    }

    /// The broker's own delivery budget: past this many deliveries it stops delivering a message
    /// (NATS `MaxDeliver`) or moves it to a dead-letter queue without the reason (an SQS redrive
    /// policy's `maxReceiveCount`). A message that fails on its last delivery is dead-lettered
    /// by the consumer then, whatever attempts it has left. `None`: no budget, or unknown.
    fn delivery_limit(&self) -> Option<u32> {
        None
    }
}

/// A producer: publishes a message with its event id stamped where the broker can see it.
pub trait Sink: Send + Sync + 'static {
    /// Publishes `msg` and waits until the broker has it (a confirm, an ack, a `PUBACK`).
    fn publish(&self, msg: &Outgoing) -> impl Future<Output = Result<()>> + Send;
}

/// A shared sink publishes through the one it shares.
impl<S: Sink> Sink for std::sync::Arc<S> {
    fn publish(&self, msg: &Outgoing) -> impl Future<Output = Result<()>> + Send {
        (**self).publish(msg)
    }
}

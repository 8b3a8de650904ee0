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
use lapin::acker::Acker;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const BROKER: &str = "rabbitmq";

fn err(what: &str) -> impl FnOnce(lapin::Error) -> Error + '_ {
    move |e| Error::broker(BROKER, what, e)
}

/// A connection to RabbitMQ.
#[derive(Debug)]
pub struct RabbitMq {
    conn: Connection,
}

impl RabbitMq {
    /// Connects to `amqp://user:pass@host:port/vhost`.
    pub async fn connect(url: &str) -> Result<Self> {
        let props = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio);
        let conn = Connection::connect(url, props)
            .await
            .map_err(err("connecting"))?;
        Ok(RabbitMq { conn })
    }

    /// Declares the durable queue `queue`, dead-lettering (through the default exchange) to the
    /// durable queue `<queue>.dead`, which it declares too.
    pub async fn declare(&self, queue: &str) -> Result<()> {
        self.declare_with(queue, FieldTable::default()).await
    }

    /// Declares `queue` as a quorum queue that dead-letters a message to `<queue>.dead` once it
    /// was delivered `delivery_limit` times (RabbitMQ 4 defaults to 20), and its dead-letter
    /// queue. The consumer sees the delivery count (`x-delivery-count`).
    pub async fn declare_quorum(&self, queue: &str, delivery_limit: u32) -> Result<()> {
        self.declare_with(queue, quorum_args(delivery_limit)).await
    }

    /// Declares `queue` as [`declare_quorum`](Self::declare_quorum) does, with a single active
    /// consumer: one consumer at a time receives, the others wait and take over, with the
    /// unacked messages of the one that went, when it goes. Competing consumers of one queue
    /// apply a key's next message while a dead consumer's earlier one waits to be requeued;
    /// this queue keeps each ordering key's order through consumer deaths too.
    pub async fn declare_ordered(&self, queue: &str, delivery_limit: u32) -> Result<()> {
        let mut args = quorum_args(delivery_limit);
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        self.declare_with(queue, args).await
    }

    async fn declare_with(&self, queue: &str, mut args: FieldTable) -> Result<()> {
        let ch = self.channel().await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(&dead_queue(queue), durable, FieldTable::default())
            .await
            .map_err(err("declaring the dead-letter queue"))?;
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(dead_queue(queue).into()),
        );
        ch.queue_declare(queue, durable, args)
            .await
            .map_err(err("declaring the queue"))?;
        let _ = ch.close(200, "declared").await;
        Ok(())
    }

    /// Deletes `queue` and its dead-letter queue.
    pub async fn delete(&self, queue: &str) -> Result<()> {
        let ch = self.channel().await?;
        for q in [queue.to_owned(), dead_queue(queue)] {
            ch.queue_delete(&q, lapin::options::QueueDeleteOptions::default())
                .await
                .map_err(err("deleting a queue"))?;
        }
        let _ = ch.close(200, "deleted").await;
        Ok(())
    }

    /// Empties `queue`; returns how many messages it held.
    pub async fn purge(&self, queue: &str) -> Result<u32> {
        let ch = self.channel().await?;
        let n = ch
            .queue_purge(queue, QueuePurgeOptions::default())
            .await
            .map_err(err("purging"))?;
        let _ = ch.close(200, "purged").await;
        Ok(n)
    }

    async fn channel(&self) -> Result<Channel> {
        self.conn
            .create_channel()
            .await
            .map_err(err("opening a channel"))
    }

    /// A consumer of `queue` on its own channel, with at most `prefetch` unacked deliveries.
    pub async fn source(&self, queue: &str, prefetch: u16) -> Result<RabbitSource> {
        let ch = self.channel().await?;
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(err("setting the prefetch"))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(err("enabling confirms"))?;
        let consumer = ch
            .basic_consume(
                queue,
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(err("consuming"))?;
        // retry queues are declared and fed on a channel of their own: a declare the broker
        // refuses closes its channel, and must not close the consumer's
        let retries = self.channel().await?;
        retries
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(err("enabling confirms"))?;
        Ok(RabbitSource {
            consumer,
            queue: queue.into(),
            channel: ch,
            retries,
        })
    }

    /// A producer on its own channel, with publisher confirms.
    pub async fn sink(&self) -> Result<RabbitSink> {
        let ch = self.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(err("enabling confirms"))?;
        Ok(RabbitSink { channel: ch })
    }

    /// Closes the connection: unacked deliveries go back to their queues. A connection that is
    /// closing or closed already (the broker went away) is closed: that is not an error.
    pub async fn close(&self) -> Result<()> {
        use lapin::{ChannelState, ConnectionState};
        match self.conn.close(200, "bye").await {
            Err(
                lapin::Error::InvalidChannelState(ChannelState::Closing | ChannelState::Closed)
                | lapin::Error::InvalidConnectionState(
                    ConnectionState::Closing | ConnectionState::Closed | ConnectionState::Error,
                ),
            ) => Ok(()),
            r => r.map_err(err("closing")),
        }
    }
}

/// The arguments of a quorum queue with a delivery limit.
fn quorum_args(delivery_limit: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(delivery_limit)),
    );
    args
}

/// The queue a queue's dead letters go to.
pub fn dead_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Carries a message's deliveries before it was moved to a retry queue.
const DELIVERIES: &str = "idemgate-deliveries";

/// A retry queue lives this long after its last use, past the TTL of anything in it.
const RETRY_QUEUE_IDLE: Duration = Duration::from_secs(60);

/// The delay a retry queue gives for `delay`: rounded up to a step of a quarter octave (at
/// most 25 % longer), so a consumer uses a few retry queues, not one per delay.
fn retry_step(delay: Duration) -> Duration {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
    if ms <= 4 {
        return Duration::from_millis(ms);
    }
    // ms = m · 2^shift with m in 4..8 after rounding up
    let shift = 63 - ms.leading_zeros() - 2;
    let m = ms.div_ceil(1 << shift);
    Duration::from_millis(m.saturating_mul(1 << shift))
}

/// The retry queue of `queue` for a delay of `step` (see [`retry_step`]).
fn retry_queue(queue: &str, step: Duration) -> String {
    format!("{queue}.retry.{}", step.as_millis())
}

fn long_string(v: &[u8]) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.to_vec()))
}

/// Publishes on `ch` to the default exchange (routing key = queue) and waits for the confirm.
///
/// The message is `mandatory`: one that no queue takes (the queue does not exist) comes back
/// with its confirm, and is an error. Without it the broker confirms and drops the message.
async fn publish(
    ch: &Channel,
    routing_key: &str,
    payload: &[u8],
    props: BasicProperties,
) -> Result<()> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = ch
        .basic_publish("", routing_key, options, payload, props)
        .await
        .map_err(err("publishing"))?
        .await
        .map_err(err("waiting for the publisher confirm"))?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(Error::Broker {
                broker: BROKER,
                message: format!(
                    "no queue took the message for {routing_key}: {} {}",
                    returned.reply_code, returned.reply_text
                ),
                source: None,
            })
        }
        Confirmation::Nack(None) => Err(Error::Broker {
            broker: BROKER,
            message: format!("the broker refused a message for {routing_key} (nack)"),
            source: None,
        }),
    }
}

/// A RabbitMQ producer: persistent messages, publisher confirms, the event id as `message-id`.
#[derive(Debug)]
pub struct RabbitSink {
    channel: Channel,
}

impl Sink for RabbitSink {
    async fn publish(&self, out: &Outgoing) -> Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(EVENT_ID.into(), long_string(out.event_id.as_bytes()));
        if let Some(k) = &out.ordering_key {
            headers.insert(ORDERING_KEY.into(), long_string(k.as_bytes()));
        }
        for (name, value) in &out.headers {
            headers.insert(name.as_str().into(), long_string(value));
        }
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(out.event_id.clone()))
            .with_delivery_mode(2)
            .with_headers(headers);
        publish(&self.channel, &out.destination, &out.payload, props).await
    }
}

/// A consumer of one queue.
#[derive(Debug)]
pub struct RabbitSource {
    consumer: lapin::Consumer,
    channel: Channel,
    retries: Channel,
    queue: Arc<str>,
}

impl Source for RabbitSource {
    type Delivery = RabbitDelivery;

    async fn recv(&mut self) -> Result<Option<RabbitDelivery>> {
        let Some(next) = self.consumer.next().await else {
            return Ok(None);
        };
        let d = next.map_err(err("receiving"))?;
        let headers: Vec<(String, Bytes)> = d
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .filter_map(|(k, v)| header_bytes(v).map(|b| (k.to_string(), b)))
                    .collect()
            })
            .unwrap_or_default();
        let mut msg = Message::new(d.routing_key.to_string(), Bytes::from(d.data));
        msg.event_id = d
            .properties
            .message_id()
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| {
                headers
                    .iter()
                    .find(|(k, _)| k == EVENT_ID)
                    .and_then(|(_, v)| std::str::from_utf8(v).ok().map(str::to_owned))
            })
            .filter(|id| !id.is_empty());
        // quorum queues count deliveries; classic queues only flag a redelivery; a message back
        // from a retry queue carries its deliveries before
        let count = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u32>().ok())
        };
        let here = count("x-delivery-count").map(|n| n + 1);
        msg.deliveries = match (count(DELIVERIES), here) {
            (Some(before), here) => Some(before.saturating_add(here.unwrap_or(1))),
            (None, here) => here,
        };
        msg.redelivered = d.redelivered;
        msg.ordering_key = headers
            .iter()
            .find(|(k, _)| k == ORDERING_KEY)
            .and_then(|(_, v)| std::str::from_utf8(v).ok().map(str::to_owned));
        msg.headers = headers;
        Ok(Some(RabbitDelivery {
            msg,
            acker: Some(d.acker),
            channel: self.channel.clone(),
            retries: self.retries.clone(),
            queue: Arc::clone(&self.queue),
        }))
    }
}

fn header_bytes(v: &AMQPValue) -> Option<Bytes> {
    match v {
        AMQPValue::LongString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        AMQPValue::ShortString(s) => Some(Bytes::copy_from_slice(s.as_str().as_bytes())),
        AMQPValue::LongLongInt(n) => Some(Bytes::from(n.to_string())),
        AMQPValue::LongInt(n) => Some(Bytes::from(n.to_string())),
        AMQPValue::LongUInt(n) => Some(Bytes::from(n.to_string())),
        AMQPValue::ShortInt(n) => Some(Bytes::from(n.to_string())),
        _ => None,
    }
}

/// A nack that hands the message back to its queue.
const REQUEUE: BasicNackOptions = BasicNackOptions {
    requeue: true,
    multiple: false,
};

/// One delivery from a [`RabbitSource`]. Dropped unsettled (a failed dead letter, a cancelled
/// handler), it is nacked back to its queue at once: it does not hold a prefetch slot until
/// the channel closes.
#[derive(Debug)]
pub struct RabbitDelivery {
    msg: Message,
    // taken by the settling call; still here when the delivery is dropped unsettled
    acker: Option<Acker>,
    channel: Channel,
    retries: Channel,
    queue: Arc<str>,
}

impl Drop for RabbitDelivery {
    fn drop(&mut self) {
        if let (Some(acker), Ok(rt)) = (self.acker.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = acker.nack(REQUEUE).await;
            });
        }
    }
}

impl Delivery for RabbitDelivery {
    fn message(&self) -> &Message {
        &self.msg
    }

    async fn ack(mut self) -> Result<()> {
        let Some(acker) = self.acker.take() else {
            return Ok(());
        };
        acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(err("acking"))
    }

    async fn nack(mut self, delay: Duration) -> Result<()> {
        if delay.is_zero() {
            let Some(acker) = self.acker.take() else {
                return Ok(());
            };
            return acker.nack(REQUEUE).await.map_err(err("nacking"));
        }
        // RabbitMQ requeues at once: the message waits out the delay in a retry queue, confirmed
        // there before the original is acked (a crash in between leaves a duplicate, which the
        // store answers)
        let step = retry_step(delay);
        let moved = async {
            let retry = retry_queue(&self.queue, step);
            self.declare_retry(&retry, step).await?;
            let mut props = self.copy_properties();
            if let Some(headers) = props.headers().clone() {
                let mut headers = headers;
                let n = self.msg.deliveries.unwrap_or(1);
                headers.insert(DELIVERIES.into(), long_string(n.to_string().as_bytes()));
                props = props.with_headers(headers);
            }
            publish(&self.retries, &retry, &self.msg.payload, props).await
        };
        match moved.await {
            Ok(()) => self.ack().await,
            Err(e) => {
                // no retry queue: hold the delivery for the delay, then requeue it
                tracing::warn!(error = %e, "no retry queue; holding the delivery for its delay");
                let Some(acker) = self.acker.take() else {
                    return Ok(());
                };
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(e) = acker.nack(REQUEUE).await {
                        tracing::debug!(error = %e, "delayed nack failed; the broker requeues on close");
                    }
                });
                Ok(())
            }
        }
    }

    async fn dead_letter(self, reason: &str) -> Result<()> {
        let mut props = self.copy_properties();
        if let Some(mut headers) = props.headers().clone() {
            headers.insert(DEAD_LETTER_REASON.into(), long_string(reason.as_bytes()));
            props = props.with_headers(headers);
        }
        // confirmed in the dead-letter queue before the original is acked; a dead letter no
        // queue takes sends the original back to its queue, after a pause rather than at once
        if let Err(e) = publish(
            &self.channel,
            &dead_queue(&self.queue),
            &self.msg.payload,
            props,
        )
        .await
        {
            let _ = self.nack(DEAD_LETTER_RETRY).await;
            return Err(e);
        }
        self.ack().await
    }
}

impl RabbitDelivery {
    /// Persistent properties with the message's headers and event id, for a copy of it.
    fn copy_properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (k, v) in &self.msg.headers {
            let broker_set = k == "x-delivery-count"
                || k.starts_with("x-first-death")
                || k.starts_with("x-last-death");
            if !broker_set && k != DELIVERIES {
                headers.insert(k.as_str().into(), long_string(v));
            }
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = &self.msg.event_id {
            props = props.with_message_id(ShortString::from(id.clone()));
        }
        props
    }

    /// Declares (again, which keeps it from expiring) the retry queue `retry`: a quorum queue
    /// whose messages expire after `step` and are dead-lettered back to this delivery's queue,
    /// at least once.
    async fn declare_retry(&self, retry: &str, step: Duration) -> Result<()> {
        let ms =
            |d: Duration| AMQPValue::LongLongInt(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut args = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(s.into());
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert("x-message-ttl".into(), ms(step));
        args.insert("x-expires".into(), ms(step + RETRY_QUEUE_IDLE));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert("x-dead-letter-routing-key".into(), text(&self.queue));
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        self.retries
            .queue_declare(retry, durable, args)
            .await
            .map(drop)
            .map_err(err("declaring a retry queue"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_steps_round_up_by_at_most_a_quarter() {
        for ms in 1..100_000u64 {
            let step = u64::try_from(retry_step(Duration::from_millis(ms)).as_millis()).unwrap();
            assert!(step >= ms && step * 4 <= ms * 5, "{ms} ms -> {step} ms");
        }
        let steps: std::collections::HashSet<_> = (1..=30_000u64)
            .map(|ms| retry_step(Duration::from_millis(ms)))
            .collect();
        assert!(steps.len() < 64, "{} retry queues", steps.len());
    }
}

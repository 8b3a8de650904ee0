//! The connection: queue declarations (quorum, ordered, dead letters, retry queues) and
//! confirmed publishes.

use super::*;

/// A connection to RabbitMQ.
#[derive(Debug)]
pub struct RabbitMq {
    pub(crate) conn: Connection,
    // the channels of sources and sinks, closed before the connection
    open: std::sync::Mutex<Vec<Channel>>,
}

impl RabbitMq {
    /// Connects to `amqp://user:pass@host:port/vhost`.
    pub async fn connect(url: &str) -> Result<Self> {
        // lapin's tokio feature: the connection runs on the caller's runtime
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(err("connecting"))?;
        Ok(RabbitMq {
            conn,
            open: std::sync::Mutex::default(),
        })
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

    pub(crate) async fn declare_with(&self, queue: &str, mut args: FieldTable) -> Result<()> {
        let ch = self.channel().await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(dead_queue(queue).into(), durable, FieldTable::default())
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
        ch.queue_declare(queue.into(), durable, args)
            .await
            .map_err(err("declaring the queue"))?;
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    /// Deletes `queue` and its dead-letter queue.
    pub async fn delete(&self, queue: &str) -> Result<()> {
        let ch = self.channel().await?;
        for q in [queue.to_owned(), dead_queue(queue)] {
            ch.queue_delete(q.into(), lapin::options::QueueDeleteOptions::default())
                .await
                .map_err(err("deleting a queue"))?;
        }
        let _ = ch.close(200, "deleted".into()).await;
        Ok(())
    }

    /// Empties `queue`; returns how many messages it held.
    pub async fn purge(&self, queue: &str) -> Result<u32> {
        let ch = self.channel().await?;
        let n = ch
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .map_err(err("purging"))?;
        let _ = ch.close(200, "purged".into()).await;
        Ok(n)
    }

    pub(crate) async fn channel(&self) -> Result<Channel> {
        self.conn
            .create_channel()
            .await
            .map_err(err("opening a channel"))
    }

    /// A channel that [`close`](Self::close) closes before the connection.
    async fn kept_channel(&self) -> Result<Channel> {
        let ch = self.channel().await?;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|c| c.status().connected());
        open.push(ch.clone());
        Ok(ch)
    }

    /// A consumer of `queue` on its own channel, with at most `prefetch` unacked deliveries.
    pub async fn source(&self, queue: &str, prefetch: u16) -> Result<RabbitSource> {
        let ch = self.kept_channel().await?;
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(err("setting the prefetch"))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(err("enabling confirms"))?;
        let consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(err("consuming"))?;
        // retry queues are declared and fed on a channel of their own: a declare the broker
        // refuses closes its channel, and must not close the consumer's
        let retries = self.kept_channel().await?;
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
        let ch = self.kept_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(err("enabling confirms"))?;
        Ok(RabbitSink { channel: ch })
    }

    /// Closes the connection: unacked deliveries go back to their queues. A connection that is
    /// closing or closed already (the broker went away) is closed: that is not an error.
    ///
    /// The channels of its sources and sinks are closed first, each after what a dropped source
    /// left queued on it (lapin cancels a dropped consumer in the background): closing the
    /// connection under those would fail them and have lapin log a connection error.
    pub async fn close(&self) -> Result<()> {
        use lapin::{ChannelState, ConnectionState, ErrorKind};
        let open = std::mem::take(&mut *self.open.lock().unwrap_or_else(|e| e.into_inner()));
        for ch in open.iter().filter(|c| c.status().connected()) {
            // a channel the broker or a concurrent close is closing is as good as closed
            let _ = ch.close(200, "bye".into()).await;
        }
        match self.conn.close(200, "bye".into()).await {
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::InvalidChannelState(ChannelState::Closing | ChannelState::Closed, _)
                        | ErrorKind::InvalidConnectionState(
                            ConnectionState::Closing
                                | ConnectionState::Closed
                                | ConnectionState::Error,
                        )
                ) =>
            {
                Ok(())
            }
            r => r.map_err(err("closing")),
        }
    }
}

/// The arguments of a quorum queue with a delivery limit.
pub(crate) fn quorum_args(delivery_limit: u32) -> FieldTable {
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
pub(crate) const DELIVERIES: &str = "idemgate-deliveries";

/// A retry queue lives this long after its last use, past the TTL of anything in it.
pub(crate) const RETRY_QUEUE_IDLE: Duration = Duration::from_secs(60);

/// The delay a retry queue gives for `delay`: rounded up to a step of a quarter octave (at
/// most 25 % longer), so a consumer uses a few retry queues, not one per delay.
pub(crate) fn retry_step(delay: Duration) -> Duration {
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
pub(crate) fn retry_queue(queue: &str, step: Duration) -> String {
    format!("{queue}.retry.{}", step.as_millis())
}

pub(crate) fn long_string(v: &[u8]) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.to_vec()))
}

/// Publishes on `ch` to the default exchange (routing key = queue) and waits for the confirm.
///
/// The message is `mandatory`: one that no queue takes (the queue does not exist) comes back
/// with its confirm, and is an error. Without it the broker confirms and drops the message.
pub(crate) async fn publish(
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
        .basic_publish("".into(), routing_key.into(), options, payload, props)
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

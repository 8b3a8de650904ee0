//! The consumer side: manual acks, delayed retries through retry queues, dead letters.

use super::*;

/// A consumer of one queue.
#[derive(Debug)]
pub struct RabbitSource {
    pub(crate) consumer: lapin::Consumer,
    pub(crate) channel: Channel,
    pub(crate) retries: Channel,
    pub(crate) queue: Arc<str>,
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

pub(crate) fn header_bytes(v: &AMQPValue) -> Option<Bytes> {
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
pub(crate) const REQUEUE: BasicNackOptions = BasicNackOptions {
    requeue: true,
    multiple: false,
};

/// One delivery from a [`RabbitSource`]. Dropped unsettled (a failed dead letter, a cancelled
/// handler), it is nacked back to its queue at once: it does not hold a prefetch slot until
/// the channel closes.
#[derive(Debug)]
pub struct RabbitDelivery {
    pub(crate) msg: Message,
    // taken by the settling call; still here when the delivery is dropped unsettled
    pub(crate) acker: Option<Acker>,
    pub(crate) channel: Channel,
    pub(crate) retries: Channel,
    pub(crate) queue: Arc<str>,
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
        sent(acker.ack(BasicAckOptions::default()).await, "acking")
    }

    async fn nack(mut self, delay: Duration) -> Result<()> {
        if delay.is_zero() {
            let Some(acker) = self.acker.take() else {
                return Ok(());
            };
            return sent(acker.nack(REQUEUE).await, "nacking");
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
        idemgate_consumer::dead_lettered(self.ack()).await
    }
}

impl RabbitDelivery {
    /// Persistent properties with the message's headers and event id, for a copy of it.
    pub(crate) fn copy_properties(&self) -> BasicProperties {
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
    pub(crate) async fn declare_retry(&self, retry: &str, step: Duration) -> Result<()> {
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
            .queue_declare(retry.into(), durable, args)
            .await
            .map(drop)
            .map_err(err("declaring a retry queue"))
    }
}

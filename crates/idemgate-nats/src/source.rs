//! The consumer side: a pull consumer with explicit acks.

use super::*;

/// Deliveries from a durable JetStream pull consumer.
pub struct NatsSource {
    pub(crate) messages: pull::Stream,
    pub(crate) js: jetstream::Context,
    pub(crate) dead: Option<String>,
    pub(crate) horizon: Horizon,
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliver: Option<u32>,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("dead", &self.dead)
            .field("horizon", &self.horizon)
            .finish_non_exhaustive()
    }
}

impl Source for NatsSource {
    type Delivery = NatsDelivery;

    /// How long after a first delivery the server may still deliver the message again.
    fn horizon(&self) -> Option<Horizon> {
        Some(self.horizon.clone())
    }

    /// The consumer's `AckWait`, from the server's config.
    fn ack_wait(&self) -> Option<Duration> {
        Some(self.ack_wait)
    }

    /// The consumer's `MaxDeliver`, from the server's config (`None` when unlimited).
    fn delivery_limit(&self) -> Option<u32> {
        self.max_deliver
    }

    async fn recv(&mut self) -> Result<Option<NatsDelivery>> {
        let Some(next) = self.messages.next().await else {
            return Ok(None);
        };
        let m = next.map_err(err("receiving"))?;
        let headers: Vec<(String, Bytes)> = m
            .headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .flat_map(|(k, vs)| {
                        vs.iter().map(move |v| {
                            (k.to_string(), Bytes::copy_from_slice(v.as_str().as_bytes()))
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut msg = Message::new(m.subject.to_string(), m.payload.clone());
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        msg.event_id = header("Nats-Msg-Id").or_else(|| header(EVENT_ID));
        msg.ordering_key = header(ORDERING_KEY);
        if let Ok(info) = m.info() {
            msg.deliveries = u32::try_from(info.delivered).ok();
            msg.redelivered = info.delivered > 1;
        }
        msg.headers = headers;
        Ok(Some(NatsDelivery {
            msg,
            inner: m,
            js: self.js.clone(),
            dead: self.dead.clone(),
        }))
    }
}

/// One delivery from a [`NatsSource`].
#[derive(Debug)]
pub struct NatsDelivery {
    pub(crate) msg: Message,
    pub(crate) inner: jetstream::Message,
    pub(crate) js: jetstream::Context,
    pub(crate) dead: Option<String>,
}

impl Delivery for NatsDelivery {
    fn message(&self) -> &Message {
        &self.msg
    }

    async fn ack(self) -> Result<()> {
        self.inner.double_ack().await.map_err(err("acking"))
    }

    async fn nack(self, delay: Duration) -> Result<()> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.inner
            .ack_with(AckKind::Nak(delay))
            .await
            .map_err(err("nacking"))
    }

    async fn dead_letter(self, reason: &str) -> Result<()> {
        // the original is terminated only once its dead letter is stored; otherwise it comes
        // back after a pause (terminating it would lose it)
        let retry = AckKind::Nak(Some(DEAD_LETTER_RETRY));
        let Some(subject) = &self.dead else {
            let _ = self.inner.ack_with(retry).await;
            return Err(Error::Broker {
                broker: BROKER,
                message: format!(
                    "no dead-letter subject for {}: the message stays in its stream (set ConsumerOptions::with_dead_letter_subject)",
                    self.msg.source
                ),
                source: None,
            });
        };
        {
            // without the original's Nats-Msg-Id, which the server would drop as a duplicate
            let kept: Vec<_> = self
                .msg
                .headers
                .iter()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("Nats-Msg-Id"))
                .cloned()
                .collect();
            let mut headers = to_headers(&kept);
            headers.insert(DEAD_LETTER_REASON, reason);
            let p = Publish::build()
                .payload(self.msg.payload.clone())
                .headers(headers);
            // stored in the dead-letter stream before the original is terminated
            if let Err(e) = publish(&self.js, subject.clone(), p).await {
                let _ = self.inner.ack_with(retry).await;
                return Err(e);
            }
        }
        idemgate_consumer::dead_lettered(async {
            self.inner
                .ack_with(AckKind::Term)
                .await
                .map_err(err("terminating"))
        })
        .await
    }

    async fn in_progress(&self) -> Result<()> {
        self.inner
            .ack_with(AckKind::Progress)
            .await
            .map_err(err("signalling progress"))
    }
}

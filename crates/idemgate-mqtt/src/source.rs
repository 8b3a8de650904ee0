//! The consumer side: a QoS 1 subscription with manual acks.

use super::*;

/// A QoS 1 subscription with manual acks: see the [crate docs](crate).
pub struct MqttSource {
    pub(crate) link: Arc<Link>,
    pub(crate) incoming: mpsc::UnboundedReceiver<(Publish, u64)>,
    pub(crate) again_tx: mpsc::UnboundedSender<Again>,
    pub(crate) again_rx: mpsc::UnboundedReceiver<Again>,
    pub(crate) dead_letter_topic: Option<String>,
    pub(crate) horizon: Horizon,
}

impl fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSource")
            .field("dead_letter_topic", &self.dead_letter_topic)
            .finish_non_exhaustive()
    }
}

impl MqttSource {
    /// Dead letters go to `topic` instead of `idemgate-dead/<topic>`.
    pub fn with_dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    pub(crate) fn delivery(&self, (publish, arrival, msg): Again) -> MqttDelivery {
        MqttDelivery {
            link: Arc::clone(&self.link),
            again: Some(self.again_tx.clone()),
            dead_letter_topic: self.dead_letter_topic.clone(),
            publish,
            arrival,
            msg,
        }
    }
}

pub(crate) fn message(p: &Publish) -> Message {
    let mut msg = Message::new(String::from_utf8_lossy(&p.topic), p.payload.clone());
    if let Some(props) = &p.properties {
        for (k, v) in &props.user_properties {
            if k == EVENT_ID {
                msg.event_id = Some(v.clone());
            } else if k == ORDERING_KEY {
                msg.ordering_key = Some(v.clone());
            }
            msg.headers.push((k.clone(), Bytes::from(v.clone())));
        }
    }
    msg.redelivered = p.dup;
    msg
}

impl Source for MqttSource {
    type Delivery = MqttDelivery;

    /// How long the broker may redeliver an unacknowledged message: the session expiry.
    fn horizon(&self) -> Option<Horizon> {
        Some(self.horizon.clone())
    }

    async fn recv(&mut self) -> Result<Option<MqttDelivery>> {
        let next = tokio::select! {
            biased;
            Some(again) = self.again_rx.recv() => again,
            p = self.incoming.recv() => match p {
                Some((p, arrival)) => { let m = message(&p); (p, arrival, m) }
                None => return Ok(None),
            },
        };
        Ok(Some(self.delivery(next)))
    }
}

/// A message handed back to its source: the PUBLISH, its arrival number, the message.
pub(crate) type Again = (Publish, u64, Message);

/// One QoS 1 message, unacknowledged until settled.
pub struct MqttDelivery {
    pub(crate) link: Arc<Link>,
    pub(crate) again: Option<mpsc::UnboundedSender<Again>>,
    pub(crate) dead_letter_topic: Option<String>,
    pub(crate) publish: Publish,
    /// Its place in the connection's arrival order (for in-order PUBACKs).
    pub(crate) arrival: u64,
    pub(crate) msg: Message,
}

impl fmt::Debug for MqttDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttDelivery")
            .field("topic", &self.msg.source)
            .field("pkid", &self.publish.pkid)
            .finish_non_exhaustive()
    }
}

impl MqttDelivery {
    /// Hands the message back to its source as a redelivery.
    pub(crate) fn requeue(&mut self) {
        if let Some(again) = self.again.take() {
            let mut msg = std::mem::take(&mut self.msg);
            msg.redelivered = true;
            msg.deliveries = Some(msg.deliveries.unwrap_or(1) + 1);
            let _ = again.send((self.publish.clone(), self.arrival, msg));
        }
    }

    pub(crate) async fn puback(mut self) -> Result<()> {
        self.again = None;
        match &self.link.in_order {
            Some(outbox) => {
                self.link
                    .settled(outbox, self.arrival, Ack::of(&self.publish));
                Ok(())
            }
            None => self
                .link
                .client
                .ack(&self.publish)
                .await
                .map_err(err("acknowledging")),
        }
    }
}

impl Drop for MqttDelivery {
    /// Dropped unsettled (a cancelled handler): handed back, never lost. If the whole consumer
    /// is gone, the broker redelivers it when the session reconnects.
    fn drop(&mut self) {
        self.requeue();
    }
}

impl Delivery for MqttDelivery {
    fn message(&self) -> &Message {
        &self.msg
    }

    async fn ack(self) -> Result<()> {
        self.puback().await
    }

    async fn nack(mut self, delay: Duration) -> Result<()> {
        // MQTT has no negative ack: the message comes back here after the delay
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            self.requeue();
        });
        Ok(())
    }

    async fn dead_letter(self, reason: &str) -> Result<()> {
        let topic = match &self.dead_letter_topic {
            Some(t) => t.clone(),
            None => format!("idemgate-dead/{}", self.msg.source),
        };
        let mut props = properties(self.msg.event_id.as_deref(), &self.msg.headers);
        props
            .user_properties
            .push((DEAD_LETTER_REASON.to_owned(), reason.to_owned()));
        // acked only once a subscriber (a persistent session, a bridge) holds the dead letter:
        // otherwise the broker drops it, and the original comes back here after a pause
        let refused = match self
            .link
            .publish(&topic, self.msg.payload.clone(), props)
            .await
        {
            Ok(true) => return idemgate_consumer::dead_lettered(self.puback()).await,
            Ok(false) => Error::broker(
                BROKER,
                format!("dead-lettering to {topic}"),
                "no subscriber matched the dead-letter topic: the broker dropped it",
            ),
            Err(e) => e,
        };
        self.nack(DEAD_LETTER_RETRY).await?;
        Err(refused)
    }
}

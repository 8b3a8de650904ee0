//! The consumer side: receive with a visibility timeout, delete to ack.

use super::*;

/// A long-polling consumer of one queue: see the [crate docs](crate).
pub struct SqsSource {
    pub(crate) client: Client,
    pub(crate) url: String,
    pub(crate) visibility: Duration,
    pub(crate) wait: Duration,
    pub(crate) dead_letter_url: Option<String>,
    pub(crate) buffer: Arc<tokio::sync::Mutex<VecDeque<SqsDelivery>>>,
    pub(crate) ticker: tokio::task::JoinHandle<()>,
    pub(crate) horizon: Horizon,
    pub(crate) max_receive_count: Option<u32>,
}

impl Drop for SqsSource {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

impl fmt::Debug for SqsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsSource")
            .field("url", &self.url)
            .field("visibility", &self.visibility)
            .field("dead_letter_url", &self.dead_letter_url)
            .finish_non_exhaustive()
    }
}

impl SqsSource {
    /// Dead letters go to the queue at `url` (default: the redrive policy's target).
    pub fn with_dead_letter_url(mut self, url: impl Into<String>) -> Self {
        self.dead_letter_url = Some(url.into());
        self
    }

    /// How long one receive waits for messages (default 1 s, at most 20).
    pub fn with_wait(mut self, d: Duration) -> Self {
        self.wait = d.min(Duration::from_secs(20));
        self
    }

    pub(crate) fn delivery(&self, m: aws_sdk_sqs::types::Message) -> Option<SqsDelivery> {
        let receipt = m.receipt_handle?;
        let mut msg = Message::new(self.url.as_str(), m.body.unwrap_or_default());
        for (k, v) in m.message_attributes.unwrap_or_default() {
            let value = match (v.string_value, v.binary_value) {
                (Some(s), _) => Bytes::from(s),
                (None, Some(b)) => Bytes::from(b.into_inner()),
                (None, None) => Bytes::new(),
            };
            if k == EVENT_ID {
                msg.event_id = Some(String::from_utf8_lossy(&value).into_owned());
            }
            msg.headers.push((k, value));
        }
        let attrs = m.attributes.unwrap_or_default();
        let count = attrs
            .get(&MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|c| c.parse::<u32>().ok());
        msg.deliveries = count;
        msg.redelivered = count.is_some_and(|c| c > 1);
        msg.ordering_key = attrs
            .get(&MessageSystemAttributeName::MessageGroupId)
            .cloned();
        Some(SqsDelivery {
            client: self.client.clone(),
            url: self.url.clone(),
            receipt,
            visibility: self.visibility,
            dead_letter_url: self.dead_letter_url.clone(),
            msg,
        })
    }
}

impl Source for SqsSource {
    type Delivery = SqsDelivery;

    /// The redelivery horizon, from the queue's attributes.
    fn horizon(&self) -> Option<Horizon> {
        Some(self.horizon.clone())
    }

    /// The queue's visibility timeout.
    fn ack_wait(&self) -> Option<Duration> {
        Some(self.visibility)
    }

    /// The redrive policy's `maxReceiveCount`.
    fn delivery_limit(&self) -> Option<u32> {
        self.max_receive_count
    }

    async fn recv(&mut self) -> Result<Option<SqsDelivery>> {
        loop {
            if let Some(d) = self.buffer.lock().await.pop_front() {
                return Ok(Some(d));
            }
            let out = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .wait_time_seconds(secs(self.wait))
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .message_attribute_names("All")
                .send()
                .await
                .map_err(err("receiving"))?;
            let received = out.messages.unwrap_or_default();
            let batch: Vec<_> = received
                .into_iter()
                .filter_map(|m| self.delivery(m))
                .collect();
            self.buffer.lock().await.extend(batch);
        }
    }
}

/// One received message, invisible to other consumers until settled or its visibility
/// timeout passes.
pub struct SqsDelivery {
    pub(crate) client: Client,
    pub(crate) url: String,
    pub(crate) receipt: String,
    pub(crate) visibility: Duration,
    pub(crate) dead_letter_url: Option<String>,
    pub(crate) msg: Message,
}

impl fmt::Debug for SqsDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsDelivery")
            .field("url", &self.url)
            .field("event_id", &self.msg.event_id)
            .finish_non_exhaustive()
    }
}

impl SqsDelivery {
    pub(crate) async fn visibility(&self, d: Duration) -> Result<()> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(&self.receipt)
            .visibility_timeout(secs(d))
            .send()
            .await
            .map_err(err("changing the visibility"))?;
        Ok(())
    }
}

/// How long a message is held while its dead letter is sent.
const DEAD_LETTER_HOLD: Duration = Duration::from_secs(30);

impl Delivery for SqsDelivery {
    fn message(&self) -> &Message {
        &self.msg
    }

    async fn ack(self) -> Result<()> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(&self.receipt)
            .send()
            .await
            .map_err(err("deleting"))?;
        Ok(())
    }

    async fn nack(self, delay: Duration) -> Result<()> {
        // SQS counts whole seconds: round a short delay up, so it is never "now" by accident
        let delay = Duration::from_secs(delay.as_secs() + u64::from(delay.subsec_nanos() > 0));
        self.visibility(delay).await
    }

    async fn dead_letter(self, reason: &str) -> Result<()> {
        let Some(dead) = &self.dead_letter_url else {
            return Err(Error::Config(format!(
                "{} has no dead-letter queue (no redrive policy); message left in place",
                self.url
            )));
        };
        // held while the dead letter is sent: shown again meanwhile, the message could be
        // received past the redrive limit and moved to the dead-letter queue by SQS as well
        let _ = self.visibility(self.visibility.max(DEAD_LETTER_HOLD)).await;
        let m = &self.msg;
        let sent = send(
            &self.client,
            dead,
            &m.payload,
            m.event_id.as_deref(),
            &m.headers,
            m.ordering_key.as_deref(),
            Some((DEAD_LETTER_REASON, reason)),
        )
        .await;
        if let Err(e) = sent {
            // kept, and back after a pause rather than after the hold
            let _ = self.visibility(idemgate_consumer::DEAD_LETTER_RETRY).await;
            return Err(e);
        }
        idemgate_consumer::dead_lettered(self.ack()).await
    }

    async fn in_progress(&self) -> Result<()> {
        self.visibility(self.visibility).await
    }
}

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

const BROKER: &str = "sqs";

/// An SDK error with its whole chain in the message (an SDK error's own `Display` is only
/// "service error").
fn err<E: std::error::Error>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| {
        let chain = aws_sdk_sqs::error::DisplayErrorContext(e).to_string();
        Error::broker(BROKER, what, chain)
    }
}

/// An SQS endpoint.
#[derive(Debug, Clone)]
pub struct Sqs {
    client: Client,
}

/// A queue to create: see [`Sqs::create_queue`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// How long a received message stays invisible to other consumers (default 30 s).
    pub visibility_timeout: Duration,
    /// Receives before SQS moves a message to `<name>-dead` (default 5); `None`: no redrive.
    pub max_receive_count: Option<u32>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            visibility_timeout: Duration::from_secs(30),
            max_receive_count: Some(5),
        }
    }
}

impl QueueOptions {
    /// Sets the visibility timeout.
    pub fn with_visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = d;
        self
    }
}

fn fifo(name_or_url: &str) -> bool {
    name_or_url.ends_with(".fifo")
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

impl Sqs {
    /// On an SDK client configured the usual way (`aws-config`, your region and credentials).
    pub fn new(client: Client) -> Self {
        Sqs { client }
    }

    /// A local SQS-compatible endpoint (`http://127.0.0.1:4566`) with static test credentials.
    pub fn local(endpoint: &str) -> Self {
        Self::endpoint(endpoint, "us-east-1", "test", "test")
    }

    /// An endpoint with static credentials (without pulling in `aws-config`).
    pub fn endpoint(endpoint: &str, region: &str, access_key: &str, secret_key: &str) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new(region.to_owned()))
            .credentials_provider(Credentials::new(
                access_key, secret_key, None, None, "idemgate",
            ))
            .http_client(http)
            .build();
        Sqs {
            client: Client::from_conf(config),
        }
    }

    /// Creates the queue `name` (FIFO if it ends with `.fifo`) and, with a
    /// `max_receive_count`, its dead-letter queue `<name>-dead` as its redrive target.
    /// Returns the queue URL.
    pub async fn create_queue(&self, name: &str, options: QueueOptions) -> Result<String> {
        let mut redrive = None;
        if let Some(max) = options.max_receive_count {
            let dead_name = match name.strip_suffix(".fifo") {
                Some(base) => format!("{base}-dead.fifo"),
                None => format!("{name}-dead"),
            };
            let dead = self.create(&dead_name, HashMap::new()).await?;
            let arn = self.attribute(&dead, QueueAttributeName::QueueArn).await?;
            redrive = Some(format!(
                r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{max}"}}"#
            ));
        }
        let mut attrs = HashMap::new();
        attrs.insert(
            QueueAttributeName::VisibilityTimeout,
            secs(options.visibility_timeout).to_string(),
        );
        if let Some(r) = redrive {
            attrs.insert(QueueAttributeName::RedrivePolicy, r);
        }
        self.create(name, attrs).await
    }

    async fn create(
        &self,
        name: &str,
        mut attrs: HashMap<QueueAttributeName, String>,
    ) -> Result<String> {
        if fifo(name) {
            attrs.insert(QueueAttributeName::FifoQueue, "true".into());
        }
        let out = self
            .client
            .create_queue()
            .queue_name(name)
            .set_attributes(Some(attrs))
            .send()
            .await
            .map_err(err("creating a queue"))?;
        out.queue_url
            .ok_or_else(|| Error::broker(BROKER, "creating a queue", "no queue URL returned"))
    }

    async fn attribute(&self, url: &str, name: QueueAttributeName) -> Result<String> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(name.clone())
            .send()
            .await
            .map_err(err("reading queue attributes"))?;
        out.attributes
            .and_then(|mut a| a.remove(&name))
            .ok_or_else(|| Error::broker(BROKER, format!("reading {name}"), "not returned"))
    }

    /// Deletes the queue at `url`.
    pub async fn delete_queue(&self, url: &str) -> Result<()> {
        self.client
            .delete_queue()
            .queue_url(url)
            .send()
            .await
            .map_err(err("deleting a queue"))?;
        Ok(())
    }

    /// A producer. [`Outgoing::destination`] is the queue URL.
    pub fn sink(&self) -> SqsSink {
        SqsSink {
            client: self.client.clone(),
        }
    }

    /// The redelivery horizon of the queue at `url`, from its attributes: visibility timeout ×
    /// `maxReceiveCount`, or the retention period when there is no redrive policy.
    pub async fn horizon(&self, url: &str) -> Result<Horizon> {
        Ok(self.queue_info(url).await?.0)
    }

    /// The horizon and the dead-letter queue's name, from the queue's attributes.
    async fn queue_info(&self, url: &str) -> Result<(Horizon, Duration, Option<String>)> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .map_err(err("reading queue attributes"))?;
        let attrs = out.attributes.unwrap_or_default();
        let number = |name: QueueAttributeName, default: u64| {
            attrs
                .get(&name)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let visibility = number(QueueAttributeName::VisibilityTimeout, 30);
        let retention = number(QueueAttributeName::MessageRetentionPeriod, 345_600);
        let redrive = attrs
            .get(&QueueAttributeName::RedrivePolicy)
            .map(|r| Redrive::parse(r));
        let horizon = match &redrive {
            Some(Redrive {
                max_receive_count: Some(max),
                ..
            }) => Horizon {
                broker: BROKER,
                redelivery: Duration::from_secs(visibility * u64::from(*max)),
                basis: format!("VisibilityTimeout {visibility}s × maxReceiveCount {max}"),
            },
            _ => Horizon {
                broker: BROKER,
                redelivery: Duration::from_secs(retention),
                basis: format!("no redrive policy: MessageRetentionPeriod {retention}s"),
            },
        };
        let dead = redrive.and_then(|r| r.target_name);
        Ok((horizon, Duration::from_secs(visibility), dead))
    }

    /// A consumer of the queue at `url`. Reads the queue's visibility timeout and redrive policy
    /// (for the horizon and the dead-letter queue).
    pub async fn source(&self, url: &str) -> Result<SqsSource> {
        let (horizon, visibility, dead) = self.queue_info(url).await?;
        let dead_letter_url = match dead {
            Some(name) => Some(
                self.client
                    .get_queue_url()
                    .queue_name(name)
                    .send()
                    .await
                    .map_err(err("finding the dead-letter queue"))?
                    .queue_url
                    .unwrap_or_default(),
            ),
            None => None,
        };
        // received messages not yet handed out stay invisible: the consumer may be slow to
        // take them (its handlers held by a store outage), and every redelivery counts
        let buffer: Arc<tokio::sync::Mutex<VecDeque<SqsDelivery>>> = Arc::default();
        let ticker = tokio::spawn({
            let buffer = Arc::clone(&buffer);
            let period = (visibility / 3).max(Duration::from_millis(100));
            async move {
                loop {
                    tokio::time::sleep(period).await;
                    for d in buffer.lock().await.iter() {
                        if let Err(e) = d.in_progress().await {
                            tracing::debug!(error = %e, "extending a buffered message");
                        }
                    }
                }
            }
        });
        Ok(SqsSource {
            client: self.client.clone(),
            url: url.to_owned(),
            visibility,
            wait: Duration::from_secs(1),
            dead_letter_url,
            buffer,
            ticker,
            horizon,
        })
    }
}

/// The parts of a redrive policy we use.
struct Redrive {
    target_name: Option<String>,
    max_receive_count: Option<u32>,
}

impl Redrive {
    /// `{"deadLetterTargetArn":"arn:aws:sqs:region:account:name","maxReceiveCount":5}` (the
    /// count is a number or a string, depending on who wrote it).
    fn parse(policy: &str) -> Self {
        let v: serde_json::Value = serde_json::from_str(policy).unwrap_or_default();
        let count = &v["maxReceiveCount"];
        Redrive {
            target_name: v["deadLetterTargetArn"]
                .as_str()
                .and_then(|arn| arn.rsplit(':').next())
                .map(str::to_owned),
            max_receive_count: count
                .as_u64()
                .or_else(|| count.as_str().and_then(|c| c.parse().ok()))
                .and_then(|c| u32::try_from(c).ok()),
        }
    }
}

/// A producer: see the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct SqsSink {
    client: Client,
}

fn string_attr(v: &str) -> Result<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .map_err(err("building a message attribute"))
}

/// A FIFO deduplication id: the event id itself when SQS accepts it (≤ 128 printable ASCII
/// characters), else its BLAKE3 hash.
fn dedup_id(event_id: &str) -> String {
    if event_id.len() <= 128 && event_id.bytes().all(|b| b.is_ascii_graphic()) {
        event_id.to_owned()
    } else {
        blake3::hash(event_id.as_bytes()).to_hex().to_string()
    }
}

async fn send(
    client: &Client,
    url: &str,
    body: &[u8],
    event_id: Option<&str>,
    headers: &[(String, Bytes)],
    group: Option<&str>,
    extra: Option<(&str, &str)>,
) -> Result<()> {
    let body = std::str::from_utf8(body).map_err(|_| {
        Error::Config("SQS message bodies are text: the payload is not UTF-8".into())
    })?;
    let mut req = client.send_message().queue_url(url).message_body(body);
    if let Some(id) = event_id {
        req = req.message_attributes(EVENT_ID, string_attr(id)?);
    }
    for (k, v) in headers.iter().filter(|(k, _)| k != EVENT_ID) {
        req = req.message_attributes(k, string_attr(&String::from_utf8_lossy(v))?);
    }
    if let Some((k, v)) = extra {
        req = req.message_attributes(k, string_attr(v)?);
    }
    if fifo(url) {
        req = req.message_group_id(group.unwrap_or("default"));
        if let Some(id) = event_id {
            req = req.message_deduplication_id(dedup_id(id));
        }
    }
    req.send().await.map_err(err("sending"))?;
    Ok(())
}

impl Sink for SqsSink {
    async fn publish(&self, msg: &Outgoing) -> Result<()> {
        send(
            &self.client,
            &msg.destination,
            &msg.payload,
            Some(&msg.event_id),
            &msg.headers,
            msg.ordering_key.as_deref(),
            None,
        )
        .await
    }
}

/// A long-polling consumer of one queue: see the [crate docs](crate).
pub struct SqsSource {
    client: Client,
    url: String,
    visibility: Duration,
    wait: Duration,
    dead_letter_url: Option<String>,
    buffer: Arc<tokio::sync::Mutex<VecDeque<SqsDelivery>>>,
    ticker: tokio::task::JoinHandle<()>,
    horizon: Horizon,
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

    fn delivery(&self, m: aws_sdk_sqs::types::Message) -> Option<SqsDelivery> {
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
    client: Client,
    url: String,
    receipt: String,
    visibility: Duration,
    dead_letter_url: Option<String>,
    msg: Message,
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
    async fn visibility(&self, d: Duration) -> Result<()> {
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
        let m = &self.msg;
        send(
            &self.client,
            dead,
            &m.payload,
            m.event_id.as_deref(),
            &m.headers,
            m.ordering_key.as_deref(),
            Some((DEAD_LETTER_REASON, reason)),
        )
        .await?;
        self.ack().await
    }

    async fn in_progress(&self) -> Result<()> {
        self.visibility(self.visibility).await
    }
}

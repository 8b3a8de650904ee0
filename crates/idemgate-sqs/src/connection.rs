//! The client: queues, their options and redrive.

use super::*;

/// An SQS endpoint.
#[derive(Debug, Clone)]
pub struct Sqs {
    pub(crate) client: Client,
}

/// A queue to create: see [`Sqs::create_queue`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// How long a received message stays invisible to other consumers (default 30 s).
    pub visibility_timeout: Duration,
    /// Receives before SQS moves a message to `<name>-dead` (default 10, the AWS console's);
    /// `None`: no redrive. Keep it above the consumer's `max_attempts` (5 by default): a
    /// consumer that dies during a message's last receive leaves it to SQS's redrive, whose
    /// dead letter carries no reason.
    pub max_receive_count: Option<u32>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            visibility_timeout: Duration::from_secs(30),
            max_receive_count: Some(10),
        }
    }
}

impl QueueOptions {
    /// Sets the visibility timeout.
    pub fn with_visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = d;
        self
    }

    /// Sets the redrive policy's `maxReceiveCount`; `None`: no redrive policy.
    pub fn with_max_receive_count(mut self, n: Option<u32>) -> Self {
        self.max_receive_count = n;
        self
    }
}

pub(crate) fn fifo(name_or_url: &str) -> bool {
    name_or_url.ends_with(".fifo")
}

pub(crate) fn secs(d: Duration) -> i32 {
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

    pub(crate) async fn create(
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

    pub(crate) async fn attribute(&self, url: &str, name: QueueAttributeName) -> Result<String> {
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
        Ok(self.queue_info(url).await?.horizon)
    }

    /// The horizon and the dead-letter queue's name, from the queue's attributes.
    pub(crate) async fn queue_info(&self, url: &str) -> Result<QueueInfo> {
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
        let (dead, max_receive_count) = redrive
            .map(|r| (r.target_name, r.max_receive_count))
            .unwrap_or_default();
        Ok(QueueInfo {
            horizon,
            visibility: Duration::from_secs(visibility),
            dead,
            max_receive_count,
        })
    }

    /// A consumer of the queue at `url`. Reads the queue's visibility timeout and redrive policy
    /// (for the horizon and the dead-letter queue).
    pub async fn source(&self, url: &str) -> Result<SqsSource> {
        let QueueInfo {
            horizon,
            visibility,
            dead,
            max_receive_count,
        } = self.queue_info(url).await?;
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
            let (client, url) = (self.client.clone(), url.to_owned());
            async move {
                loop {
                    tokio::time::sleep(period).await;
                    // the receipts under the lock, the call without it: one batch request for
                    // the whole buffer (at most 10 messages), so no message waits behind the
                    // others' round trips and `recv` is not held up meanwhile
                    let receipts: Vec<String> = buffer
                        .lock()
                        .await
                        .iter()
                        .map(|d| d.receipt.clone())
                        .collect();
                    if let Err(e) = extend(&client, &url, &receipts, visibility).await {
                        tracing::debug!(error = %e, "extending the buffered messages");
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
            max_receive_count,
        })
    }
}

/// Extends the visibility of `receipts` (at most 10, a receive's batch) in one request.
async fn extend(
    client: &Client,
    url: &str,
    receipts: &[String],
    visibility: Duration,
) -> Result<()> {
    if receipts.is_empty() {
        return Ok(());
    }
    let entries = receipts
        .iter()
        .enumerate()
        .map(|(i, receipt)| {
            aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .visibility_timeout(secs(visibility))
                .build()
                .map_err(err("building a visibility change"))
        })
        .collect::<Result<Vec<_>>>()?;
    let out = client
        .change_message_visibility_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(err("extending the buffered messages"))?;
    for failed in out.failed {
        tracing::debug!(
            id = failed.id,
            code = failed.code,
            "a buffered message was not extended"
        );
    }
    Ok(())
}

/// What a consumer reads from a queue's attributes.
pub(crate) struct QueueInfo {
    pub(crate) horizon: Horizon,
    pub(crate) visibility: Duration,
    // the redrive target's name
    pub(crate) dead: Option<String>,
    pub(crate) max_receive_count: Option<u32>,
}

/// The parts of a redrive policy we use.
pub(crate) struct Redrive {
    pub(crate) target_name: Option<String>,
    pub(crate) max_receive_count: Option<u32>,
}

impl Redrive {
    /// `{"deadLetterTargetArn":"arn:aws:sqs:region:account:name","maxReceiveCount":5}` (the
    /// count is a number or a string, depending on who wrote it).
    pub(crate) fn parse(policy: &str) -> Self {
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

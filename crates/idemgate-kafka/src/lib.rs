//! Kafka for idemgate consumers and producers, on [`rdkafka`] (librdkafka).
//!
//! - [`KafkaSink`] is an idempotent producer: `enable.idempotence=true` and `acks=all` are
//!   enforced (librdkafka leaves idempotence off by default, and a retried produce can then
//!   write a message twice). The event id travels in the `idemgate-event-id` header, the
//!   ordering key as the message key.
//! - [`KafkaSource`] consumes a group's partitions one message at a time per partition (Kafka's
//!   order), several partitions at once. `ack` stores the offset for librdkafka's commit; `nack`
//!   hands the same message back after the delay, ahead of the rest of its partition (the
//!   offset is not committed past it); `dead_letter` produces it with its reason to a
//!   dead-letter topic and then acks.
//! - With [`SourceOptions::with_positions_from`] (Inbox mode), every message carries its
//!   [`Position`](idemgate_consumer::Position): the inbox moves the stored position in the same
//!   transaction as the effect, and on partition assignment the source seeks to the stored
//!   positions instead of trusting Kafka's committed offsets. Before a partition is revoked,
//!   the source waits for the message it has in flight to settle, so the next owner loads a
//!   position that is final.
//! - [`Kafka::horizon`] (and the source's): the window check's redelivery horizon, from the
//!   group's session timeout and poll interval.

mod source;

use std::collections::BTreeMap;
use std::time::Duration;

use idemgate_consumer::{EVENT_ID, Error, Horizon, Outgoing, Result, Sink};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

pub use source::{KafkaDelivery, KafkaSource, PositionLoader, SourceOptions};

const BROKER: &str = "kafka";

fn err<E: Into<idemgate_consumer::BoxError>>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::broker(BROKER, what, e)
}

/// A Kafka cluster: its bootstrap servers and the client settings every producer and consumer
/// made from it shares.
#[derive(Debug, Clone)]
pub struct Kafka {
    settings: BTreeMap<String, String>,
}

impl Kafka {
    /// A cluster at `bootstrap` (`host:port,host:port`).
    pub fn new(bootstrap: &str) -> Self {
        let mut settings = BTreeMap::new();
        settings.insert("bootstrap.servers".to_owned(), bootstrap.to_owned());
        Kafka { settings }
    }

    /// Sets a librdkafka client property for every client made from this value (for example
    /// `session.timeout.ms`, `security.protocol`).
    pub fn with_setting(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.insert(key.into(), value.into());
        self
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.settings {
            c.set(k, v);
        }
        c
    }

    fn setting(&self, key: &str) -> Option<&str> {
        self.settings.get(key).map(String::as_str)
    }

    /// Creates `topic` with `partitions` partitions (replication 1), if it does not exist.
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .config()
            .create()
            .map_err(err("creating an admin client"))?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let results = admin
            .create_topics([&new], &AdminOptions::new())
            .await
            .map_err(err("creating a topic"))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(Error::broker(
                        BROKER,
                        format!("creating topic {t}"),
                        rdkafka::error::KafkaError::AdminOp(code),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Deletes `topic`.
    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .config()
            .create()
            .map_err(err("creating an admin client"))?;
        admin
            .delete_topics(&[topic], &AdminOptions::new())
            .await
            .map_err(err("deleting a topic"))?;
        Ok(())
    }

    /// An idempotent producer.
    ///
    /// # Errors
    /// [`Error::Config`] when the settings turn idempotence off or ask for fewer than all acks.
    pub fn sink(&self) -> Result<KafkaSink> {
        Ok(KafkaSink {
            producer: self.producer()?,
        })
    }

    fn producer(&self) -> Result<FutureProducer> {
        if self
            .setting("enable.idempotence")
            .is_some_and(|v| v != "true")
        {
            return Err(Error::Config(
                "enable.idempotence must stay true: without it a retried produce can write a \
                 message twice"
                    .into(),
            ));
        }
        if self
            .setting("acks")
            .is_some_and(|v| v != "all" && v != "-1")
        {
            return Err(Error::Config(
                "acks must be all for the idempotent producer".into(),
            ));
        }
        self.config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(err("creating a producer"))
    }

    /// How long after a first delivery a group may hand a message out again: a member that
    /// stops is noticed within the session timeout (or the poll interval), and its partitions
    /// are replayed from the last commit. From this value's settings (librdkafka's defaults
    /// where unset).
    pub fn horizon(&self) -> Horizon {
        let millis = |key: &str, default: u64| {
            self.setting(key)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let session = millis("session.timeout.ms", 45_000);
        let poll = millis("max.poll.interval.ms", 300_000);
        let commit = millis("auto.commit.interval.ms", 5_000);
        Horizon {
            broker: BROKER,
            redelivery: Duration::from_millis(session + poll + commit),
            basis: format!(
                "session.timeout.ms {session} + max.poll.interval.ms {poll} + \
                 auto.commit.interval.ms {commit}"
            ),
        }
    }

    /// A consumer in `group` of `topics`. See [`SourceOptions`].
    pub fn source(
        &self,
        group: &str,
        topics: &[&str],
        options: SourceOptions,
    ) -> Result<KafkaSource> {
        KafkaSource::start(self, group, topics, options)
    }
}

/// An idempotent Kafka producer: see the [crate docs](crate).
#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").finish_non_exhaustive()
    }
}

fn headers<'a>(
    event_id: Option<&'a str>,
    extra: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> OwnedHeaders {
    let mut h = OwnedHeaders::new();
    if let Some(id) = event_id {
        h = h.insert(Header {
            key: EVENT_ID,
            value: Some(id.as_bytes()),
        });
    }
    for (key, value) in extra {
        h = h.insert(Header {
            key,
            value: Some(value),
        });
    }
    h
}

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&str>,
    payload: &[u8],
    headers: OwnedHeaders,
) -> Result<()> {
    let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
    if let Some(k) = key {
        record = record.key(k);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| match e.rdkafka_error_code() {
            // no retry can make these succeed: a relay dead-letters the message
            Some(
                code @ (RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed),
            ) => Error::Refused {
                broker: BROKER,
                message: format!("producing to {topic}: {code}"),
            },
            _ => Error::broker(BROKER, format!("producing to {topic}"), e),
        })
}

impl Sink for KafkaSink {
    async fn publish(&self, msg: &Outgoing) -> Result<()> {
        let extra = msg.headers.iter().map(|(k, v)| (k.as_str(), v.as_ref()));
        produce(
            &self.producer,
            &msg.destination,
            msg.ordering_key.as_deref(),
            &msg.payload,
            headers(Some(&msg.event_id), extra),
        )
        .await
    }
}

//! The brokers a chaos run goes through: setting up a phase's destination, the producer, and
//! each worker's [`Source`]. The embedded SQLite queue is always here; the real brokers are in
//! [`remote`], behind the `brokers` feature.

#[cfg(feature = "brokers")]
mod remote;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::ValueEnum;
use idemgate::consumer::Source;
use idemgate::sqlite::SqliteQueue;

use super::Event;
use super::worker::SqlInbox;
use crate::BoxError;

/// The broker under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ChaosBroker {
    /// The embedded SQLite queue with visibility timeouts (no server).
    Embedded,
    /// RabbitMQ (`amqp://guest:guest@127.0.0.1:5672/%2f`).
    #[cfg(feature = "brokers")]
    Rabbitmq,
    /// NATS JetStream (`nats://127.0.0.1:4222`).
    #[cfg(feature = "brokers")]
    Nats,
    /// A Kafka-protocol broker (`127.0.0.1:9092`).
    #[cfg(feature = "brokers")]
    Kafka,
    /// MQTT 5 (`127.0.0.1:1883`).
    #[cfg(feature = "brokers")]
    Mqtt,
    /// SQS (`http://127.0.0.1:4566`).
    #[cfg(feature = "brokers")]
    Sqs,
}

impl ChaosBroker {
    /// Whether the run keeps each ordering key's order, so that effects must follow it: the
    /// embedded queue (a key is a message group, handed out one message at a time), Kafka (a
    /// key's partition has one member), RabbitMQ (a single active consumer), MQTT (a key's
    /// topic has one session). Competing consumers of NATS and SQS standard queues apply a
    /// key's next message while a dead consumer's earlier one waits out its ack wait or
    /// visibility timeout: reported, not enforced. SQS FIFO message groups (`--fifo`) should
    /// hold, but a run on moto showed one effect out of order in 2,000: reported until its
    /// cause is known.
    pub(crate) fn keeps_order(self) -> bool {
        match self {
            ChaosBroker::Embedded => true,
            #[cfg(feature = "brokers")]
            b => remote::keeps_order(b),
        }
    }

    /// Whether a key's order also holds across a restart of the broker. Mosquitto (2.0.11, with
    /// persistence) was seen handing a resumed session a message published after its restart
    /// before three older ones of the same topic it had restored: the consumer received them
    /// in that order, so no consumer can apply them in order. Reported, not enforced.
    pub(crate) fn keeps_order_across_restarts(self) -> bool {
        #[cfg(feature = "brokers")]
        if matches!(self, ChaosBroker::Mqtt) {
            return false;
        }
        self.keeps_order()
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            ChaosBroker::Embedded => "embedded",
            #[cfg(feature = "brokers")]
            b => remote::name(b),
        }
    }

    /// The local default URL.
    pub(crate) fn default_url(self) -> &'static str {
        match self {
            ChaosBroker::Embedded => "",
            #[cfg(feature = "brokers")]
            b => remote::default_url(b),
        }
    }

    /// Whether `--fifo` applies.
    pub(crate) fn has_fifo(self) -> bool {
        match self {
            ChaosBroker::Embedded => false,
            #[cfg(feature = "brokers")]
            b => b == ChaosBroker::Sqs,
        }
    }

    /// How long an unacknowledged message of a dead worker takes to come back (at most).
    pub(crate) fn redelivery(self, visibility: Duration) -> Duration {
        match self {
            ChaosBroker::Embedded => visibility,
            #[cfg(feature = "brokers")]
            b => remote::redelivery(b, visibility),
        }
    }

    /// How long to wait before a killed worker's replacement joins.
    pub(crate) fn rejoin_delay(self) -> Duration {
        match self {
            ChaosBroker::Embedded => Duration::ZERO,
            #[cfg(feature = "brokers")]
            b => remote::rejoin_delay(b),
        }
    }

    /// At most this many distinct events published and not yet applied.
    #[cfg_attr(not(feature = "brokers"), allow(unused_variables))]
    pub(crate) fn backlog(self, workers: usize) -> u64 {
        match self {
            ChaosBroker::Embedded => 1000,
            #[cfg(feature = "brokers")]
            b => remote::backlog(b, workers),
        }
    }
}

/// The embedded queue's file in a phase directory.
pub(crate) fn queue_path(dir: &Path) -> PathBuf {
    dir.join("queue.db")
}

/// The embedded queue's table name for destination `name`.
fn embedded_queue(name: &str) -> String {
    name.replace('-', "_")
}

/// The embedded queue's dead-letter queue.
fn embedded_dead(name: &str) -> String {
    format!("{}_dead", embedded_queue(name))
}

/// Creates the destination `name` of a phase; returns it as workers and producers are told it
/// (the SQS queue URL, the NATS stream, the name otherwise).
#[cfg_attr(not(feature = "brokers"), allow(unused_variables))]
pub(crate) async fn create_destination(
    broker: ChaosBroker,
    url: &str,
    name: &str,
    dir: &Path,
    workers: usize,
    visibility: Duration,
    fifo: bool,
) -> Result<String, BoxError> {
    match broker {
        ChaosBroker::Embedded => {
            // created here, once, before the workers open it at the same moment
            SqliteQueue::open(queue_path(dir), &embedded_queue(name))?;
            SqliteQueue::open(queue_path(dir), &embedded_dead(name))?;
            Ok(name.to_owned())
        }
        #[cfg(feature = "brokers")]
        b => remote::create_destination(b, url, name, workers, visibility, fifo).await,
    }
}

/// Deletes a phase's destination.
#[cfg_attr(not(feature = "brokers"), allow(unused_variables))]
pub(crate) async fn delete_destination(
    broker: ChaosBroker,
    url: &str,
    destination: &str,
) -> Result<(), BoxError> {
    match broker {
        // the queue's file goes with the run directory
        ChaosBroker::Embedded => Ok(()),
        #[cfg(feature = "brokers")]
        b => remote::delete_destination(b, url, destination).await,
    }
}

/// A dead letter as found in the destination: the event and the reason it carries.
pub(crate) struct DeadLetter {
    pub(crate) id: String,
    pub(crate) reason: Option<String>,
}

/// Reads every dead letter of a phase from its broker's dead-letter destination (the
/// `.dead` queue, subject or topic, the redrive target, the dead-letter topics).
#[cfg_attr(not(feature = "brokers"), allow(unused_variables))]
pub(crate) async fn dead_letters(
    broker: ChaosBroker,
    url: &str,
    destination: &str,
    dir: &Path,
) -> Result<Vec<DeadLetter>, BoxError> {
    match broker {
        ChaosBroker::Embedded => {
            let queue = SqliteQueue::open(queue_path(dir), &embedded_dead(destination))?;
            let mut found = Vec::new();
            loop {
                let batch = queue.receive(100, Duration::from_secs(60))?;
                if batch.is_empty() {
                    return Ok(found);
                }
                for m in batch {
                    let dead = idemgate::sqlite::DeadLetter::parse(&m.body)?;
                    found.push(DeadLetter {
                        id: dead.event_id.unwrap_or_default(),
                        reason: Some(dead.reason),
                    });
                    queue.delete(&m.receipt)?;
                }
            }
        }
        #[cfg(feature = "brokers")]
        b => remote::dead_letters(b, url, destination).await,
    }
}

/// A phase's destination, where the producer publishes.
pub(crate) enum Producer {
    Embedded(Arc<Mutex<SqliteQueue>>),
    #[cfg(feature = "brokers")]
    Remote(Box<remote::Producer>),
}

impl Producer {
    /// Connects a producer to an existing destination (again, after a broker restart).
    #[cfg_attr(not(feature = "brokers"), allow(unused_variables))]
    pub(crate) async fn connect(
        broker: ChaosBroker,
        url: &str,
        destination: &str,
        dir: &Path,
        workers: usize,
    ) -> Result<Self, BoxError> {
        match broker {
            ChaosBroker::Embedded => {
                let queue = SqliteQueue::open(queue_path(dir), &embedded_queue(destination))?;
                Ok(Producer::Embedded(Arc::new(Mutex::new(queue))))
            }
            #[cfg(feature = "brokers")]
            b => Ok(Producer::Remote(Box::new(
                remote::Producer::connect(b, url, destination, workers).await?,
            ))),
        }
    }

    /// Publishes `e`.
    pub(crate) async fn publish(&self, e: &Event) -> Result<(), BoxError> {
        let body = serde_json::to_vec(e)?;
        match self {
            Producer::Embedded(queue) => {
                queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send_in_group(&body, &e.key)?;
                Ok(())
            }
            #[cfg(feature = "brokers")]
            Producer::Remote(p) => p.publish(e, body).await,
        }
    }

    /// Publishes `out` to this producer's destination, with its event id and ordering key.
    pub(crate) async fn publish_outgoing(
        &self,
        out: &idemgate::core::Outgoing,
    ) -> Result<(), BoxError> {
        match self {
            Producer::Embedded(queue) => {
                queue.lock().unwrap_or_else(|e| e.into_inner()).send_event(
                    &out.payload,
                    &out.event_id,
                    out.ordering_key.as_deref(),
                )?;
                Ok(())
            }
            #[cfg(feature = "brokers")]
            Producer::Remote(p) => p.send(out.clone()).await,
        }
    }
}

/// Where a worker consumes from.
#[cfg_attr(not(feature = "brokers"), allow(dead_code))]
pub(crate) struct Route<'a> {
    pub(crate) broker: ChaosBroker,
    pub(crate) url: &'a str,
    /// The queue, stream, topic or queue URL.
    pub(crate) destination: &'a str,
    /// The phase directory (the embedded queue's file).
    pub(crate) dir: &'a Path,
    /// The worker's slot (its MQTT session and topic).
    pub(crate) slot: usize,
    /// Visibility timeout (embedded, SQS) or ack wait (NATS).
    pub(crate) visibility: Duration,
}

/// Connects a worker to its route and hands its source to `serve`. A Kafka source reads its
/// starting positions from `inbox`, where the inbox keeps them.
#[cfg_attr(not(feature = "brokers"), allow(unused_variables))]
pub(crate) async fn with_source<R>(
    route: Route<'_>,
    inbox: Option<&SqlInbox>,
    serve: impl AsyncServe<Output = R>,
) -> Result<R, BoxError> {
    match route.broker {
        ChaosBroker::Embedded => {
            let dir = route.dir;
            let queue = SqliteQueue::open(queue_path(dir), &embedded_queue(route.destination))?;
            let dead = SqliteQueue::open(queue_path(dir), &embedded_dead(route.destination))?;
            let source = idemgate::sqlite::QueueSource::new(queue, route.visibility)
                .with_dead_letters(dead)
                .with_event_id(|body| {
                    serde_json::from_slice::<Event>(body)
                        .ok()
                        .map(|e| e.id)
                        .filter(|id| !id.is_empty())
                });
            Ok(serve.serve(source).await)
        }
        #[cfg(feature = "brokers")]
        _ => remote::with_source(route, inbox, serve).await,
    }
}

/// What runs on a worker's source, whatever its type.
pub(crate) trait AsyncServe {
    type Output;
    async fn serve<S: Source>(self, source: S) -> Self::Output;
}

//! The real brokers of a chaos run: RabbitMQ, NATS JetStream, a Kafka-protocol broker, MQTT 5
//! and SQS (feature `brokers`).

use std::time::Duration;

use idemgate::consumer::{Delivery, Outgoing, Sink, Source};
use idemgate::core::EventId;

use super::super::Event;
use super::super::worker::SqlInbox;
use super::{AsyncServe, ChaosBroker, DeadLetter, Route};
use crate::BoxError;

/// The error of an embedded broker handed to the remote ones (the dispatch in `broker` routes
/// it elsewhere).
fn not_remote() -> BoxError {
    "the embedded queue is not a remote broker".into()
}

pub(super) fn keeps_order(b: ChaosBroker) -> bool {
    matches!(
        b,
        ChaosBroker::Kafka | ChaosBroker::Rabbitmq | ChaosBroker::Mqtt
    )
}

pub(super) fn name(b: ChaosBroker) -> &'static str {
    match b {
        ChaosBroker::Embedded => "embedded",
        ChaosBroker::Rabbitmq => "rabbitmq",
        ChaosBroker::Nats => "nats",
        ChaosBroker::Kafka => "kafka",
        ChaosBroker::Mqtt => "mqtt",
        ChaosBroker::Sqs => "sqs",
    }
}

pub(super) fn default_url(b: ChaosBroker) -> &'static str {
    match b {
        ChaosBroker::Embedded => "",
        ChaosBroker::Rabbitmq => "amqp://guest:guest@127.0.0.1:5672/%2f",
        ChaosBroker::Nats => "nats://127.0.0.1:4222",
        ChaosBroker::Kafka => "127.0.0.1:9092",
        ChaosBroker::Mqtt => "127.0.0.1:1883",
        ChaosBroker::Sqs => "http://127.0.0.1:4566",
    }
}

pub(super) fn redelivery(b: ChaosBroker, visibility: Duration) -> Duration {
    match b {
        // the group rebalances once the dead member's session (6 s) times out
        ChaosBroker::Kafka => Duration::from_secs(8),
        // the connection closes with the process: requeued (RabbitMQ) or kept for the
        // session (MQTT) at once
        ChaosBroker::Rabbitmq | ChaosBroker::Mqtt => Duration::from_secs(1),
        _ => visibility,
    }
}

pub(super) fn rejoin_delay(b: ChaosBroker) -> Duration {
    match b {
        // tansu 0.6 ignores LeaveGroup: a member that joins before the dead member's
        // session times out is never assigned anything
        ChaosBroker::Kafka => Duration::from_secs(7),
        _ => Duration::ZERO,
    }
}

pub(super) fn backlog(b: ChaosBroker, workers: usize) -> u64 {
    let workers = workers as u64;
    match b {
        // Mosquitto keeps at most 1000 messages per session: stay well under it per slot
        ChaosBroker::Mqtt => 50 * workers,
        // moto scans its whole queue on every call: a short queue keeps it ten times faster
        ChaosBroker::Sqs => 25 * workers,
        _ => 1000,
    }
}

/// Kafka client settings for the chaos run (a short session, so a dead member is noticed).
fn kafka(url: &str) -> idemgate::kafka::Kafka {
    idemgate::kafka::Kafka::new(url)
        .with_setting("session.timeout.ms", "6000")
        .with_setting("heartbeat.interval.ms", "500")
}

fn mqtt_addr(url: &str) -> Result<(String, u16), BoxError> {
    let (host, port) = url
        .rsplit_once(':')
        .ok_or("the MQTT URL is host:port, as in 127.0.0.1:1883")?;
    Ok((host.to_owned(), port.parse()?))
}

/// The worker slot whose MQTT topic carries the events of ordering key `key`.
fn key_slot(key: &str, workers: usize) -> usize {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    usize::try_from(hash % u64::try_from(workers.max(1)).unwrap_or(1)).unwrap_or(0)
}

/// The MQTT topic of worker slot `slot`: each slot has its own persistent session and topic.
fn mqtt_topic(name: &str, slot: usize) -> String {
    format!("{name}/{slot}")
}

pub(super) async fn create_destination(
    broker: ChaosBroker,
    url: &str,
    name: &str,
    workers: usize,
    visibility: Duration,
    fifo: bool,
) -> Result<String, BoxError> {
    Ok(match broker {
        ChaosBroker::Embedded => return Err(not_remote()),
        ChaosBroker::Mqtt => {
            // a persistent session subscribed to the dead-letter topics before any worker
            // starts: the broker keeps every dead letter for it (and does not drop them as
            // published to nobody)
            let (host, port) = mqtt_addr(url)?;
            let (reader, source) = mqtt_dead_reader(&host, port, name).await?;
            drop(source);
            reader.disconnect().await?;
            name.to_owned()
        }
        ChaosBroker::Rabbitmq => {
            let rabbit = idemgate::rabbitmq::RabbitMq::connect(url).await?;
            // a quorum queue with RabbitMQ 4's default delivery limit (kills, nacks and held
            // deliveries must stay within it), and a single active consumer, which keeps each
            // ordering key's order through kills
            rabbit.declare_ordered(name, 20).await?;
            rabbit.close().await?;
            name.to_owned()
        }
        ChaosBroker::Nats => {
            let nats = idemgate::nats::Nats::connect(url).await?;
            let stream = name.replace('-', "_");
            // a short duplicate window: the harness's re-publishes must reach the consumers
            nats.stream(
                &stream,
                vec![format!("{stream}.events"), format!("{stream}.dead")],
                Duration::from_millis(100),
            )
            .await?;
            stream
        }
        ChaosBroker::Kafka => {
            let partitions = i32::try_from(workers.max(4) * 2).unwrap_or(8);
            kafka(url).create_topic(name, partitions).await?;
            kafka(url).create_topic(&format!("{name}.dead"), 1).await?;
            name.to_owned()
        }
        ChaosBroker::Sqs => {
            // the default redrive policy: a message received 5 times goes to the dead-letter queue
            let options =
                idemgate::sqs::QueueOptions::default().with_visibility_timeout(visibility);
            let name = if fifo {
                format!("{name}.fifo")
            } else {
                name.to_owned()
            };
            idemgate::sqs::Sqs::local(url)
                .create_queue(&name, options)
                .await?
        }
    })
}

pub(super) async fn delete_destination(
    broker: ChaosBroker,
    url: &str,
    destination: &str,
) -> Result<(), BoxError> {
    match broker {
        ChaosBroker::Embedded => return Err(not_remote()),
        // the dead-letter session expires with its interval
        ChaosBroker::Mqtt => {}
        ChaosBroker::Rabbitmq => {
            let rabbit = idemgate::rabbitmq::RabbitMq::connect(url).await?;
            rabbit.delete(destination).await?;
            rabbit
                .delete(&idemgate::rabbitmq::dead_queue(destination))
                .await?;
            rabbit.close().await?;
        }
        ChaosBroker::Nats => {
            idemgate::nats::Nats::connect(url)
                .await?
                .delete_stream(destination)
                .await?;
        }
        ChaosBroker::Kafka => {
            kafka(url).delete_topic(destination).await?;
            kafka(url)
                .delete_topic(&format!("{destination}.dead"))
                .await?;
        }
        ChaosBroker::Sqs => {
            let sqs = idemgate::sqs::Sqs::local(url);
            sqs.delete_queue(destination).await?;
            sqs.delete_queue(&sqs_dead(destination)).await?;
        }
    }
    Ok(())
}

/// The URL of the dead-letter queue `create_queue` made beside the queue at `url`.
fn sqs_dead(url: &str) -> String {
    match url.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dead.fifo"),
        None => format!("{url}-dead"),
    }
}

/// The MQTT session that collects a phase's dead letters (`idemgate-dead/<topic>`).
async fn mqtt_dead_reader(
    host: &str,
    port: u16,
    name: &str,
) -> Result<(idemgate::mqtt::Mqtt, idemgate::mqtt::MqttSource), BoxError> {
    let session = idemgate::mqtt::Session::persistent(Duration::from_secs(3600));
    let mqtt = idemgate::mqtt::Mqtt::connect(host, port, &format!("{name}-dead"), session).await?;
    let source = mqtt.source(&format!("idemgate-dead/{name}/+")).await?;
    Ok((mqtt, source))
}

/// Reads the dead letters until nothing came for a few seconds.
pub(super) async fn dead_letters(
    broker: ChaosBroker,
    url: &str,
    destination: &str,
) -> Result<Vec<DeadLetter>, BoxError> {
    let quiet = Duration::from_secs(3);
    Ok(match broker {
        ChaosBroker::Embedded => return Err(not_remote()),
        ChaosBroker::Rabbitmq => {
            let rabbit = idemgate::rabbitmq::RabbitMq::connect(url).await?;
            let dead = idemgate::rabbitmq::dead_queue(destination);
            let found = drain(rabbit.source(&dead, 64).await?, quiet).await?;
            rabbit.close().await?;
            found
        }
        ChaosBroker::Nats => {
            let nats = idemgate::nats::Nats::connect(url).await?;
            let opts = idemgate::nats::ConsumerOptions::default();
            let subject = format!("{destination}.dead");
            drain(
                nats.source(destination, "dead", &subject, opts).await?,
                quiet,
            )
            .await?
        }
        ChaosBroker::Kafka => {
            let topic = format!("{destination}.dead");
            let group = format!("{destination}-dead");
            let source = kafka(url).source(&group, &[&topic], Default::default())?;
            // a group join on the Kafka-protocol broker takes seconds
            drain(source, Duration::from_secs(15)).await?
        }
        ChaosBroker::Mqtt => {
            let (host, port) = mqtt_addr(url)?;
            let (mqtt, source) = mqtt_dead_reader(&host, port, destination).await?;
            let found = drain(source, quiet).await?;
            mqtt.disconnect().await?;
            found
        }
        ChaosBroker::Sqs => {
            let sqs = idemgate::sqs::Sqs::local(url);
            drain(sqs.source(&sqs_dead(destination)).await?, quiet).await?
        }
    })
}

/// Receives and acks until nothing came for `quiet`.
async fn drain<S: Source>(mut source: S, quiet: Duration) -> Result<Vec<DeadLetter>, BoxError> {
    let mut found = Vec::new();
    while let Ok(next) = tokio::time::timeout(quiet, source.recv()).await {
        let Some(d) = next? else { break };
        let m = d.message();
        let id = m
            .event_id
            .clone()
            .or_else(|| {
                serde_json::from_slice::<Event>(&m.payload)
                    .ok()
                    .map(|e| e.id)
            })
            .unwrap_or_default();
        let reason = m
            .header(idemgate::consumer::DEAD_LETTER_REASON)
            .map(|r| String::from_utf8_lossy(r).into_owned());
        found.push(DeadLetter { id, reason });
        d.ack().await?;
    }
    Ok(found)
}

/// A producer on a real broker.
pub(crate) enum Producer {
    Rabbit {
        // the connection the sink's channel lives on
        _connection: idemgate::rabbitmq::RabbitMq,
        sink: idemgate::rabbitmq::RabbitSink,
        queue: String,
    },
    Nats(idemgate::nats::NatsSink, String),
    Kafka(idemgate::kafka::KafkaSink, String),
    Mqtt(idemgate::mqtt::Mqtt, String, usize),
    Sqs(idemgate::sqs::SqsSink, String),
}

impl Producer {
    pub(super) async fn connect(
        broker: ChaosBroker,
        url: &str,
        destination: &str,
        workers: usize,
    ) -> Result<Self, BoxError> {
        Ok(match broker {
            ChaosBroker::Embedded => return Err(not_remote()),
            ChaosBroker::Rabbitmq => {
                let rabbit = idemgate::rabbitmq::RabbitMq::connect(url).await?;
                let sink = rabbit.sink().await?;
                Producer::Rabbit {
                    _connection: rabbit,
                    sink,
                    queue: destination.to_owned(),
                }
            }
            ChaosBroker::Nats => {
                let nats = idemgate::nats::Nats::connect(url).await?;
                Producer::Nats(nats.sink(), destination.to_owned())
            }
            ChaosBroker::Kafka => Producer::Kafka(kafka(url).sink()?, destination.to_owned()),
            ChaosBroker::Mqtt => {
                let (host, port) = mqtt_addr(url)?;
                let client = format!("{destination}-producer-{}", rand::random::<u32>());
                let mqtt = idemgate::mqtt::Mqtt::connect(
                    &host,
                    port,
                    &client,
                    idemgate::mqtt::Session::clean(),
                )
                .await?;
                Producer::Mqtt(mqtt, destination.to_owned(), workers)
            }
            ChaosBroker::Sqs => {
                let sqs = idemgate::sqs::Sqs::local(url);
                Producer::Sqs(sqs.sink(), destination.to_owned())
            }
        })
    }

    /// Publishes `e`, whose JSON is `body`.
    pub(super) async fn publish(&self, e: &Event, body: Vec<u8>) -> Result<(), BoxError> {
        let id: EventId = e.id.parse()?;
        self.send(Outgoing::with_event_id("", body, id).with_ordering_key(e.key.clone()))
            .await
    }

    /// Publishes `out` to this producer's destination (its own `destination` is not used).
    pub(super) async fn send(&self, mut out: Outgoing) -> Result<(), BoxError> {
        let key = out.ordering_key.clone().unwrap_or_default();
        match self {
            Producer::Rabbit { sink, queue, .. } => {
                out.destination.clone_from(queue);
                sink.publish(&out).await?;
            }
            Producer::Nats(sink, stream) => {
                out.destination = format!("{stream}.events");
                sink.publish(&out).await?;
            }
            Producer::Kafka(sink, topic) => {
                out.destination.clone_from(topic);
                sink.publish(&out).await?;
            }
            Producer::Mqtt(mqtt, name, workers) => {
                // a key's events go to one slot's topic, as a key goes to one partition
                out.destination = mqtt_topic(name, key_slot(&key, *workers));
                mqtt.sink().publish(&out).await?;
            }
            Producer::Sqs(sink, url) => {
                out.destination.clone_from(url);
                sink.publish(&out).await?;
            }
        }
        Ok(())
    }
}

pub(super) async fn with_source<R>(
    route: Route<'_>,
    inbox: Option<&SqlInbox>,
    serve: impl AsyncServe<Output = R>,
) -> Result<R, BoxError> {
    let Route {
        broker,
        url,
        destination,
        slot,
        visibility,
        ..
    } = route;
    Ok(match broker {
        ChaosBroker::Embedded => return Err(not_remote()),
        ChaosBroker::Rabbitmq => {
            let rabbit = idemgate::rabbitmq::RabbitMq::connect(url).await?;
            serve.serve(rabbit.source(destination, 64).await?).await
        }
        ChaosBroker::Nats => {
            let nats = idemgate::nats::Nats::connect(url).await?;
            // the default MaxDeliver (20): no endless redelivery
            let opts = idemgate::nats::ConsumerOptions::default()
                .with_ack_wait(visibility)
                .with_dead_letter_subject(format!("{destination}.dead"));
            let subject = format!("{destination}.events");
            serve
                .serve(nats.source(destination, "chaos", &subject, opts).await?)
                .await
        }
        ChaosBroker::Kafka => {
            // the inbox keeps the positions: the source starts where the inbox says
            let options = match inbox {
                Some(inbox) => inbox.kafka_options(),
                None => idemgate::kafka::SourceOptions::new(),
            };
            let source = kafka(url).source(destination, &[destination], options)?;
            serve.serve(source).await
        }
        ChaosBroker::Mqtt => {
            let (host, port) = mqtt_addr(url)?;
            let session = idemgate::mqtt::Session::persistent(Duration::from_secs(3600))
                .with_receive_maximum(64);
            let client = format!("{destination}-{slot}");
            let mqtt = idemgate::mqtt::Mqtt::connect(&host, port, &client, session).await?;
            let source = mqtt.source(&mqtt_topic(destination, slot)).await?;
            let r = serve.serve(source).await;
            drop(mqtt);
            r
        }
        ChaosBroker::Sqs => {
            let sqs = idemgate::sqs::Sqs::local(url);
            serve.serve(sqs.source(destination).await?).await
        }
    })
}

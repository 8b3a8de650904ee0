//! `idemgate bridge`: events from a broker, POSTed to a service with their event id as the
//! `Idempotency-Key`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use idemgate::consumer::{Consumer, Message, Source, Stats};
use idemgate_sidecar::{Bridge, BridgeOptions};

use crate::BoxError;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum From {
    /// The embedded SQLite queue (`--queue-file`).
    Embedded,
    /// A RabbitMQ queue.
    #[cfg(feature = "brokers")]
    Rabbitmq,
    /// A NATS JetStream stream, through a durable pull consumer.
    #[cfg(feature = "brokers")]
    Nats,
    /// A Kafka topic, in a consumer group.
    #[cfg(feature = "brokers")]
    Kafka,
    /// An MQTT 5 topic filter, on a persistent session.
    #[cfg(feature = "brokers")]
    Mqtt,
    /// An SQS queue (by URL).
    #[cfg(feature = "brokers")]
    Sqs,
}

#[derive(Debug, Args)]
pub(crate) struct BridgeArgs {
    /// The broker to consume from (the real brokers need the CLI's `brokers` feature).
    #[arg(long, value_enum)]
    broker: From,
    /// The broker's address: `amqp://…`, `nats://…`, Kafka's `host:port,…`, MQTT's
    /// `host:port`, the SQS endpoint.
    #[arg(long, default_value = "")]
    broker_url: String,
    /// What to consume: the queue (RabbitMQ, embedded), the stream (NATS), the topic (Kafka),
    /// the topic filter (MQTT), the queue URL (SQS).
    #[arg(long)]
    from: String,
    /// The NATS subject filter (default: every subject of the stream).
    #[arg(long)]
    subject: Option<String>,
    /// The consumer group (Kafka), durable consumer (NATS) or client id (MQTT).
    #[arg(long, default_value = "idemgate-bridge")]
    group: String,
    /// Where dead letters go: the NATS subject (in a stream), the Kafka or MQTT topic. RabbitMQ
    /// dead-letters to `<queue>.dead`, SQS to the queue's redrive target, the embedded queue to
    /// `<queue>_dead`.
    #[arg(long)]
    dead_letter: Option<String>,
    /// The embedded queue's SQLite file.
    #[arg(long)]
    queue_file: Option<PathBuf>,
    /// The bridge's own store (its Gate: one delivery per event id at a time, completed ones
    /// acked without a request).
    #[arg(long)]
    store: String,
    /// The URL each event is POSTed to.
    #[arg(long)]
    to: String,
    /// A header sent with every request, `name: value` (repeatable): the principal header of a
    /// proxy in front of the service, a token.
    #[arg(long = "header", value_parser = header)]
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// How long the service has to answer (retried after it).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Tries before a message the service keeps failing (5xx, timeouts) is dead-lettered.
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// How long a key stays claimed by a bridge that died mid-request before another takes it
    /// over (renewed while the bridge lives).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// How long a delivered message waits for its ack before the broker delivers it again
    /// (NATS AckWait, the embedded queue's visibility; RabbitMQ requeues when the connection
    /// closes, SQS uses the queue's visibility timeout).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ack_wait: Duration,
    /// The scope of the bridge's keys in its store.
    #[arg(long, default_value = "bridge")]
    name: String,
}

fn header(s: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not `name: value`"))?;
    Ok((
        name.trim().parse().map_err(|e| format!("{name:?}: {e}"))?,
        value
            .trim()
            .parse()
            .map_err(|e| format!("{value:?}: {e}"))?,
    ))
}

pub(crate) fn run(args: BridgeArgs) -> Result<ExitCode, BoxError> {
    let mut opts = BridgeOptions::new(args.to.parse()?).with_timeout(args.timeout);
    for (name, value) in args.headers.iter().cloned() {
        opts = opts.with_header(name, value);
    }
    let bridge = Bridge::new(opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = crate::stores::opened(idemgate::open_checked(&args.store).await?);
        let consumer = Consumer::gate(args.name.clone(), store)
            .with_concurrency(args.concurrency)
            .with_max_attempts(args.max_attempts)
            .with_lease(args.lease)
            .with_handler_timeout(args.timeout + Duration::from_secs(5));
        eprintln!(
            "idemgate bridge: {:?} {} -> {}",
            args.broker, args.from, args.to
        );
        let stats = consume(&args, consumer, bridge).await?;
        eprintln!(
            "idemgate bridge: stopped; {} delivered, {} duplicates acked, {} dead-lettered",
            stats.handled, stats.duplicates, stats.dead_lettered
        );
        Ok(ExitCode::SUCCESS)
    })
}

async fn run_on<S: Source>(
    consumer: Consumer<idemgate::consumer::GateMode<idemgate::BoxStore>>,
    source: S,
    bridge: Bridge,
) -> idemgate::consumer::Result<Stats> {
    let handler = move |m: Message| {
        let b = bridge.clone();
        async move { b.deliver(m).await }
    };
    consumer
        .run(source, handler, idemgate::consumer::shutdown::signal())
        .await
}

type GateConsumer = Consumer<idemgate::consumer::GateMode<idemgate::BoxStore>>;

/// Connects to the broker and runs the bridge on its source until SIGTERM or Ctrl-C.
async fn consume(
    args: &BridgeArgs,
    consumer: GateConsumer,
    bridge: Bridge,
) -> Result<Stats, BoxError> {
    #[cfg(feature = "brokers")]
    let url = |default: &'static str| {
        if args.broker_url.is_empty() {
            default.to_owned()
        } else {
            args.broker_url.clone()
        }
    };
    Ok(match args.broker {
        From::Embedded => {
            let path = args
                .queue_file
                .as_ref()
                .ok_or("the embedded queue needs --queue-file")?;
            let queue = idemgate::sqlite::SqliteQueue::open(path, &args.from)?;
            let dead = idemgate::sqlite::SqliteQueue::open(path, &format!("{}_dead", args.from))?;
            let source =
                idemgate::sqlite::QueueSource::new(queue, args.ack_wait).with_dead_letters(dead);
            run_on(consumer, source, bridge).await?
        }
        #[cfg(feature = "brokers")]
        From::Rabbitmq => {
            let rabbit =
                idemgate::rabbitmq::RabbitMq::connect(&url("amqp://127.0.0.1:5672")).await?;
            run_on(consumer, rabbit.source(&args.from, 64).await?, bridge).await?
        }
        #[cfg(feature = "brokers")]
        From::Nats => {
            let nats = idemgate::nats::Nats::connect(&url("nats://127.0.0.1:4222")).await?;
            let mut opts = idemgate::nats::ConsumerOptions::default().with_ack_wait(args.ack_wait);
            if let Some(subject) = &args.dead_letter {
                opts = opts.with_dead_letter_subject(subject.clone());
            }
            let filter = args.subject.as_deref().unwrap_or("");
            let source = nats.source(&args.from, &args.group, filter, opts).await?;
            run_on(consumer, source, bridge).await?
        }
        #[cfg(feature = "brokers")]
        From::Kafka => {
            let mut opts = idemgate::kafka::SourceOptions::new();
            if let Some(topic) = &args.dead_letter {
                opts = opts.with_dead_letter_topic(topic.clone());
            }
            let kafka = idemgate::kafka::Kafka::new(&url("127.0.0.1:9092"));
            run_on(
                consumer,
                kafka.source(&args.group, &[&args.from], opts)?,
                bridge,
            )
            .await?
        }
        #[cfg(feature = "brokers")]
        From::Mqtt => {
            let addr = url("127.0.0.1:1883");
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or("the MQTT address is host:port")?;
            let session = idemgate::mqtt::Session::persistent(Duration::from_secs(3600));
            let mqtt =
                idemgate::mqtt::Mqtt::connect(host, port.parse()?, &args.group, session).await?;
            let mut source = mqtt.source(&args.from).await?;
            if let Some(topic) = &args.dead_letter {
                source = source.with_dead_letter_topic(topic.clone());
            }
            run_on(consumer, source, bridge).await?
        }
        #[cfg(feature = "brokers")]
        From::Sqs => {
            let sqs = idemgate::sqs::Sqs::local(&url("http://127.0.0.1:4566"));
            run_on(consumer, sqs.source(&args.from).await?, bridge).await?
        }
    })
}

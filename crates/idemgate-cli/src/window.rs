//! `idemgate check-window`: does a store's retention cover a broker's redelivery horizon?

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use idemgate::consumer::{Horizon, check_window};

use crate::BoxError;

/// Brokers whose horizon can be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum WindowBroker {
    /// NATS JetStream: AckWait × MaxDeliver of a durable consumer, or the stream's duplicate
    /// window if longer.
    Nats,
    /// SQS: VisibilityTimeout × maxReceiveCount of the queue's redrive policy (credentials from
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION).
    Sqs,
    /// Kafka: session timeout + poll interval + commit interval of the group's settings.
    Kafka,
}

#[derive(Debug, Args)]
pub(crate) struct CheckWindowArgs {
    /// How long the store keeps completed keys (or the inbox its rows): `90s`, `15m`, `24h`,
    /// `7d`.
    #[arg(long, value_parser = parse_duration)]
    retention: Duration,
    /// The broker.
    #[arg(long, value_enum)]
    broker: WindowBroker,
    /// NATS server URL, SQS endpoint URL, or Kafka bootstrap servers.
    #[arg(long)]
    url: String,
    /// NATS: the stream.
    #[arg(long, required_if_eq("broker", "nats"))]
    stream: Option<String>,
    /// NATS: the durable consumer.
    #[arg(long, required_if_eq("broker", "nats"))]
    durable: Option<String>,
    /// SQS: the queue URL.
    #[arg(long, required_if_eq("broker", "sqs"))]
    queue: Option<String>,
    /// Kafka: a consumer setting, `key=value` (repeatable), as the consumers use it.
    #[arg(short = 'X', value_parser = parse_setting)]
    set: Vec<(String, String)>,
}

/// `90s`, `15m`, `24h`, `7d`, or a number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 24h or 7d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?}: use s, m, h or d")),
    };
    // a century is longer than any broker keeps a message
    n.checked_mul(secs)
        .filter(|secs| *secs <= 100 * 366 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long: at most a century"))
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

async fn horizon(args: &CheckWindowArgs) -> Result<Horizon, BoxError> {
    Ok(match args.broker {
        WindowBroker::Nats => {
            let nats = idemgate::nats::Nats::connect(&args.url).await?;
            let (stream, durable) = (args.stream.as_deref(), args.durable.as_deref());
            nats.horizon(stream.unwrap_or_default(), durable.unwrap_or_default())
                .await?
        }
        WindowBroker::Sqs => {
            let env = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.into());
            let sqs = idemgate::sqs::Sqs::endpoint(
                &args.url,
                &env("AWS_REGION", "us-east-1"),
                &env("AWS_ACCESS_KEY_ID", "test"),
                &env("AWS_SECRET_ACCESS_KEY", "test"),
            );
            sqs.horizon(args.queue.as_deref().unwrap_or_default())
                .await?
        }
        WindowBroker::Kafka => args
            .set
            .iter()
            .fold(idemgate::kafka::Kafka::new(&args.url), |k, (key, v)| {
                k.with_setting(key, v)
            })
            .horizon(),
    })
}

/// Prints the verdict; exit status 0 when the retention covers the horizon, 1 when not.
pub(crate) fn run(args: CheckWindowArgs) -> Result<ExitCode, BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let horizon = rt.block_on(horizon(&args))?;
    let verdict = check_window(args.retention, horizon);
    println!("{verdict}");
    Ok(if verdict.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

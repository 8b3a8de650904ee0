//! `idemgate bench consumer --broker B --store S`: the same consumer without idemgate, in Gate
//! mode and in Inbox mode, on the same broker in the same run.
//!
//! Every measurement gets a fresh queue (topic, stream, subject) with the same number of
//! distinct events already published, and consumes them all with the same concurrency. The
//! ceilings are hand-written consumers: receive, run the handler, ack; for Inbox mode the bare
//! consumer writes the same effect row in its own transaction, so the difference is idemgate's
//! inbox row alone. A last measurement writes the effect row twice per message: what any second
//! row in the transaction costs on the same database in the same run, the floor under the inbox's
//! one row.

use std::collections::HashSet;
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use idemgate::consumer::memory::MemoryBroker;
use idemgate::consumer::{
    Consumer, Delivery, Inbox, InboxHandler, Message, Outgoing, Sink, Source, StatsHandle,
};
use idemgate::core::{BoxStore, EventId};
use idemgate::mysql::MySqlInbox;
use idemgate::postgres::PgInbox;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::BoxError;

/// The broker to measure on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchBroker {
    /// The in-process at-least-once broker (no network: the runtime's own cost).
    Memory,
    /// RabbitMQ (`amqp://guest:guest@127.0.0.1:5672/%2f`).
    Rabbitmq,
    /// NATS JetStream (`nats://127.0.0.1:4222`).
    Nats,
    /// Kafka protocol (`127.0.0.1:9092`).
    Kafka,
    /// MQTT 5 (`127.0.0.1:1883`).
    Mqtt,
    /// SQS (`http://127.0.0.1:4566`).
    Sqs,
}

/// `bench consumer`: the same consumer bare, in Gate mode and in Inbox mode.
#[derive(Debug, Args)]
pub struct ConsumerBench {
    /// The broker.
    #[arg(long, value_enum, default_value = "memory")]
    broker: BenchBroker,
    /// The broker's URL (default: the local one).
    #[arg(long)]
    url: Option<String>,
    /// The Gate's store (any store URL).
    #[arg(long, default_value = "memory:")]
    store: String,
    /// The handler's effect: one row written per message to this `postgres://` or `mysql://`
    /// database, in its own transaction (bare consumer, Gate mode) or in the inbox transaction
    /// (Inbox mode, measured only with an effect database). Default: no effect.
    #[arg(long)]
    effect: Option<String>,
    /// Messages per measurement.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    messages: u64,
    /// Messages handled at once.
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    concurrency: usize,
    /// Give the effect table a primary key on the event id, as a business table has: an index
    /// entry per effect row, like the inbox row's. Default: an unindexed table, the cheapest
    /// effect, where the inbox row weighs most.
    #[arg(long)]
    effect_key: bool,
    /// Deliveries per transaction in the batched Inbox-mode measurement.
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    inbox_batch: usize,
    /// Rounds; each figure is the median of its rounds, each ratio the median of the rounds'
    /// ratios. The order of the measurements rotates from one round to the next.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
}

/// A broker that can fill a fresh destination with `n` events and hand out a source for it.
trait Fill: Send + Sync {
    type Source: Source;
    fn fill(&self, n: u64) -> impl Future<Output = Result<Self::Source, BoxError>> + Send;
}

static FRESH: AtomicU64 = AtomicU64::new(0);

fn fresh(what: &str) -> String {
    format!(
        "idemgate-bench-{what}-{}-{}",
        std::process::id(),
        FRESH.fetch_add(1, Ordering::Relaxed)
    )
}

/// Publishes `n` distinct events to `destination` from 32 concurrent publishers.
async fn publish<K: Sink>(sink: Arc<K>, destination: &str, n: u64) -> Result<(), BoxError> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..32 {
        let (sink, next, dest) = (Arc::clone(&sink), Arc::clone(&next), destination.to_owned());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                sink.publish(&Outgoing::new(&dest, "{\"amount\":1}"))
                    .await?;
            }
            Ok::<_, BoxError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

struct Memory;

impl Fill for Memory {
    type Source = idemgate::consumer::memory::MemorySource;
    async fn fill(&self, n: u64) -> Result<Self::Source, BoxError> {
        let broker = MemoryBroker::new();
        for _ in 0..n {
            broker.send(
                Message::new("bench", "{\"amount\":1}").with_event_id(EventId::new().to_string()),
            );
        }
        Ok(broker.source())
    }
}

struct Rabbit(
    idemgate::rabbitmq::RabbitMq,
    Arc<idemgate::rabbitmq::RabbitSink>,
);

impl Fill for Rabbit {
    type Source = idemgate::rabbitmq::RabbitSource;
    async fn fill(&self, n: u64) -> Result<Self::Source, BoxError> {
        let queue = fresh("q");
        self.0.declare(&queue).await?;
        publish(Arc::clone(&self.1), &queue, n).await?;
        Ok(self.0.source(&queue, 256).await?)
    }
}

struct Nats(idemgate::nats::Nats);

impl Fill for Nats {
    type Source = idemgate::nats::NatsSource;
    async fn fill(&self, n: u64) -> Result<Self::Source, BoxError> {
        let name = fresh("s").replace('-', "_");
        let subject = format!("{name}.events");
        self.0
            .stream(&name, vec![subject.clone()], Duration::from_secs(60))
            .await?;
        publish(Arc::new(self.0.sink()), &subject, n).await?;
        let mut opts = idemgate::nats::ConsumerOptions::default();
        opts.max_ack_pending = 1024;
        Ok(self.0.source(&name, "bench", &subject, opts).await?)
    }
}

struct Kafka(
    idemgate::kafka::Kafka,
    Option<idemgate::kafka::SourceOptions>,
);

impl Fill for Kafka {
    type Source = idemgate::kafka::KafkaSource;
    async fn fill(&self, n: u64) -> Result<Self::Source, BoxError> {
        let topic = fresh("t");
        self.0.create_topic(&topic, 16).await?;
        publish(Arc::new(self.0.sink()?), &topic, n).await?;
        let options = self.1.clone().unwrap_or_default();
        Ok(self.0.source(&fresh("g"), &[&topic], options)?)
    }
}

struct Mqtt(String, u16);

impl Fill for Mqtt {
    type Source = idemgate::mqtt::MqttSource;
    async fn fill(&self, n: u64) -> Result<Self::Source, BoxError> {
        use idemgate::mqtt::{Mqtt, Session};
        let topic = fresh("m");
        let session = Session::persistent(Duration::from_secs(600)).with_receive_maximum(1024);
        let consumer = Mqtt::connect(&self.0, self.1, &fresh("c"), session).await?;
        let source = consumer.source(&topic).await?;
        let producer = Mqtt::connect(&self.0, self.1, &fresh("p"), Session::clean()).await?;
        publish(Arc::new(producer.sink()), &topic, n).await?;
        // the connection lives as long as the process: the bench is short
        std::mem::forget(consumer);
        Ok(source)
    }
}

struct Sqs(idemgate::sqs::Sqs);

impl Fill for Sqs {
    type Source = idemgate::sqs::SqsSource;
    async fn fill(&self, n: u64) -> Result<Self::Source, BoxError> {
        let url = self
            .0
            .create_queue(&fresh("q"), idemgate::sqs::QueueOptions::default())
            .await?;
        publish(Arc::new(self.0.sink()), &url, n).await?;
        Ok(self.0.source(&url).await?)
    }
}

/// Waits until `handled` reaches `n` and notes when.
async fn finished(stats: StatsHandle, n: u64, at: Arc<OnceLock<Instant>>) {
    while stats.get().handled < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = at.set(Instant::now());
}

fn rate(n: u64, start: Instant, at: &OnceLock<Instant>) -> f64 {
    let end = at.get().copied().unwrap_or_else(Instant::now);
    n as f64 / (end - start).as_secs_f64()
}

/// A hand-written consumer: receive, run `effect`, ack; `concurrency` effects at once. Like the
/// runtime, it acks behind the effect (up to `concurrency` acks in flight), so the two differ
/// only in what idemgate adds. With `batch` > 1, the deliveries that are ready together (up to
/// `batch`) go to one `effect` call: the ceiling for Inbox mode's batches.
async fn bare<S, F, Fut>(
    mut source: S,
    n: u64,
    concurrency: usize,
    batch: usize,
    effect: F,
) -> Result<f64, BoxError>
where
    S: Source,
    F: Fn(Vec<Message>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send,
{
    let permits = Arc::new(Semaphore::new(concurrency));
    let acking = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    // a receiving task feeds a queue (a source's `recv` need not survive being cancelled), from
    // which the effects take what is ready
    let (queue, mut ready) = tokio::sync::mpsc::channel(concurrency * batch);
    let receiver = tokio::spawn(async move {
        for _ in 0..n {
            let d = source.recv().await?.ok_or("the source ended early")?;
            if queue.send(d).await.is_err() {
                break;
            }
        }
        Ok::<_, BoxError>(())
    });
    let mut received = 0;
    while received < n {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let mut ds = Vec::with_capacity(batch);
        if ready.recv_many(&mut ds, batch).await == 0 {
            break;
        }
        received += ds.len() as u64;
        let (effect, acking) = (effect.clone(), Arc::clone(&acking));
        tasks.spawn(async move {
            effect(ds.iter().map(|d| d.message().clone()).collect()).await?;
            let ack_slot = acking.acquire_owned().await?;
            drop(permit);
            for d in ds {
                d.ack().await?;
            }
            drop(ack_slot);
            Ok::<_, BoxError>(())
        });
    }
    receiver.await??;
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn gate<S, F, Fut>(
    source: S,
    store: &BoxStore,
    n: u64,
    c: usize,
    effect: F,
) -> Result<f64, BoxError>
where
    S: Source,
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let consumer = Consumer::gate("bench", store.clone())
        .with_concurrency(c)
        .with_retention(Duration::from_secs(3600));
    let at = Arc::new(OnceLock::new());
    let done = finished(consumer.stats_handle(), n, Arc::clone(&at));
    let start = Instant::now();
    consumer.run(source, effect, done).await?;
    Ok(rate(n, start, &at))
}

async fn inbox_mode<S: Source, I: Inbox>(
    source: S,
    inbox: I,
    handler: impl InboxHandler<I::Tx, Message>,
    n: u64,
    c: usize,
    batch: usize,
) -> Result<f64, BoxError> {
    // a failed run is retried after 1 ms (default 500 ms): the line with failures measures
    // the work they cost, not the wait before their retry
    let consumer = Consumer::inbox("bench", inbox)
        .with_concurrency(c)
        .with_batch(batch)
        .with_retry_delay(Duration::from_millis(1));
    let at = Arc::new(OnceLock::new());
    let done = finished(consumer.stats_handle(), n, Arc::clone(&at));
    let start = Instant::now();
    consumer.run(source, handler, done).await?;
    Ok(rate(n, start, &at))
}

type EffectFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

#[derive(Clone)]
enum Effect {
    Postgres(sqlx::PgPool, Arc<String>),
    MySql(sqlx::MySqlPool, Arc<String>),
}

/// The event ids of a message's effect rows after its first (`rows` in all).
fn suffixed(m: &Message, rows: usize) -> impl Iterator<Item = Option<String>> + '_ {
    (1..rows).map(move |r| m.event_id.as_ref().map(|id| format!("{id}#{r}")))
}

/// The SQL side: the pool, the effect table and the inbox.
enum Sql {
    Postgres(sqlx::PgPool, String, PgInbox),
    MySql(sqlx::MySqlPool, String, MySqlInbox),
}

impl Sql {
    async fn open(url: &str, keyed: bool) -> Result<Option<Self>, BoxError> {
        let effects = fresh("effects").replace('-', "_");
        let key = if keyed { " PRIMARY KEY" } else { "" };
        let inbox_table = fresh("inbox").replace('-', "_");
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(32)
                .connect(url)
                .await?;
            sqlx::query(&format!(
                "CREATE TABLE {effects} (event TEXT NOT NULL{key})"
            ))
            .execute(&pool)
            .await?;
            let inbox = PgInbox::new(pool.clone()).with_table(inbox_table);
            inbox.migrate().await?;
            return Ok(Some(Sql::Postgres(pool, effects, inbox)));
        }
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let url = url.replacen("mariadb://", "mysql://", 1);
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(32)
                .connect(&url)
                .await?;
            sqlx::query(&format!(
                "CREATE TABLE {effects} (event VARCHAR(80) NOT NULL{key})"
            ))
            .execute(&pool)
            .await?;
            let inbox = MySqlInbox::new(pool.clone()).with_table(inbox_table);
            inbox.migrate().await?;
            return Ok(Some(Sql::MySql(pool, effects, inbox)));
        }
        Ok(None)
    }

    /// The effect outside the inbox: one row per message, the batch in its own transaction.
    fn effect(&self) -> impl Fn(Vec<Message>) -> EffectFuture + Clone + Send + Sync + 'static {
        self.effect_rows(1)
    }

    /// The effect with `rows` rows per message: two is what any second row in the transaction
    /// costs, the floor for Inbox mode's inbox row. Rows after a message's first carry its event
    /// id with a suffix, distinct under `--effect-key`.
    fn effect_rows(
        &self,
        rows: usize,
    ) -> impl Fn(Vec<Message>) -> EffectFuture + Clone + Send + Sync + 'static {
        let sql = match self {
            Sql::Postgres(pool, effects, _) => Effect::Postgres(
                pool.clone(),
                Arc::new(format!("INSERT INTO {effects} (event) VALUES ($1)")),
            ),
            Sql::MySql(pool, effects, _) => Effect::MySql(
                pool.clone(),
                Arc::new(format!("INSERT INTO {effects} (event) VALUES (?)")),
            ),
        };
        move |ms: Vec<Message>| -> EffectFuture {
            let sql = sql.clone();
            Box::pin(async move {
                match sql {
                    Effect::Postgres(pool, q) => {
                        let mut tx = pool.begin().await?;
                        for m in &ms {
                            sqlx::query(&q).bind(&m.event_id).execute(&mut *tx).await?;
                            for more in suffixed(m, rows) {
                                sqlx::query(&q).bind(more).execute(&mut *tx).await?;
                            }
                        }
                        tx.commit().await?;
                    }
                    Effect::MySql(pool, q) => {
                        let mut tx = pool.begin().await?;
                        for m in &ms {
                            sqlx::query(&q).bind(&m.event_id).execute(&mut *tx).await?;
                            for more in suffixed(m, rows) {
                                sqlx::query(&q).bind(more).execute(&mut *tx).await?;
                            }
                        }
                        tx.commit().await?;
                    }
                }
                Ok(())
            })
        }
    }

    /// Inbox mode: the inbox row and the same effect row in one transaction; with `failing`,
    /// one handler in 16 fails once, after writing its row.
    async fn inbox<S: Source>(
        &self,
        source: S,
        n: u64,
        c: usize,
        batch: usize,
        failing: bool,
    ) -> Result<f64, BoxError> {
        let failed = failing.then(Mutex::default);
        match self {
            Sql::Postgres(_, effects, inbox) => {
                let h = Insert(format!("INSERT INTO {effects} (event) VALUES ($1)"), failed);
                inbox_mode(source, inbox.clone(), h, n, c, batch).await
            }
            Sql::MySql(_, effects, inbox) => {
                let h = Insert(format!("INSERT INTO {effects} (event) VALUES (?)"), failed);
                inbox_mode(source, inbox.clone(), h, n, c, batch).await
            }
        }
    }
}

/// Inbox mode's effect: the event's row, by this statement. With a set of the events that
/// failed, one event in 16 (by its id's hash) fails once, after its row.
struct Insert(String, Option<Mutex<HashSet<String>>>);

impl Insert {
    /// Whether this run of `msg` fails: the first of an event picked to fail.
    fn fails(&self, msg: &Message) -> bool {
        let (Some(failed), Some(id)) = (&self.1, &msg.event_id) else {
            return false;
        };
        BuildHasherDefault::<DefaultHasher>::default().hash_one(id) % 16 == 0
            && failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone())
    }
}

macro_rules! insert_in {
    ($tx:ty) => {
        impl InboxHandler<$tx, Message> for Insert {
            async fn handle(&self, tx: &mut $tx, msg: &Message) -> Result<(), BoxError> {
                sqlx::query(&self.0)
                    .bind(&msg.event_id)
                    .execute(tx.as_mut())
                    .await?;
                if self.fails(msg) {
                    return Err("one event in 16 fails once".into());
                }
                Ok(())
            }
        }
    };
}
insert_in!(idemgate::postgres::PgTx);
insert_in!(idemgate::mysql::MySqlTx);

/// What every measurement of a run shares.
struct Run<'a, F> {
    broker: &'a F,
    store: &'a BoxStore,
    sql: Option<&'a Sql>,
    b: &'a ConsumerBench,
}

impl<F: Fill> Run<'_, F> {
    /// Measurement `i` (its row in the table), on a fresh destination.
    async fn measure(&self, i: usize) -> Result<f64, BoxError> {
        let b = self.b;
        let (n, c, batch) = (b.messages, b.concurrency, b.inbox_batch);
        let source = self.broker.fill(n).await?;
        let Some(sql) = self.sql else {
            return match i {
                0 => bare(source, n, c, 1, |_| async { Ok(()) }).await,
                _ => gate(source, self.store, n, c, |_| async { Ok(()) }).await,
            };
        };
        match i {
            0 => bare(source, n, c, 1, sql.effect()).await,
            1 => {
                let one = sql.effect();
                gate(source, self.store, n, c, move |m| one(vec![m])).await
            }
            2 => sql.inbox(source, n, c, 1, false).await,
            3 => bare(source, n, c, batch, sql.effect()).await,
            4 => sql.inbox(source, n, c, batch, false).await,
            5 => bare(source, n, c, 1, sql.effect_rows(2)).await,
            _ => sql.inbox(source, n, c, batch, true).await,
        }
    }

    /// Round `r`: every measurement once. The order rotates from one round to the next, so a
    /// slow phase of the machine (or a growing table) weighs on each measurement in turn.
    async fn round(&self, r: usize) -> Result<Vec<f64>, BoxError> {
        let k = if self.sql.is_some() { 7 } else { 2 };
        let mut rates = vec![0.0; k];
        for j in 0..k {
            let i = (j + r) % k;
            rates[i] = self.measure(i).await?;
        }
        Ok(rates)
    }
}

async fn rounds<F: Fill>(broker: F, b: &ConsumerBench) -> Result<Vec<Vec<f64>>, BoxError> {
    let store = idemgate::open(&b.store).await?;
    let sql = match &b.effect {
        Some(url) => Some(
            Sql::open(url, b.effect_key)
                .await?
                .ok_or("--effect takes a postgres:// or mysql:// URL")?,
        ),
        None => None,
    };
    let run = Run {
        broker: &broker,
        store: &store,
        sql: sql.as_ref(),
        b,
    };
    let mut all = Vec::new();
    for r in 0..b.rounds.max(1) as usize {
        all.push(run.round(r).await?);
    }
    Ok(all)
}

pub(crate) async fn run(b: ConsumerBench) -> Result<ExitCode, BoxError> {
    let url = |default: &str| b.url.clone().unwrap_or_else(|| default.to_owned());
    let all = match b.broker {
        BenchBroker::Memory => rounds(Memory, &b).await?,
        BenchBroker::Rabbitmq => {
            let rabbit = idemgate::rabbitmq::RabbitMq::connect(&url(
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ))
            .await?;
            let sink = Arc::new(rabbit.sink().await?);
            rounds(Rabbit(rabbit, sink), &b).await?
        }
        BenchBroker::Nats => {
            rounds(
                Nats(idemgate::nats::Nats::connect(&url("nats://127.0.0.1:4222")).await?),
                &b,
            )
            .await?
        }
        BenchBroker::Kafka => {
            let kafka = idemgate::kafka::Kafka::new(&url("127.0.0.1:9092"))
                .with_setting("session.timeout.ms", "6000")
                .with_setting("heartbeat.interval.ms", "500");
            rounds(Kafka(kafka, None), &b).await?
        }
        BenchBroker::Mqtt => {
            let u = url("127.0.0.1:1883");
            let (host, port) = u.rsplit_once(':').ok_or("--url for mqtt is host:port")?;
            rounds(Mqtt(host.to_owned(), port.parse()?), &b).await?
        }
        BenchBroker::Sqs => {
            rounds(
                Sqs(idemgate::sqs::Sqs::local(&url("http://127.0.0.1:4566"))),
                &b,
            )
            .await?
        }
    };
    let median = |i: usize| crate::median(all.iter().map(|r| r[i]));
    let effect = match (&b.effect, b.effect_key) {
        (None, _) => "none".to_owned(),
        (Some(url), false) => format!("{url} (unindexed)"),
        (Some(url), true) => format!("{url} (primary key)"),
    };
    // each line: its name, the measurement it shows, and the ceiling it is compared with
    let lines = [
        ("bare consumer (receive, effect, ack)".to_owned(), 0, None),
        (
            format!("Gate mode on {} (claim, effect, complete, ack)", b.store),
            1,
            Some(0),
        ),
        (
            "Inbox mode (inbox row + effect in one transaction, ack)".to_owned(),
            2,
            Some(0),
        ),
        (
            format!(
                "bare consumer, up to {} deliveries per transaction",
                b.inbox_batch
            ),
            3,
            None,
        ),
        (
            format!(
                "Inbox mode, up to {} deliveries per transaction",
                b.inbox_batch
            ),
            4,
            Some(3),
        ),
        (
            "bare consumer writing its effect row twice (any 2nd row)".to_owned(),
            5,
            None,
        ),
        (
            "  Inbox mode, one per transaction, against that".to_owned(),
            2,
            Some(5),
        ),
        (
            format!(
                "Inbox mode, up to {}, 1 handler in 16 failing once (vs clean)",
                b.inbox_batch
            ),
            6,
            Some(4),
        ),
    ];
    println!(
        "{:?} broker, effect {effect}, {} messages, concurrency {}, median of {} rounds",
        b.broker,
        b.messages,
        b.concurrency,
        all.len()
    );
    println!("{:<66} {:>9} {:>8}", "measurement", "msg/s", "vs bare");
    for (name, i, ceiling) in lines.iter().filter(|l| l.1 < all[0].len()) {
        let r = median(*i);
        match ceiling {
            Some(c) => {
                // each round against the ceiling measured in that same round
                let ratio = crate::median(all.iter().map(|r| r[*i] / r[*c]));
                println!("{name:<66} {r:>9.0} {:>7.0}%", 100.0 * ratio)
            }
            None => println!("{name:<66} {r:>9.0} {:>8}", "(ceil.)"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

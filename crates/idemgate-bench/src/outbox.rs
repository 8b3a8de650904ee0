//! `idemgate bench outbox --broker B --store S`: the transactional outbox beside its ceilings,
//! in one run.
//!
//! - **Relay vs bare producer**: the relay publishing `--messages` committed rows (batches of
//!   256, published at once) against the same sink publishing the same messages from 256 tasks,
//!   with the same confirms.
//! - **Enqueue vs a bare second insert**: a business transaction (one effect row) with the
//!   outbox row against the same transaction with a second plain row of the same size, from 16
//!   clients.
//! - **Commit to publish**: at a fixed offered rate, the time from each enqueue's commit to the
//!   broker's confirm of its publish by a running relay (woken by `LISTEN/NOTIFY` on
//!   PostgreSQL, polling elsewhere), p50 and p99.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use idemgate::consumer::memory::MemoryBroker;
use idemgate::consumer::{Inbox, Outbox, Outgoing, Relay, Sink};
use idemgate::mysql::{MySqlInbox, MySqlOutbox};
use idemgate::postgres::{PgInbox, PgOutbox};
use tokio::task::JoinSet;

use crate::BoxError;

/// The broker to publish to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutboxBroker {
    /// In-process (no network: the database's share alone).
    Memory,
    /// RabbitMQ with publisher confirms.
    Rabbitmq,
    /// NATS JetStream (`Nats-Msg-Id`, a publish ack per message).
    Nats,
    /// Kafka protocol, idempotent producer.
    Kafka,
}

/// `bench outbox`: the relay, the enqueue and commit-to-publish latency.
#[derive(Debug, Args)]
pub struct OutboxBench {
    /// The broker.
    #[arg(long, value_enum, default_value = "memory")]
    broker: OutboxBroker,
    /// The broker's URL (default: the local one).
    #[arg(long)]
    url: Option<String>,
    /// The outbox's database: `postgres://…` or `mysql://…`.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    store: String,
    /// Messages per throughput measurement.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    messages: u64,
    /// The offered rate of the latency measurement, events per second.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    rate: u64,
    /// How long the latency measurement offers its rate, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    latency_secs: u64,
    /// Rounds; ratios are medians of per-round ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    rounds: u64,
}

static FRESH: AtomicU64 = AtomicU64::new(0);

fn fresh(what: &str) -> String {
    format!(
        "idemgate_bench_{what}_{}_{}",
        std::process::id(),
        FRESH.fetch_add(1, Ordering::Relaxed)
    )
}

/// A sink on a fresh destination of the broker.
enum AnySink {
    Memory(MemoryBroker),
    Rabbit(
        idemgate::rabbitmq::RabbitSink,
        String,
        idemgate::rabbitmq::RabbitMq,
    ),
    Nats(idemgate::nats::NatsSink, String),
    Kafka(idemgate::kafka::KafkaSink, String),
}

impl AnySink {
    async fn connect(broker: OutboxBroker, url: Option<&str>) -> Result<Self, BoxError> {
        let url = |default: &'static str| url.map_or(default.to_owned(), str::to_owned);
        Ok(match broker {
            OutboxBroker::Memory => AnySink::Memory(MemoryBroker::new()),
            OutboxBroker::Rabbitmq => {
                let rabbit = idemgate::rabbitmq::RabbitMq::connect(&url(
                    "amqp://guest:guest@127.0.0.1:5672/%2f",
                ))
                .await?;
                let queue = fresh("q");
                rabbit.declare(&queue).await?;
                AnySink::Rabbit(rabbit.sink().await?, queue, rabbit)
            }
            OutboxBroker::Nats => {
                let nats = idemgate::nats::Nats::connect(&url("nats://127.0.0.1:4222")).await?;
                let name = fresh("s");
                let subject = format!("{name}.events");
                nats.stream(&name, vec![subject.clone()], Duration::from_secs(60))
                    .await?;
                AnySink::Nats(nats.sink(), subject)
            }
            OutboxBroker::Kafka => {
                let kafka = idemgate::kafka::Kafka::new(&url("127.0.0.1:9092"));
                let topic = fresh("t");
                kafka.create_topic(&topic, 16).await?;
                AnySink::Kafka(kafka.sink()?, topic)
            }
        })
    }

    fn destination(&self) -> &str {
        match self {
            AnySink::Memory(_) => "bench",
            AnySink::Rabbit(_, d, _) | AnySink::Nats(_, d) | AnySink::Kafka(_, d) => d,
        }
    }

    /// Deletes what `connect` made (the memory broker goes with the process).
    async fn delete(&self) {
        match self {
            AnySink::Rabbit(_, q, rabbit) => {
                let _ = rabbit.delete(q).await;
            }
            AnySink::Memory(_) | AnySink::Nats(..) | AnySink::Kafka(..) => {}
        }
    }
}

impl Sink for AnySink {
    async fn publish(&self, msg: &Outgoing) -> idemgate::consumer::Result<()> {
        match self {
            AnySink::Memory(s) => s.publish(msg).await,
            AnySink::Rabbit(s, ..) => s.publish(msg).await,
            AnySink::Nats(s, _) => s.publish(msg).await,
            AnySink::Kafka(s, _) => s.publish(msg).await,
        }
    }
}

/// A sink that records, for messages whose payload is a commit time, how long after it the
/// publish was confirmed.
struct Timed {
    inner: Arc<AnySink>,
    epoch: Instant,
    latencies: Arc<Mutex<Vec<Duration>>>,
}

impl Sink for Timed {
    async fn publish(&self, msg: &Outgoing) -> idemgate::consumer::Result<()> {
        self.inner.publish(msg).await?;
        if let Some(at) = std::str::from_utf8(&msg.payload)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Duration::from_micros(now.saturating_sub(at)));
        }
        Ok(())
    }
}

/// The outbox, its inbox (for transactions) and a table for the business row, on one database.
trait Db: Clone + Send + Sync + 'static {
    type Outbox: Outbox<Tx = <Self::Inbox as Inbox>::Tx> + Clone;
    type Inbox: Inbox + Clone;
    fn outbox(&self) -> &Self::Outbox;
    fn inbox(&self) -> &Self::Inbox;
    /// Inserts a business row into `table` in `tx`.
    fn insert(
        &self,
        tx: &mut <Self::Inbox as Inbox>::Tx,
        table: &str,
        id: &str,
        payload: &[u8],
    ) -> impl std::future::Future<Output = Result<(), BoxError>> + Send;
    fn ddl(&self, sql: String) -> impl std::future::Future<Output = Result<(), BoxError>> + Send;
}

/// A [`Db`] on one sqlx database: its inbox, outbox, transaction type and placeholders.
macro_rules! db {
    ($name:ident, $inbox:ty, $outbox:ty, $tx:ty, $values:literal) => {
        #[derive(Clone)]
        struct $name($inbox, $outbox);

        impl Db for $name {
            type Outbox = $outbox;
            type Inbox = $inbox;
            fn outbox(&self) -> &$outbox {
                &self.1
            }
            fn inbox(&self) -> &$inbox {
                &self.0
            }
            async fn insert(
                &self,
                tx: &mut $tx,
                table: &str,
                id: &str,
                payload: &[u8],
            ) -> Result<(), BoxError> {
                sqlx::query(&format!(
                    concat!("INSERT INTO {} (id, payload) VALUES ", $values),
                    table
                ))
                .bind(id)
                .bind(payload)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }
            async fn ddl(&self, sql: String) -> Result<(), BoxError> {
                sqlx::raw_sql(&sql).execute(self.0.pool()).await?;
                Ok(())
            }
        }
    };
}

db!(Pg, PgInbox, PgOutbox, idemgate::postgres::PgTx, "($1, $2)");
db!(
    My,
    MySqlInbox,
    MySqlOutbox,
    idemgate::mysql::MySqlTx,
    "(?, ?)"
);

const PAYLOAD: &[u8] = &[b'x'; 200];

/// One round's figures: bare producer and relay msg/s, bare and outbox transactions/s.
struct Round {
    bare: f64,
    relay: f64,
    two_rows: f64,
    outbox_tx: f64,
}

async fn enqueue_all<D: Db>(db: &D, dest: &str, n: u64) -> Result<(), BoxError> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..16 {
        let (db, next, dest) = (db.clone(), Arc::clone(&next), dest.to_owned());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let mut tx = db.inbox().begin().await?;
                db.outbox()
                    .enqueue(&mut tx, &Outgoing::new(&dest, PAYLOAD))
                    .await?;
                db.inbox().commit(tx).await?;
            }
            Ok::<_, BoxError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// Transactions per second from 16 clients, each a business row and `second` (the outbox row,
/// or a plain row in `plain`).
async fn transactions<D: Db>(
    db: &D,
    dest: &str,
    effects: &str,
    plain: Option<&str>,
    n: u64,
) -> Result<f64, BoxError> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    for _ in 0..16 {
        let (db, next) = (db.clone(), Arc::clone(&next));
        let (effects, plain) = (effects.to_owned(), plain.map(str::to_owned));
        let dest = dest.to_owned();
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, BoxError>(());
                }
                let id = idemgate::core::EventId::new().to_string();
                let mut tx = db.inbox().begin().await?;
                db.insert(&mut tx, &effects, &id, PAYLOAD).await?;
                match &plain {
                    Some(t) => db.insert(&mut tx, t, &id, PAYLOAD).await?,
                    None => {
                        db.outbox()
                            .enqueue(&mut tx, &Outgoing::new(&dest, PAYLOAD))
                            .await?;
                    }
                }
                db.inbox().commit(tx).await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn drain<D: Db>(db: &D, sink: Arc<AnySink>) -> Result<f64, BoxError> {
    let relay = Relay::new(db.outbox().clone(), sink)
        .with_batch(256)
        .with_poll(Duration::from_millis(10));
    let start = Instant::now();
    let mut published = 0;
    loop {
        let round = relay.round().await?;
        if round.taken == 0 {
            break;
        }
        published += round.published;
    }
    Ok(published as f64 / start.elapsed().as_secs_f64())
}

async fn bare(sink: Arc<AnySink>, n: u64) -> Result<f64, BoxError> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    for _ in 0..256 {
        let (sink, next) = (Arc::clone(&sink), Arc::clone(&next));
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let dest = sink.destination().to_owned();
                sink.publish(&Outgoing::new(dest, PAYLOAD)).await?;
            }
            Ok::<_, BoxError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn round<D: Db>(db: &D, b: &OutboxBench, sink: Arc<AnySink>) -> Result<Round, BoxError> {
    let dest = sink.destination().to_owned();
    let bare = bare(Arc::clone(&sink), b.messages).await?;
    enqueue_all(db, &dest, b.messages).await?;
    let relay = drain(db, Arc::clone(&sink)).await?;
    let (effects, plain) = (fresh("effects"), fresh("plain"));
    for t in [&effects, &plain] {
        db.ddl(format!(
            "CREATE TABLE {t} (id VARCHAR(64) PRIMARY KEY, payload {} NOT NULL)",
            if b.store.starts_with("mysql") {
                "BLOB"
            } else {
                "BYTEA"
            }
        ))
        .await?;
    }
    let n = b.messages;
    let two_rows = transactions(db, &dest, &effects, Some(&plain), n).await?;
    let outbox_tx = transactions(db, &dest, &effects, None, n).await?;
    // the rows the enqueue measurement left: published and gone, so the next round starts empty
    drain(db, sink).await?;
    for t in [&effects, &plain] {
        db.ddl(format!("DROP TABLE {t}")).await?;
    }
    Ok(Round {
        bare,
        relay,
        two_rows,
        outbox_tx,
    })
}

/// Commit-to-confirm latencies at the offered rate, with a relay running.
async fn latency<D: Db>(
    db: &D,
    b: &OutboxBench,
    sink: Arc<AnySink>,
) -> Result<Vec<Duration>, BoxError> {
    let epoch = Instant::now();
    let dest = sink.destination().to_owned();
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let timed = Timed {
        inner: sink,
        epoch,
        latencies: Arc::clone(&latencies),
    };
    let relay = Relay::new(db.outbox().clone(), timed).with_batch(256);
    let stop = Arc::new(OnceLock::new());
    let running = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            relay
                .run(async move {
                    while stop.get().is_none() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await
        })
    };
    // let the relay connect its listener and go idle first
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = b.rate * b.latency_secs;
    let interval = Duration::from_secs_f64(1.0 / b.rate as f64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    for _ in 0..total {
        tick.tick().await;
        let (db, dest) = (db.clone(), dest.clone());
        tasks.spawn(async move {
            let mut tx = db.inbox().begin().await?;
            // the payload is stamped just before the commit, the latency read after the confirm
            let at = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(0);
            db.outbox()
                .enqueue(&mut tx, &Outgoing::new(dest, at.to_string()))
                .await?;
            db.inbox().commit(tx).await?;
            Ok::<_, BoxError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while (latencies.lock().unwrap_or_else(|e| e.into_inner()).len() as u64) < total
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.set(());
    running.await??;
    let mut v = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort_unstable();
    Ok(v)
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    // the nearest rank: `p` of the way from the first to the last
    let last = v.len() - 1;
    let i = (1..=last)
        .take_while(|&i| (i as f64) <= last as f64 * p + 0.5)
        .last()
        .unwrap_or(0);
    v[i]
}

async fn measure<D: Db>(db: D, b: &OutboxBench) -> Result<(), BoxError> {
    let sink = Arc::new(AnySink::connect(b.broker, b.url.as_deref()).await?);
    let mut rounds = Vec::new();
    for _ in 0..b.rounds {
        rounds.push(round(&db, b, Arc::clone(&sink)).await?);
    }
    let lat = latency(&db, b, Arc::clone(&sink)).await?;
    sink.delete().await;
    let m = |f: fn(&Round) -> f64| crate::median(rounds.iter().map(f));
    println!(
        "{:?} broker, outbox on {}, {} messages, median of {} rounds",
        b.broker,
        b.store,
        b.messages,
        rounds.len()
    );
    println!("{:<58} {:>10} {:>8}", "measurement", "per s", "ratio");
    println!(
        "{:<58} {:>10.0} {:>8}",
        "bare producer, 256 publishes at once",
        m(|r| r.bare),
        "(ceil.)"
    );
    println!(
        "{:<58} {:>10.0} {:>7.0}%",
        "relay, batches of 256 (take, publish, mark)",
        m(|r| r.relay),
        100.0 * m(|r| r.relay / r.bare)
    );
    println!(
        "{:<58} {:>10.0} {:>8}",
        "transaction: business row + a bare 2nd row",
        m(|r| r.two_rows),
        "(ceil.)"
    );
    println!(
        "{:<58} {:>10.0} {:>7.0}%",
        "transaction: business row + the outbox row",
        m(|r| r.outbox_tx),
        100.0 * m(|r| r.outbox_tx / r.two_rows)
    );
    println!(
        "commit -> confirm at {}/s for {} s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} events)",
        b.rate,
        b.latency_secs,
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        lat.len()
    );
    Ok(())
}

pub(crate) async fn run(b: OutboxBench) -> Result<ExitCode, BoxError> {
    let table = fresh("outbox");
    if b.store.starts_with("postgres") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(24)
            .connect(&b.store)
            .await?;
        let outbox = PgOutbox::new(pool.clone()).with_table(&table);
        outbox.migrate().await?;
        let r = measure(Pg(PgInbox::new(pool.clone()), outbox.clone()), &b).await;
        outbox
            .table()
            .drop_tables(&mut *pool.acquire().await?)
            .await?;
        r?;
    } else if b.store.starts_with("mysql") || b.store.starts_with("mariadb") {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(24)
            .connect(&b.store.replacen("mariadb://", "mysql://", 1))
            .await?;
        let outbox = MySqlOutbox::new(pool.clone()).with_table(&table);
        outbox.migrate().await?;
        let r = measure(My(MySqlInbox::new(pool.clone()), outbox.clone()), &b).await;
        outbox
            .table()
            .drop_tables(&mut *pool.acquire().await?)
            .await?;
        r?;
    } else {
        return Err("--store takes a postgres:// or mysql:// URL".into());
    }
    Ok(ExitCode::SUCCESS)
}

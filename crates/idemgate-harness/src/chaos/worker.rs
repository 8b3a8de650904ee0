//! One chaos worker process: the real consumer runtime (or a naive consumer) on a real broker,
//! applying each event's effect to the ledger.
//!
//! It tells the supervisor on stdout what it does: `READY` once subscribed, `RECV <id>` per
//! delivery, `DEAD <id>` per dead letter, `STATS <handled> <duplicates> <fenced>` now and then.
//! At its planned kill point it says `AT <point> <id>` and parks for the supervisor's SIGKILL; at
//! its planned zombie point it says `ZOMBIE <id>` and waits for an empty line on stdin, which the
//! supervisor sends after SIGSTOP, a wait past the lease, and SIGCONT.
//!
//! The supervisor arms kills over stdin (`ARM <point>`, `DISARM`; `ZOMBIE` brings a planned
//! zombie forward): the worker picks its next message delivered for the second time (or, armed
//! for 1 s without one, its next message), and stops at the point on that message's way, or
//! before its ack if the way does not pass the point (a duplicate):
//! `AT <point> <id> redelivery|fresh`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use clap::{Args, ValueEnum};
use idemgate::consumer::{Consumer, Delivery, InboxHandler, Message, Source, StatsHandle};
use idemgate::core::{BoxStore, Key};
use idemgate::mysql::{MySqlInbox, MySqlOffsets};
use idemgate::postgres::{PgInbox, PgOffsets};
use idemgate::sqlite::{SqliteInbox, SqliteOffsets, Synchronous};
use tokio::sync::Semaphore;

use super::broker::{AsyncServe, ChaosBroker, Route, with_source};
use super::ledger::{
    Ledger, Tables, apply_mysql, apply_pg, apply_sqlite, is_mysql, is_postgres, sqlite_path,
};
use super::{CONSUMER, Event};
use crate::BoxError;
use crate::arm::park;
use idemgate_testkit::kill::{HookedInbox, HookedStore, KillPoint, KillPoints, Watched, id_of};

/// How a worker handles a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum WorkerMode {
    /// Receive, apply, ack: no idempotency.
    Naive,
    /// The consumer runtime in Gate mode on `--store`.
    Gate,
    /// The consumer runtime in Inbox mode on the `--store` database (which holds the ledger).
    Inbox,
}

impl WorkerMode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            WorkerMode::Naive => "naive",
            WorkerMode::Gate => "gate",
            WorkerMode::Inbox => "inbox",
        }
    }
}

/// The settings of one chaos worker process.
#[derive(Debug, Args)]
pub struct ChaosWorkerArgs {
    #[arg(long, value_enum)]
    broker: ChaosBroker,
    #[arg(long, default_value = "")]
    url: String,
    /// The queue, stream, topic or queue URL.
    #[arg(long)]
    destination: String,
    /// The phase directory (the embedded queue lives there).
    #[arg(long)]
    dir: PathBuf,
    /// This worker's slot (its MQTT session and topic).
    #[arg(long)]
    slot: usize,
    #[arg(long, value_enum)]
    mode: WorkerMode,
    #[arg(long)]
    store: Option<String>,
    #[arg(long)]
    ledger: String,
    /// Prefix of the ledger's (and inbox's) tables.
    #[arg(long)]
    prefix: String,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    lease_ms: u64,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    visibility_ms: u64,
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    concurrency: usize,
    /// Inbox mode: deliveries that share one transaction.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    inbox_batch: usize,
    /// Apply the Gate-mode effect without a derived key.
    #[arg(long)]
    no_derived_keys: bool,
    #[arg(long)]
    die_at: Option<KillPoint>,
    #[arg(long, default_value_t = 0)]
    die_after: u64,
    #[arg(long)]
    zombie_after: Option<u64>,
}

/// Says one line to the supervisor.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The planned kill and zombie points.
#[derive(Debug)]
struct Hooks {
    die_at: Option<KillPoint>,
    die_after: u64,
    zombie_after: Option<u64>,
    /// The supervisor asked for the planned zombie now (`ZOMBIE` on stdin).
    zombie_now: AtomicBool,
    seen: AtomicU64,
    zombied: AtomicBool,
    /// The kill the supervisor armed over stdin, if any.
    tail: std::sync::Mutex<Option<Tail>>,
    /// Empty lines on stdin: the supervisor thawed this zombie.
    thaw: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    /// Held (shared) by every ledger and store operation in flight; the zombie takes it
    /// exclusively before it freezes, so it freezes holding its lease but no transaction or
    /// database lock (a process frozen inside one stalls every other worker on its locks: a
    /// different fault, which the database's own timeouts answer, not fencing).
    io: tokio::sync::RwLock<()>,
}

/// A kill armed by the supervisor.
#[derive(Debug)]
struct Tail {
    point: KillPoint,
    since: std::time::Instant,
    /// The message it stops on, and whether that was a redelivery.
    target: Option<(String, bool)>,
}

/// How long an armed kill waits for a redelivery before it takes any message.
const REDELIVERY_WAIT: Duration = Duration::from_secs(1);

impl Hooks {
    /// Reads the supervisor's lines from stdin in a thread of its own: `ARM <point>` and
    /// `DISARM` set the tail kill, an empty line thaws a zombie.
    fn listen(self: &Arc<Self>, thaw: std::sync::mpsc::Sender<()>) {
        let hooks = Arc::clone(self);
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                let mut tail = hooks.tail.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(point) = line.strip_prefix("ARM ") {
                    let point = KillPoint::ALL.into_iter().find(|p| p.name() == point);
                    // armed again at the same point: it keeps its wait and its message
                    if tail.as_ref().map(|t| t.point) != point {
                        *tail = point.map(|point| Tail {
                            point,
                            since: std::time::Instant::now(),
                            target: None,
                        });
                    }
                } else if line == "DISARM" {
                    *tail = None;
                } else if line == "ZOMBIE" {
                    hooks.zombie_now.store(true, Ordering::Relaxed);
                } else if thaw.send(()).is_err() {
                    return;
                }
            }
        });
    }

    /// Picks `msg` for the armed kill: a redelivery, or any message once armed for a while.
    fn pick(&self, msg: &Message) {
        let mut guard = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tail) = guard.as_mut().filter(|t| t.target.is_none()) else {
            return;
        };
        // a first redelivery: killing a message's handlers again and again would spend the
        // broker's own delivery budget (SQS redrive, a quorum queue's limit), which is the
        // broker's answer to a message that kills its consumers, not a fault to test here
        let redelivery = match msg.deliveries {
            Some(n) => n == 2,
            None => msg.redelivered,
        };
        if redelivery || tail.since.elapsed() >= REDELIVERY_WAIT {
            tail.target = Some((id_of(msg).to_owned(), redelivery));
        }
    }

    /// Parks here for the SIGKILL if this is the planned point, or the armed kill's.
    fn at(&self, p: KillPoint, id: &str) {
        if self.die_at == Some(p) && self.seen.load(Ordering::Relaxed) >= self.die_after {
            say(&format!("AT {} {id}", p.name()));
            park();
        }
        let armed = {
            let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
            tail.as_ref().and_then(|t| match &t.target {
                Some((target, redelivery))
                    if target == id && (p == t.point || p == KillPoint::BeforeAck) =>
                {
                    Some(*redelivery)
                }
                _ => None,
            })
        };
        if let Some(redelivery) = armed {
            let what = if redelivery { "redelivery" } else { "fresh" };
            say(&format!("AT {} {id} {what}", p.name()));
            park();
        }
    }

    /// Stops the whole process here (it blocks the runtime's only thread) until the supervisor
    /// has frozen and thawed it, if this is the planned zombie.
    async fn zombie(&self, id: &str) {
        let due = self
            .zombie_after
            .is_some_and(|n| self.seen.load(Ordering::Relaxed) >= n)
            || self.zombie_now.load(Ordering::Relaxed);
        if due && !self.zombied.swap(true, Ordering::Relaxed) {
            let _no_io = self.io.write().await;
            say(&format!("ZOMBIE {id}"));
            let _ = self.thaw.lock().unwrap_or_else(|e| e.into_inner()).recv();
        }
    }
}

impl KillPoints for Hooks {
    fn reach(&self, point: KillPoint, id: &str) {
        self.at(point, id);
    }

    fn received(&self, msg: &Message) {
        self.seen.fetch_add(1, Ordering::Relaxed);
        say(&format!("RECV {}", id_of(msg)));
        self.pick(msg);
    }

    fn dead_lettered(&self, id: &str) {
        say(&format!("DEAD {id}"));
    }

    fn io(&self) -> Option<&tokio::sync::RwLock<()>> {
        Some(&self.io)
    }
}

fn event_of(msg: &Message) -> Result<Event, BoxError> {
    Ok(serde_json::from_slice(&msg.payload)?)
}

/// The inbox on the store's database, with the ledger's tables beside it.
#[derive(Clone)]
pub(crate) enum SqlInbox {
    Postgres(PgInbox),
    MySql(MySqlInbox),
    Sqlite(SqliteInbox),
}

impl SqlInbox {
    /// The inbox of a phase, on `url`, named after `prefix`.
    pub(crate) async fn open(url: &str, prefix: &str, pool: u32) -> Result<Self, BoxError> {
        let (inbox, offsets) = (format!("{prefix}_inbox"), format!("{prefix}_offsets"));
        if is_postgres(url) {
            let p = sqlx::postgres::PgPoolOptions::new()
                .max_connections(pool)
                .connect(url)
                .await?;
            let i = PgInbox::new(p)
                .with_table(inbox)
                .with_offsets(PgOffsets::new().with_table(offsets));
            return Ok(SqlInbox::Postgres(i));
        }
        if is_mysql(url) {
            let p = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(pool)
                .connect(&url.replacen("mariadb://", "mysql://", 1))
                .await?;
            let i = MySqlInbox::new(p)
                .with_table(inbox)
                .with_offsets(MySqlOffsets::new().with_table(offsets));
            return Ok(SqlInbox::MySql(i));
        }
        if let Some(path) = sqlite_path(url) {
            // synchronous=NORMAL: every commit survives a process kill, which is the fault here
            let i = SqliteInbox::open_with(path, Synchronous::Normal)?
                .with_table(inbox)
                .with_offsets(SqliteOffsets::new().with_table(offsets));
            return Ok(SqlInbox::Sqlite(i));
        }
        Err(format!(
            "inbox mode needs a postgres://, mysql:// or sqlite: store (the inbox commits with the effect), not {url:?}"
        )
        .into())
    }

    pub(crate) async fn migrate(&self) -> Result<(), BoxError> {
        match self {
            SqlInbox::Postgres(i) => i.migrate().await?,
            SqlInbox::MySql(i) => i.migrate().await?,
            SqlInbox::Sqlite(i) => i.migrate().await?,
        }
        Ok(())
    }

    /// Drops the inbox and offsets tables.
    pub(crate) async fn drop_tables(&self, url: &str, prefix: &str) -> Result<(), BoxError> {
        for t in ["inbox", "offsets"] {
            let stmt = format!("DROP TABLE IF EXISTS {prefix}_{t}");
            match self {
                SqlInbox::Postgres(i) => {
                    sqlx::query(&stmt).execute(i.pool()).await?;
                }
                SqlInbox::MySql(i) => {
                    sqlx::query(&stmt).execute(i.pool()).await?;
                }
                // the file goes with the run directory, unless it is elsewhere
                SqlInbox::Sqlite(_) => {
                    if let Some(path) = sqlite_path(url) {
                        rusqlite::Connection::open(path)?.execute(&stmt, [])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Kafka source options that start where the inbox's offsets say.
    #[cfg(feature = "brokers")]
    pub(crate) fn kafka_options(&self) -> idemgate::kafka::SourceOptions {
        let options = idemgate::kafka::SourceOptions::new();
        match self {
            SqlInbox::Postgres(i) => options.with_positions_from(i.clone()),
            SqlInbox::MySql(i) => options.with_positions_from(i.clone()),
            SqlInbox::Sqlite(i) => options.with_positions_from(i.clone()),
        }
    }
}

/// Runs one chaos worker process until the supervisor kills or stops it.
pub fn run(args: ChaosWorkerArgs) -> Result<ExitCode, BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (thaw_tx, thaw_rx) = std::sync::mpsc::channel();
    rt.block_on(async {
        let hooks = Arc::new(Hooks {
            die_at: args.die_at,
            die_after: args.die_after,
            zombie_after: args.zombie_after,
            zombie_now: AtomicBool::new(false),
            seen: AtomicU64::new(0),
            zombied: AtomicBool::new(false),
            tail: std::sync::Mutex::default(),
            thaw: std::sync::Mutex::new(thaw_rx),
            io: tokio::sync::RwLock::new(()),
        });
        hooks.listen(thaw_tx);
        let pool = u32::try_from(args.concurrency).unwrap_or(8).clamp(2, 32);
        let store = match (args.mode, &args.store) {
            (WorkerMode::Gate, Some(url)) => Some(idemgate::open(url).await?),
            (WorkerMode::Gate, None) => return Err("gate mode needs --store".into()),
            _ => None,
        };
        let inbox = match (args.mode, &args.store) {
            (WorkerMode::Inbox, Some(url)) => Some(SqlInbox::open(url, &args.prefix, pool).await?),
            (WorkerMode::Inbox, None) => return Err("inbox mode needs --store".into()),
            _ => None,
        };
        let ledger = Ledger::open(&args.ledger, &args.prefix, pool).await?;
        let serve = Serve {
            args: &args,
            hooks,
            ledger,
            store,
            inbox: inbox.clone(),
        };
        let route = Route {
            broker: args.broker,
            url: &args.url,
            destination: &args.destination,
            dir: &args.dir,
            slot: args.slot,
            visibility: Duration::from_millis(args.visibility_ms),
        };
        with_source(route, inbox.as_ref(), serve).await?
    })?;
    // a source only ends when the broker closes it: the supervisor starts another worker
    Ok(ExitCode::from(3))
}

struct Serve<'a> {
    args: &'a ChaosWorkerArgs,
    hooks: Arc<Hooks>,
    ledger: Ledger,
    store: Option<BoxStore>,
    inbox: Option<SqlInbox>,
}

/// Reports `stats` every 250 ms.
fn report(stats: impl Fn() -> (u64, u64, u64) + Send + 'static) {
    tokio::spawn(async move {
        loop {
            let (handled, duplicates, fenced) = stats();
            say(&format!("STATS {handled} {duplicates} {fenced}"));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

fn report_consumer(stats: StatsHandle) {
    report(move || {
        let s = stats.get();
        (s.handled, s.duplicates, s.fenced)
    });
}

impl AsyncServe for Serve<'_> {
    type Output = Result<(), BoxError>;

    async fn serve<S: Source>(self, source: S) -> Result<(), BoxError> {
        let Serve {
            args,
            hooks,
            ledger,
            store,
            inbox,
        } = self;
        let source = Watched::new(source, Arc::clone(&hooks));
        let lease = Duration::from_millis(args.lease_ms);
        let forever = std::future::pending::<()>();
        say("READY");
        match args.mode {
            WorkerMode::Naive => naive(source, ledger, hooks, args.concurrency).await,
            WorkerMode::Gate => {
                let store =
                    HookedStore::new(store.ok_or("gate mode needs a store")?, Arc::clone(&hooks));
                let consumer = Consumer::gate(CONSUMER, store)
                    .with_concurrency(args.concurrency)
                    .with_lease(lease)
                    .with_busy_delay(lease / 2)
                    .with_retention(Duration::from_secs(86_400));
                report_consumer(consumer.stats_handle());
                let derived = !args.no_derived_keys;
                let handler = move |msg: Message| {
                    let (ledger, hooks) = (ledger.clone(), Arc::clone(&hooks));
                    async move {
                        let e = event_of(&msg)?;
                        if ledger.planned_failure(&e).await? {
                            return Err("a poison event's planned failure".into());
                        }
                        hooks.zombie(&e.id).await;
                        hooks.at(KillPoint::AfterClaim, &e.id);
                        // the external effect honours the key derived from the event's key, so
                        // a re-run after a crash before `complete` is a no-op there
                        let key = Key::new(CONSUMER, &e.id)?.derive("ledger");
                        let io = hooks.io.read().await;
                        if !ledger.apply(&e, derived.then_some(&key)).await? {
                            // a re-run of an effect done before a kill or a freeze, whose
                            // completion was not recorded: the Gate's window
                            say(&format!("REPEAT {}", e.id));
                        }
                        drop(io);
                        hooks.at(KillPoint::AfterEffect, &e.id);
                        Ok::<(), BoxError>(())
                    }
                };
                consumer.run(source, handler, forever).await?;
                Ok(())
            }
            WorkerMode::Inbox => {
                let inbox = inbox.ok_or("inbox mode needs a store")?;
                let handler = Apply {
                    hooks: Arc::clone(&hooks),
                    ledger: ledger.clone(),
                    tables: Tables::new(&args.prefix),
                };
                macro_rules! inbox_consumer {
                    ($inbox:expr) => {{
                        let inbox = HookedInbox::new($inbox, Arc::clone(&hooks));
                        let consumer = Consumer::inbox(CONSUMER, inbox)
                            .with_concurrency(args.concurrency)
                            .with_batch(args.inbox_batch)
                            .with_lease(lease);
                        report_consumer(consumer.stats_handle());
                        consumer.run(source, handler, forever).await?;
                    }};
                }
                match inbox {
                    SqlInbox::Postgres(i) => inbox_consumer!(i),
                    SqlInbox::MySql(i) => inbox_consumer!(i),
                    SqlInbox::Sqlite(i) => inbox_consumer!(i),
                }
                Ok(())
            }
        }
    }
}

/// Inbox mode's handler: the ledger's effect in the inbox's transaction, between the kill
/// points.
struct Apply {
    hooks: Arc<Hooks>,
    ledger: Ledger,
    tables: Tables,
}

macro_rules! apply_in {
    ($tx:ty, $apply:ident) => {
        impl InboxHandler<$tx, Message> for Apply {
            async fn handle(&self, tx: &mut $tx, msg: &Message) -> Result<(), BoxError> {
                let e = event_of(msg)?;
                if self.ledger.planned_failure(&e).await? {
                    return Err("a poison event's planned failure".into());
                }
                self.hooks.at(KillPoint::AfterClaim, &e.id);
                $apply(&mut *tx, &self.tables, &e).await?;
                // for the trace (`--dir`): the effect, to commit or roll back with the inbox row
                say(&format!("RAN {} {} {}", e.id, e.key, e.seq));
                self.hooks.at(KillPoint::AfterEffect, &e.id);
                Ok(())
            }
        }
    };
}
apply_in!(idemgate::postgres::PgTx, apply_pg);
apply_in!(idemgate::mysql::MySqlTx, apply_mysql);
apply_in!(idemgate::sqlite::SqliteTx, apply_sqlite);

/// The consumer without idemgate: receive, apply, ack.
async fn naive<S: Source>(
    mut source: S,
    ledger: Ledger,
    hooks: Arc<Hooks>,
    concurrency: usize,
) -> Result<(), BoxError> {
    let handled = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&handled);
    report(move || (counter.load(Ordering::Relaxed), 0, 0));
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    loop {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let Some(d) = source.recv().await? else {
            return Ok(());
        };
        let (ledger, hooks, handled) = (ledger.clone(), Arc::clone(&hooks), Arc::clone(&handled));
        tokio::spawn(async move {
            let _permit = permit;
            let applied = async {
                let e = event_of(d.message())?;
                hooks.zombie(&e.id).await;
                hooks.at(KillPoint::AfterClaim, &e.id);
                let io = hooks.io.read().await;
                ledger.apply(&e, None).await?;
                drop(io);
                hooks.at(KillPoint::AfterEffect, &e.id);
                hooks.at(KillPoint::AfterComplete, &e.id);
                Ok::<(), BoxError>(())
            }
            .await;
            match applied {
                Ok(()) => {
                    handled.fetch_add(1, Ordering::Relaxed);
                    let _ = d.ack().await;
                }
                Err(e) => {
                    eprintln!("effect failed: {e}");
                    let _ = d.nack(Duration::from_millis(200)).await;
                }
            }
        });
    }
}

//! `idemgate chaos --pipeline`: a two-stage consume-transform-produce chain under kills.
//!
//! Billing consumes orders and, in one inbox transaction, applies each to its ledger and
//! enqueues an `invoice` in the outbox; relays publish the outbox; the ledger consumes the
//! invoices with its own inbox. Every stage runs as real processes that the supervisor kills
//! at named points (billing after its commit and inside its transaction, the relay after its
//! publish and before its mark, and mid-batch, the ledger after its commit) and restarts,
//! beside broker and database restarts. The naive chain commits, then publishes, with no
//! dedup. Both report the orders lost, those applied twice, and whether the totals agree.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use idemgate::consumer::{Consumer, Delivery, InboxHandler, Message, Outbox, Relay, Sink, Source};
use idemgate::core::{Backlog, DeadRow, EventId, OutboxRow, Outgoing};
use idemgate::mysql::MySqlOutbox;
use idemgate::postgres::PgOutbox;
use idemgate::sqlite::SqliteOutbox;
use idemgate_testkit::kill::{HookedInbox, KillPoint, KillPoints, Watched};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::broker::{AsyncServe, ChaosBroker, Producer, Route, with_source};
use super::ledger::{Ledger, Tables, apply_mysql, apply_pg, apply_sqlite};
use super::worker::SqlInbox;
use super::{ChaosArgs, Event, key_of, shell};
use crate::BoxError;
use crate::arm::{Armed, arm, disarm, park};

/// What one chain's run shows.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Figures {
    pub(crate) events: u64,
    pub(crate) kills: u64,
    /// Orders whose invoice never reached the ledger.
    pub(crate) lost: u64,
    /// Orders applied more than once, by billing or by the ledger.
    pub(crate) applied_twice: u64,
    /// Billing's total equals the ledger's.
    pub(crate) totals_agree: bool,
    /// Deliveries of invoices the ledger received beyond one per order: what its inbox
    /// deduplicated (idemgate) or applied again (naive).
    pub(crate) downstream_duplicates: u64,
    pub(crate) kills_at: std::collections::BTreeMap<String, u64>,
    pub(crate) store_restarts: u64,
    pub(crate) broker_restarts: u64,
    pub(crate) seconds: f64,
}

/// The roles of a pipeline's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Role {
    Billing,
    Relay,
    Ledger,
    NaiveBilling,
    NaiveLedger,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Billing | Role::NaiveBilling => "billing",
            Role::Relay => "relay",
            Role::Ledger | Role::NaiveLedger => "ledger",
        }
    }
}

/// The settings of a pipeline process (`idemgate chaos-pipeline`, hidden).
#[derive(Debug, Args, Clone)]
pub struct ChaosPipelineArgs {
    #[arg(long, value_enum)]
    role: Role,
    #[arg(long, value_enum)]
    broker: ChaosBroker,
    #[arg(long)]
    url: String,
    #[arg(long)]
    store: String,
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    orders: String,
    #[arg(long)]
    invoices: String,
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 0)]
    slot: usize,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    #[arg(long, default_value_t = 2000)]
    visibility_ms: u64,
}

/// Kill points a pipeline process stops at when armed: the supervisor's `ARM <point>`.
struct Stops(Arc<Armed>);

impl Stops {
    fn at(&self, point: &str) {
        if self.0.stop_at(point) {
            park();
        }
    }
}

impl KillPoints for Stops {
    fn reach(&self, point: KillPoint, _id: &str) {
        match point {
            KillPoint::AfterComplete => self.at("after-commit"),
            KillPoint::BeforeAck => self.at("before-ack"),
            _ => {}
        }
    }

    fn received(&self, _msg: &Message) {
        say("RECV");
    }
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn tables(prefix: &str, stage: &str) -> String {
    format!("{prefix}_{stage}")
}

/// The outbox on the store's database.
#[derive(Clone, Debug)]
enum SqlOutbox {
    Postgres(PgOutbox),
    MySql(MySqlOutbox),
    Sqlite(SqliteOutbox),
}

impl SqlOutbox {
    fn of(inbox: &SqlInbox, url: &str, prefix: &str) -> Result<Self, BoxError> {
        let table = tables(prefix, "outbox");
        Ok(match inbox {
            SqlInbox::Postgres(i) => {
                SqlOutbox::Postgres(PgOutbox::new(i.pool().clone()).with_table(table))
            }
            SqlInbox::MySql(i) => {
                SqlOutbox::MySql(MySqlOutbox::new(i.pool().clone()).with_table(table))
            }
            SqlInbox::Sqlite(_) => {
                let path = super::ledger::sqlite_path(url).ok_or("not a sqlite: URL")?;
                SqlOutbox::Sqlite(SqliteOutbox::open(path)?.with_table(table))
            }
        })
    }

    async fn migrate(&self) -> Result<(), BoxError> {
        match self {
            SqlOutbox::Postgres(o) => o.migrate().await?,
            SqlOutbox::MySql(o) => o.migrate().await?,
            SqlOutbox::Sqlite(o) => o.migrate().await?,
        }
        Ok(())
    }

    async fn backlog(&self) -> Result<Backlog, BoxError> {
        Ok(match self {
            SqlOutbox::Postgres(o) => o.backlog().await?,
            SqlOutbox::MySql(o) => o.backlog().await?,
            SqlOutbox::Sqlite(o) => o.backlog().await?,
        })
    }

    async fn drop_tables(&self, url: &str) -> Result<(), BoxError> {
        match self {
            SqlOutbox::Postgres(o) => {
                o.table()
                    .drop_tables(&mut *o.pool().acquire().await?)
                    .await?
            }
            SqlOutbox::MySql(o) => {
                o.table()
                    .drop_tables(&mut *o.pool().acquire().await?)
                    .await?
            }
            SqlOutbox::Sqlite(o) => {
                if let Some(path) = super::ledger::sqlite_path(url) {
                    let conn = rusqlite::Connection::open(path)?;
                    idemgate::sqlite::ready(
                        o.table()
                            .drop_tables(&mut idemgate::sqlite::Lite::new(&conn)),
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// The invoice billing makes of an order: the order's id, amount, key and place (so the
/// ledger's rows line up with billing's) as its body, and its own event id, fixed here.
fn invoice(order: &Event) -> Result<Outgoing, BoxError> {
    Ok(Outgoing::new("invoices", serde_json::to_vec(order)?).with_ordering_key(order.key.clone()))
}

fn event_of(msg: &Message) -> Result<Event, BoxError> {
    Ok(serde_json::from_slice(&msg.payload)?)
}

async fn apply_pg_tx(tx: &mut idemgate::postgres::PgTx, t: &Tables, e: &Event) -> sqlx::Result<()> {
    apply_pg(tx, t, e).await
}

async fn apply_mysql_tx(
    tx: &mut idemgate::mysql::MySqlTx,
    t: &Tables,
    e: &Event,
) -> sqlx::Result<()> {
    apply_mysql(tx, t, e).await
}

/// Billing: the order's effect and its invoice in the inbox's transaction.
struct Billing {
    outbox: SqlOutbox,
    tables: Tables,
    stops: Arc<Stops>,
}

macro_rules! billing_handler {
    ($tx:ty, $outbox:ident, $apply:expr) => {
        impl InboxHandler<$tx, Message> for Billing {
            async fn handle(&self, tx: &mut $tx, msg: &Message) -> Result<(), BoxError> {
                let e = event_of(msg)?;
                $apply(tx, &self.tables, &e).await?;
                let SqlOutbox::$outbox(outbox) = &self.outbox else {
                    return Err("the outbox is not on the inbox's database".into());
                };
                outbox.enqueue(tx, &invoice(&e)?).await?;
                self.stops.at("in-transaction");
                Ok(())
            }
        }
    };
}

billing_handler!(idemgate::postgres::PgTx, Postgres, apply_pg_tx);
billing_handler!(idemgate::mysql::MySqlTx, MySql, apply_mysql_tx);
billing_handler!(idemgate::sqlite::SqliteTx, Sqlite, apply_sqlite);

/// The ledger: the invoice's effect in its inbox's transaction.
struct Apply {
    tables: Tables,
}

macro_rules! ledger_handler {
    ($tx:ty, $apply:expr) => {
        impl InboxHandler<$tx, Message> for Apply {
            async fn handle(&self, tx: &mut $tx, msg: &Message) -> Result<(), BoxError> {
                let e = event_of(msg)?;
                $apply(tx, &self.tables, &e).await?;
                Ok(())
            }
        }
    };
}

ledger_handler!(idemgate::postgres::PgTx, apply_pg_tx);
ledger_handler!(idemgate::mysql::MySqlTx, apply_mysql_tx);
ledger_handler!(idemgate::sqlite::SqliteTx, apply_sqlite);

/// The relay's outbox, stopping at `before-mark` when armed.
#[derive(Clone)]
struct Marks<O>(O, Arc<Stops>);

impl<O: Outbox> Outbox for Marks<O> {
    type Tx = O::Tx;

    async fn enqueue(&self, tx: &mut O::Tx, msg: &Outgoing) -> idemgate::core::Result<()> {
        self.0.enqueue(tx, msg).await
    }

    async fn take(
        &self,
        owner: &str,
        limit: usize,
        lease: Duration,
    ) -> idemgate::core::Result<Vec<OutboxRow>> {
        self.0.take(owner, limit, lease).await
    }

    async fn sent(&self, ids: &[i64]) -> idemgate::core::Result<()> {
        if !ids.is_empty() {
            self.1.at("before-mark");
        }
        self.0.sent(ids).await
    }

    async fn retry(
        &self,
        owner: &str,
        id: i64,
        delay: Duration,
        error: &str,
    ) -> idemgate::core::Result<bool> {
        self.0.retry(owner, id, delay, error).await
    }

    async fn release(&self, owner: &str, ids: &[i64]) -> idemgate::core::Result<()> {
        self.0.release(owner, ids).await
    }

    async fn dead_letter(
        &self,
        owner: &str,
        id: i64,
        reason: &str,
    ) -> idemgate::core::Result<bool> {
        self.0.dead_letter(owner, id, reason).await
    }

    async fn purge_sent(&self, retention: Duration, limit: usize) -> idemgate::core::Result<u64> {
        self.0.purge_sent(retention, limit).await
    }

    async fn backlog(&self) -> idemgate::core::Result<Backlog> {
        self.0.backlog().await
    }

    async fn dead_letters(&self, limit: usize) -> idemgate::core::Result<Vec<DeadRow>> {
        self.0.dead_letters(limit).await
    }

    async fn wait(&self, timeout: Duration) -> bool {
        self.0.wait(timeout).await
    }
}

/// The relay's sink: the invoices destination, stopping `mid-batch` (after a publish) when
/// armed.
struct Publish(Producer, Arc<Stops>);

impl Sink for Publish {
    async fn publish(&self, msg: &Outgoing) -> idemgate::consumer::Result<()> {
        self.0
            .publish_outgoing(msg)
            .await
            .map_err(|e| idemgate::consumer::Error::broker("chaos", "publishing an invoice", e))?;
        self.1.at("mid-batch");
        Ok(())
    }
}

struct Serve<'a> {
    args: &'a ChaosPipelineArgs,
    stops: Arc<Stops>,
    inbox: Option<SqlInbox>,
}

impl AsyncServe for Serve<'_> {
    type Output = Result<(), BoxError>;

    async fn serve<S: Source>(self, source: S) -> Result<(), BoxError> {
        let Serve { args, stops, inbox } = self;
        let source = Watched::new(source, Arc::clone(&stops));
        let forever = std::future::pending::<()>();
        say("READY");
        match args.role {
            Role::Billing | Role::Ledger => {
                let inbox = inbox.ok_or("no inbox")?;
                let stage = if args.role == Role::Billing {
                    "billing"
                } else {
                    "ledger"
                };
                let t = Tables::new(&tables(&args.prefix, stage));
                macro_rules! run {
                    ($inbox:expr, $handler:expr) => {{
                        let inbox = HookedInbox::new($inbox, Arc::clone(&stops));
                        Consumer::inbox(stage, inbox)
                            .with_concurrency(8)
                            .run(source, $handler, forever)
                            .await?;
                    }};
                }
                let outbox = SqlOutbox::of(&inbox, &args.store, &args.prefix);
                match (args.role, inbox) {
                    (Role::Billing, i) => {
                        let billing = Billing {
                            outbox: outbox?,
                            tables: t,
                            stops: Arc::clone(&stops),
                        };
                        match i {
                            SqlInbox::Postgres(i) => run!(i, billing),
                            SqlInbox::MySql(i) => run!(i, billing),
                            SqlInbox::Sqlite(i) => run!(i, billing),
                        }
                    }
                    (_, i) => {
                        let apply = Apply { tables: t };
                        match i {
                            SqlInbox::Postgres(i) => run!(i, apply),
                            SqlInbox::MySql(i) => run!(i, apply),
                            SqlInbox::Sqlite(i) => run!(i, apply),
                        }
                    }
                }
                Ok(())
            }
            Role::NaiveBilling | Role::NaiveLedger => {
                let stage = if args.role == Role::NaiveBilling {
                    "billing"
                } else {
                    "ledger"
                };
                let ledger = Ledger::open(&args.store, &tables(&args.prefix, stage), 4).await?;
                let producer = if args.role == Role::NaiveBilling {
                    Some(
                        Producer::connect(
                            args.broker,
                            &args.url,
                            &args.invoices,
                            &args.dir,
                            args.workers,
                        )
                        .await?,
                    )
                } else {
                    None
                };
                let mut source = source;
                while let Some(d) = source.recv().await? {
                    let e = event_of(d.message())?;
                    ledger.apply(&e, None).await?;
                    stops.at("after-commit");
                    if let Some(p) = &producer {
                        p.publish_outgoing(&invoice(&e)?).await?;
                    }
                    d.ack().await?;
                }
                Ok(())
            }
            Role::Relay => Err("a relay has no source".into()),
        }
    }
}

/// Runs one pipeline process until the supervisor kills it.
pub fn run_process(args: ChaosPipelineArgs) -> Result<ExitCode, BoxError> {
    let stops = Arc::new(Stops(Armed::listen()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let visibility = Duration::from_millis(args.visibility_ms);
        match args.role {
            Role::Relay => {
                let inbox =
                    SqlInbox::open(&args.store, &tables(&args.prefix, "billing"), 4).await?;
                let outbox = SqlOutbox::of(&inbox, &args.store, &args.prefix)?;
                let producer = Producer::connect(
                    args.broker,
                    &args.url,
                    &args.invoices,
                    &args.dir,
                    args.workers,
                )
                .await?;
                let sink = Publish(producer, Arc::clone(&stops));
                say("READY");
                // a lost broker connection does not come back: the process exits and the
                // supervisor starts another
                macro_rules! relay {
                    ($o:expr) => {
                        Relay::new(Marks($o, Arc::clone(&stops)), sink)
                            .with_batch(32)
                            .with_lease(Duration::from_secs(3))
                            .with_poll(Duration::from_millis(200))
                            .with_patience(Duration::from_secs(3))
                            .run(std::future::pending())
                            .await?
                    };
                }
                match outbox {
                    SqlOutbox::Postgres(o) => relay!(o),
                    SqlOutbox::MySql(o) => relay!(o),
                    SqlOutbox::Sqlite(o) => relay!(o),
                };
                Ok(ExitCode::SUCCESS)
            }
            role => {
                let (destination, stage) = match role {
                    Role::Billing | Role::NaiveBilling => (&args.orders, "billing"),
                    _ => (&args.invoices, "ledger"),
                };
                let inbox = match role {
                    Role::Billing | Role::Ledger => {
                        Some(SqlInbox::open(&args.store, &tables(&args.prefix, stage), 8).await?)
                    }
                    _ => None,
                };
                let route = Route {
                    broker: args.broker,
                    url: &args.url,
                    destination,
                    dir: &args.dir,
                    slot: args.slot,
                    visibility,
                };
                let serve = Serve {
                    args: &args,
                    stops: Arc::clone(&stops),
                    inbox: inbox.clone(),
                };
                with_source(route, inbox.as_ref(), serve).await??;
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// A running process of the pipeline.
struct Proc {
    id: usize,
    role: Role,
    slot: usize,
    child: Child,
    stdin: ChildStdin,
}

/// What the processes say, by role: stops reached, and deliveries the ledger received.
#[derive(Default)]
struct Heard {
    at: Mutex<Vec<(usize, String)>>,
    ledger_receives: AtomicU64,
}

/// The supervisor of one chain.
struct Chain<'a> {
    args: &'a ChaosArgs,
    store: &'a str,
    url: &'a str,
    prefix: String,
    orders: String,
    invoices: String,
    dir: PathBuf,
    idem: bool,
    heard: Arc<Heard>,
    procs: Vec<Proc>,
    next_id: usize,
}

impl Chain<'_> {
    fn spawn(&mut self, role: Role, slot: usize) -> Result<(), BoxError> {
        let exe = super::worker_exe()?;
        let mut child = Command::new(exe)
            .arg("chaos-pipeline")
            .args([
                "--role",
                role.to_possible_value()
                    .map(|v| v.get_name().to_owned())
                    .unwrap_or_default()
                    .as_str(),
            ])
            .args([
                "--broker",
                self.args
                    .broker
                    .to_possible_value()
                    .map(|v| v.get_name().to_owned())
                    .unwrap_or_default()
                    .as_str(),
            ])
            .args([
                "--url",
                self.url,
                "--store",
                self.store,
                "--prefix",
                &self.prefix,
            ])
            .args(["--orders", &self.orders, "--invoices", &self.invoices])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--slot",
                &slot.to_string(),
                "--workers",
                &self.args.workers.to_string(),
            ])
            .args(["--visibility-ms", &self.args.visibility_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (heard, id) = (Arc::clone(&self.heard), self.next_id);
        self.next_id += 1;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "RECV" {
                    if matches!(role, Role::Ledger | Role::NaiveLedger) {
                        heard.ledger_receives.fetch_add(1, Ordering::Relaxed);
                    }
                } else if let Some(point) = line.strip_prefix("AT ") {
                    heard
                        .at
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((id, point.to_owned()));
                }
            }
        });
        self.procs.push(Proc {
            id,
            role,
            slot,
            child,
            stdin,
        });
        Ok(())
    }

    fn roles(&self) -> Vec<(Role, usize)> {
        let w = usize::from(self.args.workers);
        let mut roles = Vec::new();
        for slot in 0..w {
            roles.push((
                if self.idem {
                    Role::Billing
                } else {
                    Role::NaiveBilling
                },
                slot,
            ));
            roles.push((
                if self.idem {
                    Role::Ledger
                } else {
                    Role::NaiveLedger
                },
                slot,
            ));
        }
        if self.idem {
            roles.push((Role::Relay, 0));
            roles.push((Role::Relay, 1));
        }
        roles
    }

    /// Respawns every process that exited (a relay that lost its broker, a worker whose
    /// connection a restart cut).
    async fn respawn_exited(&mut self) -> Result<(), BoxError> {
        let mut i = 0;
        while i < self.procs.len() {
            if self.procs[i].child.try_wait()?.is_some() {
                let p = self.procs.remove(i);
                tokio::time::sleep(self.args.broker.rejoin_delay().min(Duration::from_secs(2)))
                    .await;
                self.spawn(p.role, p.slot)?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Arms `point` in every process of `role` (on a broker with a single active consumer
    /// only one has work), waits for the first to stop there, disarms the others, SIGKILLs and
    /// restarts each that stopped there (another may have reached the point before its
    /// disarming). How many it killed at the point; 0 if none stopped there within 8 s (one of
    /// them is killed anyway).
    async fn kill(&mut self, role: Role, point: &str, rng: &mut StdRng) -> Result<u64, BoxError> {
        let before = self
            .heard
            .at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        for p in self.procs.iter_mut().filter(|p| p.role == role) {
            arm(&mut p.stdin, point)?;
        }
        let stopped = |heard: &Heard| -> Vec<usize> {
            heard.at.lock().unwrap_or_else(|e| e.into_inner())[before..]
                .iter()
                .filter(|(_, p)| p == point)
                .map(|(id, _)| *id)
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(8);
        while stopped(&self.heard).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for p in self.procs.iter_mut().filter(|p| p.role == role) {
            let _ = disarm(&mut p.stdin);
        }
        // a process that reached the point before its disarming says so right away
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ids = stopped(&self.heard);
        let mut victims: Vec<usize> = ids
            .iter()
            .filter_map(|id| self.procs.iter().position(|p| p.id == *id))
            .collect();
        if victims.is_empty() {
            let candidates: Vec<usize> = (0..self.procs.len())
                .filter(|&i| self.procs[i].role == role)
                .collect();
            if candidates.is_empty() {
                return Ok(0);
            }
            victims.push(candidates[rng.random_range(0..candidates.len())]);
        }
        victims.sort_unstable();
        let mut killed = Vec::new();
        for i in victims.into_iter().rev() {
            let mut p = self.procs.remove(i);
            let _ = p.child.kill();
            let _ = p.child.wait();
            killed.push((p.role, p.slot));
        }
        tokio::time::sleep(self.args.broker.rejoin_delay().min(Duration::from_secs(2))).await;
        for (role, slot) in killed {
            self.spawn(role, slot)?;
        }
        Ok(ids.len() as u64)
    }

    fn stop_all(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.procs.clear();
    }
}

/// Runs one chain (naive or idemgate) and reads what it did.
async fn chain(
    args: &ChaosArgs,
    seed: u64,
    store: &str,
    url: &str,
    base: &Path,
    idem: bool,
) -> Result<Figures, BoxError> {
    let started = Instant::now();
    let tag = if idem { "idem" } else { "naive" };
    let dir = base.join(format!("pipeline-{tag}"));
    std::fs::create_dir_all(&dir)?;
    // the process id too: a run that was killed leaves its tables and destinations behind
    let run = format!("{}x{}", seed % 1_000_000, std::process::id());
    let prefix = format!("idemgate_pipe{run}_{tag}");
    let workers = usize::from(args.workers);
    let n = args.events;
    let visibility = Duration::from_millis(args.visibility_ms);
    let mut rng = StdRng::seed_from_u64(seed ^ u64::from(idem));
    // the orders: each key's in sequence, some published twice
    let mut seqs = std::collections::HashMap::new();
    let events: Vec<Event> = (0..usize::try_from(args.events)?)
        .map(|i| {
            let key = key_of(i);
            let seq = seqs.entry(key.clone()).or_insert(0u32);
            *seq += 1;
            Event {
                id: EventId::new().to_string(),
                amount: rng.random_range(1..100),
                key,
                seq: *seq,
                ..Event::default()
            }
        })
        .collect();
    let billing = Ledger::open(store, &tables(&prefix, "billing"), 4).await?;
    let ledger = Ledger::open(store, &tables(&prefix, "ledger"), 4).await?;
    billing.create(&events).await?;
    ledger.create(&events).await?;
    let mut outbox = None;
    let mut inboxes = Vec::new();
    if idem {
        for stage in ["billing", "ledger"] {
            let inbox = SqlInbox::open(store, &tables(&prefix, stage), 2).await?;
            inbox.migrate().await?;
            inboxes.push((stage, inbox));
        }
        let o = SqlOutbox::of(&inboxes[0].1, store, &prefix)?;
        o.migrate().await?;
        outbox = Some(o);
    }
    let mut names = Vec::new();
    for what in ["orders", "invoices"] {
        let name = format!("pipe{run}-{tag}-{what}");
        names.push(
            super::broker::create_destination(
                args.broker,
                url,
                &name,
                &dir,
                workers,
                visibility,
                false,
            )
            .await?,
        );
    }
    let (orders, invoices) = (names[0].clone(), names[1].clone());
    let mut producer = Some(Producer::connect(args.broker, url, &orders, &dir, workers).await?);
    // orders are published a window ahead of the ledger, so every stage has work while the
    // faults land
    let window = (n / 8).max(40);
    let mut published = 0usize;

    let mut c = Chain {
        args,
        store,
        url,
        prefix: prefix.clone(),
        orders: orders.clone(),
        invoices: invoices.clone(),
        dir: dir.clone(),
        idem,
        heard: Arc::new(Heard::default()),
        procs: Vec::new(),
        next_id: 0,
    };
    for (role, slot) in c.roles() {
        c.spawn(role, slot)?;
    }
    let points: &[(Role, &str)] = if idem {
        &[
            (Role::Billing, "after-commit"),
            (Role::Relay, "before-mark"),
            (Role::Relay, "mid-batch"),
            (Role::Ledger, "after-commit"),
            (Role::Billing, "in-transaction"),
        ]
    } else {
        &[
            (Role::NaiveBilling, "after-commit"),
            (Role::NaiveLedger, "after-commit"),
        ]
    };
    let mut fig = Figures {
        events: n,
        ..Figures::default()
    };
    let faults =
        u64::from(args.kills) + u64::from(args.store_restarts) + u64::from(args.broker_restarts);
    let (mut kills, mut store_restarts, mut broker_restarts) = (0u32, 0u32, 0u32);
    let mut fault = 0u64;
    // the next kill point, in turn
    let mut turn = 0usize;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let (mut last_progress, mut last_count) = (Instant::now(), 0u64);
    let log = base.join("restarts.log");
    let mut quiet_since: Option<Instant> = None;
    loop {
        c.respawn_exited().await?;
        let done = ledger.tally().await.map(|t| t.touched).unwrap_or(0);
        while published < events.len() && (published as u64) < done + window {
            let e = &events[published];
            let Some(p) = &producer else { break };
            let dup = rng.random_bool(args.dup_rate);
            let sent = async {
                p.publish(e).await?;
                if dup {
                    p.publish(e).await?;
                }
                Ok::<(), BoxError>(())
            };
            if sent.await.is_err() {
                // the broker restarted under the producer: connect again
                tokio::time::sleep(Duration::from_secs(1)).await;
                producer = Producer::connect(args.broker, url, &orders, &dir, workers)
                    .await
                    .ok();
                continue;
            }
            published += 1;
        }
        let billed = billing.tally().await.map(|t| t.touched).unwrap_or(0);
        let count = done + billed;
        if count != last_count {
            (last_progress, last_count) = (Instant::now(), count);
        }
        // faults at even steps of the ledger's progress
        if fault < faults && done >= (fault + 1) * n / (faults + 2) {
            fault += 1;
            if kills < args.kills
                && (!fault.is_multiple_of(3)
                    || (store_restarts >= args.store_restarts
                        && broker_restarts >= args.broker_restarts))
            {
                let (role, point) = points[turn % points.len()];
                turn += 1;
                match c.kill(role, point, &mut rng).await? {
                    0 => {
                        *fig.kills_at
                            .entry(format!("{} {point} (not reached)", role.name()))
                            .or_default() += 1;
                        kills += 1;
                    }
                    n => {
                        *fig.kills_at
                            .entry(format!("{} {point}", role.name()))
                            .or_default() += n;
                        kills += u32::try_from(n).unwrap_or(1);
                    }
                }
            } else if store_restarts < args.store_restarts {
                if let Some(cmd) = &args.store_restart_cmd {
                    shell(cmd, &log).await?;
                }
                store_restarts += 1;
            } else if broker_restarts < args.broker_restarts {
                if let Some(cmd) = &args.broker_restart_cmd {
                    shell(cmd, &log).await?;
                }
                broker_restarts += 1;
            } else {
                let (role, point) = points[turn % points.len()];
                turn += 1;
                kills += u32::try_from(c.kill(role, point, &mut rng).await?.max(1)).unwrap_or(1);
            }
        }
        let pending = match &outbox {
            Some(o) => o.backlog().await.map(|b| b.pending).unwrap_or(1),
            None => 0,
        };
        let settled = done >= n && billed >= n && pending == 0 && fault >= faults;
        if settled {
            // quiet for a redelivery's time: late duplicates would show up in it
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed()
                >= args
                    .broker
                    .redelivery(visibility)
                    .max(Duration::from_secs(3))
            {
                break;
            }
        } else {
            quiet_since = None;
        }
        let stalled = last_progress.elapsed() >= Duration::from_secs(args.stall_secs.min(30))
            && fault >= faults;
        if stalled || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.stop_all();
    let (b, l) = (billing.tally().await?, ledger.tally().await?);
    fig.kills = u64::from(kills);
    fig.store_restarts = u64::from(store_restarts);
    fig.broker_restarts = u64::from(broker_restarts);
    fig.lost = l.lost;
    fig.applied_twice = b.twice + l.twice;
    fig.totals_agree = b.balance_ok && l.balance_ok && b.total == l.total && b.lost == 0;
    fig.downstream_duplicates = c
        .heard
        .ledger_receives
        .load(Ordering::Relaxed)
        .saturating_sub(l.touched);
    fig.seconds = started.elapsed().as_secs_f64();
    if args.dir.is_none() {
        billing.drop_tables().await?;
        ledger.drop_tables().await?;
        for (stage, inbox) in &inboxes {
            inbox.drop_tables(store, &tables(&prefix, stage)).await?;
        }
        if let Some(o) = &outbox {
            o.drop_tables(store).await?;
        }
        for d in [&orders, &invoices] {
            let _ = super::broker::delete_destination(args.broker, url, d).await;
        }
    }
    Ok(fig)
}

/// `idemgate chaos --pipeline`.
pub(crate) fn run(args: &ChaosArgs, seed: u64, base: &Path) -> Result<ExitCode, BoxError> {
    let store = match &args.store {
        Some(url) => url.clone(),
        None => format!("sqlite:{}", base.join("pipeline.db").display()),
    };
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| args.broker.default_url().to_owned());
    let refused = [
        (args.zombies > 0, "--zombies"),
        (args.cuts > 0, "--cuts"),
        (args.report.is_some(), "--report"),
        (args.ledger.is_some(), "--ledger"),
        (args.http, "--http"),
        (args.fifo, "--fifo"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        return Err(format!("{flag} does not apply to --pipeline").into());
    }
    if args.store_restarts > 0 && args.store_restart_cmd.is_none() {
        return Err("--store-restarts needs --store-restart-cmd".into());
    }
    if args.broker_restarts > 0 && args.broker_restart_cmd.is_none() {
        return Err("--broker-restarts needs --broker-restart-cmd".into());
    }
    if !args.json {
        eprintln!(
            "idemgate chaos --pipeline: {} broker, store {store}; {} orders, {} billing and {} ledger workers, {} kills; seed {seed}",
            args.broker.name(),
            args.events,
            args.workers,
            args.workers,
            args.kills
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let naive = if args.no_naive {
        None
    } else {
        Some(rt.block_on(chain(args, seed, &store, &url, base, false))?)
    };
    let idem = rt.block_on(chain(args, seed, &store, &url, base, true))?;
    let naive_harmless = naive
        .as_ref()
        .is_some_and(|f| f.kills > 0 && f.lost == 0 && f.applied_twice == 0 && f.totals_agree);
    let failed = idem.lost > 0 || idem.applied_twice > 0 || !idem.totals_agree || naive_harmless;
    if args.json {
        let out = serde_json::json!({ "seed": seed, "broker": args.broker.name(), "store": store, "naive": naive, "idemgate": idem });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let row = |name: &str, f: &Figures| {
            println!(
                "{name:<9} {:>5} orders {:>3} kills | lost {:>4} | applied twice {:>4} | totals agree {:<5} | {} re-deliveries downstream | {:.0} s",
                f.events,
                f.kills,
                f.lost,
                f.applied_twice,
                f.totals_agree,
                f.downstream_duplicates,
                f.seconds
            );
        };
        if let Some(n) = &naive {
            row("naive", n);
        }
        row("idemgate", &idem);
        println!("kills: {:?}", idem.kills_at);
        if naive_harmless {
            println!("the naive chain showed no damage: its kills missed their points");
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

//! `idemgate demo`: the chaos harness on embedded defaults.
//!
//! A producer fills a SQLite queue with events (some published twice); worker *processes* apply
//! each event's effect to a SQLite ledger with a deliberately non-idempotent increment; the
//! supervisor SIGKILLs workers at named points and restarts them, and the queue's visibility
//! timeout brings unacknowledged messages back. The same scenario runs without idempotency, then
//! with idemgate, and the ledger says what happened to every event.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use idemgate::core::EventId;
use idemgate::sqlite::SqliteQueue;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use idemgate_testkit::kill::KillPoint;

use crate::BoxError;

/// The queue's name in `queue.db`.
pub(crate) const QUEUE: &str = "demo_events";

/// The settings of `idemgate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Events to produce.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    events: u64,
    /// Fraction of events published twice (at least this many, rounded up).
    #[arg(long, default_value_t = 0.1, value_parser = parse_rate)]
    dup_rate: f64,
    /// Worker processes.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// SIGKILLs per run, at random named points.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    kills: u32,
    /// How the idemgate run deduplicates: `inbox` (the dedup row commits with the effect) or
    /// `gate` (a SqliteStore claim, the effect outside its transaction).
    #[arg(long, value_enum, default_value_t = IdemMode::Inbox)]
    mode: IdemMode,
    /// Seed of the event and fault schedule (random if not given; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Visibility timeout of the queue, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=600_000))]
    visibility_ms: u64,
    /// Gate lease, in milliseconds (gate mode).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(30..=600_000))]
    lease_ms: u64,
    /// Keep the queue, ledger and store files in this directory (default: a temporary one,
    /// removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    timeout_secs: u64,
    /// Print the figures as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub(crate) fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum IdemMode {
    Inbox,
    Gate,
}

impl IdemMode {
    /// Used by `idemgate chaos` (feature `brokers`).
    #[cfg_attr(not(feature = "brokers"), allow(dead_code))]
    pub(crate) fn name(self) -> &'static str {
        match self {
            IdemMode::Inbox => "inbox",
            IdemMode::Gate => "gate",
        }
    }
}

/// How a worker processes a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// No idempotency: apply, then ack.
    Naive,
    /// The inbox row and the effect in one ledger transaction.
    Inbox,
    /// A Gate over a SqliteStore; the effect commits separately in the ledger.
    Gate,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Naive => "naive",
            Mode::Inbox => "inbox",
            Mode::Gate => "gate",
        }
    }
}

/// One event on the queue.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Event {
    pub(crate) id: String,
    pub(crate) amount: i64,
}

/// Events with fresh ids and amounts of 1 to 100, and their publish order: every event once,
/// `dup_rate` of them (rounded up) a second time somewhere later, at most `spread` positions
/// after the event's own index where given. Returns the events, the order (indexes) and how
/// many were published twice.
pub(crate) fn publish_plan(
    rng: &mut StdRng,
    events: u64,
    dup_rate: f64,
    spread: Option<usize>,
) -> (Vec<Event>, Vec<usize>, usize) {
    let events: Vec<Event> = (0..events)
        .map(|_| Event {
            id: EventId::new().to_string(),
            amount: rng.random_range(1..=100),
        })
        .collect();
    // dup_rate is in [0, 1], so the count is in 0..=events
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let dup_count = ((events.len() as f64) * dup_rate).ceil() as usize;
    let mut order: Vec<usize> = (0..events.len()).collect();
    let mut dups: Vec<usize> = (0..events.len()).collect();
    dups.shuffle(rng);
    for &d in dups.iter().take(dup_count) {
        let last = spread.map_or(order.len(), |s| order.len().min(d + s));
        let at = rng.random_range(d + 1..=last);
        order.insert(at, d);
    }
    (events, order, dup_count)
}

/// Opens the ledger (creating its tables); shared by the supervisor and the workers.
pub(crate) fn open_ledger(path: &Path) -> Result<Connection, BoxError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE IF NOT EXISTS effects (
            event_id TEXT PRIMARY KEY, amount INTEGER NOT NULL, applied INTEGER NOT NULL DEFAULT 0);
         CREATE TABLE IF NOT EXISTS balance (id INTEGER PRIMARY KEY CHECK (id = 1), total INTEGER NOT NULL);
         INSERT OR IGNORE INTO balance (id, total) VALUES (1, 0);
         COMMIT;",
    )?;
    Ok(conn)
}

/// The effect, deliberately not idempotent: each application adds again.
pub(crate) fn apply_effect(tx: &Connection, e: &Event) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE effects SET applied = applied + 1 WHERE event_id = ?1",
        [&e.id],
    )?;
    tx.execute(
        "UPDATE balance SET total = total + ?1 WHERE id = 1",
        [e.amount],
    )?;
    Ok(())
}

/// The figures of one run.
#[derive(Debug, Default, Serialize)]
struct Figures {
    mode: &'static str,
    events: u64,
    deliveries: u64,
    duplicate_deliveries: u64,
    published_twice: u64,
    kills: u64,
    kills_by_point: BTreeMap<&'static str, u64>,
    lost: u64,
    applied_twice: u64,
    extra_effects: u64,
    balance_ok: bool,
    seconds: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    seed: u64,
    naive: &'a Figures,
    idemgate: &'a Figures,
}

/// Runs `idemgate demo`: a naive phase and an idemgate phase under the same kills.
pub fn run(args: DemoArgs) -> Result<ExitCode, BoxError> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let tmp;
    let base = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    if !args.json {
        eprintln!(
            "idemgate demo: {} events ({}% published twice), {} worker processes, {} kills per run, seed {seed}",
            args.events,
            args.dup_rate * 100.0,
            args.workers,
            args.kills
        );
    }
    let progress = MultiProgress::new();
    let naive = phase(Mode::Naive, &args, seed, &base, &progress)?;
    let idem_mode = match args.mode {
        IdemMode::Inbox => Mode::Inbox,
        IdemMode::Gate => Mode::Gate,
    };
    let idem = phase(idem_mode, &args, seed, &base, &progress)?;
    let _ = progress.clear();

    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Report {
                seed,
                naive: &naive,
                idemgate: &idem
            })?
        );
    } else {
        print_table(&naive, &idem);
    }

    // Gate mode's crash window: a kill leaves applied but not completed the effect it
    // interrupted, and the one the runtime started while the previous completion was recorded
    // behind it (completions run behind the handlers): at most two a kill
    let window = 2 * idem.kills;
    let mut failures = Vec::new();
    if idem.lost > 0 {
        failures.push(format!("{} effects lost", idem.lost));
    }
    match idem_mode {
        Mode::Gate if idem.applied_twice > window => failures.push(format!(
            "{} effects applied twice, more than two for each of the {} kills (the Gate's crash window)",
            idem.applied_twice, idem.kills
        )),
        Mode::Inbox if idem.applied_twice > 0 => {
            failures.push(format!("{} effects applied twice", idem.applied_twice))
        }
        _ => {}
    }
    if !idem.balance_ok {
        failures.push("the ledger balance disagrees with its effects".into());
    }
    if idem.kills < u64::from(args.kills) {
        failures.push(format!(
            "only {} of {} kills happened",
            idem.kills, args.kills
        ));
    }
    if failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("idemgate demo FAILED: {}", failures.join("; "));
        Ok(ExitCode::FAILURE)
    }
}

fn print_table(naive: &Figures, idem: &Figures) {
    let right = format!("idemgate ({})", idem.mode);
    println!();
    println!("{:<28} {:>12} {:>18}", "", "naive", right);
    let row = |name: &str, a: u64, b: u64| println!("{name:<28} {a:>12} {b:>18}");
    row("events", naive.events, idem.events);
    row("deliveries", naive.deliveries, idem.deliveries);
    row(
        "duplicate deliveries",
        naive.duplicate_deliveries,
        idem.duplicate_deliveries,
    );
    row(
        "  of which published twice",
        naive.published_twice,
        idem.published_twice,
    );
    row("kills (SIGKILL)", naive.kills, idem.kills);
    for p in KillPoint::ALL {
        let get = |f: &Figures| f.kills_by_point.get(p.name()).copied().unwrap_or(0);
        row(&format!("  at {}", p.name()), get(naive), get(idem));
    }
    row("lost effects", naive.lost, idem.lost);
    row(
        "effects applied twice",
        naive.applied_twice,
        idem.applied_twice,
    );
    row(
        "extra effects (total)",
        naive.extra_effects,
        idem.extra_effects,
    );
    println!(
        "{:<28} {:>12.1} {:>18.1}",
        "seconds", naive.seconds, idem.seconds
    );
    println!();
    if idem.mode == "gate" && idem.applied_twice > 0 {
        println!(
            "gate mode: {} effects ran twice because a worker was killed after an effect and before its \
             completion was recorded ({} kills). The Gate re-runs the handler after the lease expires; an effect \
             outside the store must carry `Key::derive(..)` to its own system to close that window, or use inbox mode.",
            idem.applied_twice, idem.kills
        );
    } else if idem.lost == 0 && idem.applied_twice == 0 {
        println!(
            "idemgate: every event's effect applied exactly once, through {} duplicate deliveries and {} kills.",
            idem.duplicate_deliveries, idem.kills
        );
    }
}

struct Slot {
    child: Child,
    // where the supervisor arms the worker's next kill
    stdin: ChildStdin,
    generation: u64,
}

struct Supervisor<'a> {
    args: &'a DemoArgs,
    mode: Mode,
    dir: PathBuf,
    rng: StdRng,
    lines: mpsc::Sender<(usize, u64, String)>,
    next_generation: u64,
    // the worker armed to stop at a point, and not yet killed: (slot, generation)
    armed: Option<(usize, u64)>,
    kills: u64,
    by_point: BTreeMap<&'static str, u64>,
}

impl Supervisor<'_> {
    /// Arms the next kill once the run is far enough along: kill `k` of `n` once
    /// `k / (n + 1)` of three quarters of the events are applied, so every kill falls while
    /// a quarter of the queue is still to come and the armed worker is busy.
    fn arm(&mut self, slots: &mut [Slot], applied: u64) -> Result<(), BoxError> {
        let wanted = u64::from(self.args.kills);
        if self.armed.is_some() || self.kills >= wanted {
            return Ok(());
        }
        let due = self.args.events * 3 / 4 * (self.kills + 1) / (wanted + 1);
        if applied < due {
            return Ok(());
        }
        let slot = self.rng.random_range(0..slots.len());
        let point = KillPoint::ALL[self.rng.random_range(0..KillPoint::ALL.len())];
        crate::arm::arm(&mut slots[slot].stdin, point.name())?;
        self.armed = Some((slot, slots[slot].generation));
        Ok(())
    }

    /// Starts a worker in `slot`.
    fn spawn(&mut self, slot: usize) -> Result<Slot, BoxError> {
        self.next_generation += 1;
        let generation = self.next_generation;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("demo-worker")
            .arg("--dir")
            .arg(&self.dir)
            .args(["--mode", self.mode.name()])
            .args(["--visibility-ms", &self.args.visibility_ms.to_string()])
            .args(["--lease-ms", &self.args.lease_ms.to_string()]);
        let log = File::create(self.dir.join(format!("worker-{slot}-{generation}.log")))?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("a worker's pipes were not set up".into());
        };
        let tx = self.lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((slot, generation, line)).is_err() {
                    return;
                }
            }
        });
        Ok(Slot {
            child,
            stdin,
            generation,
        })
    }
}

fn phase(
    mode: Mode,
    args: &DemoArgs,
    seed: u64,
    base: &Path,
    progress: &MultiProgress,
) -> Result<Figures, BoxError> {
    let dir = base.join(mode.name());
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let mut rng = StdRng::seed_from_u64(seed);

    // the producer: every event once, some twice, the second copy somewhere later in the queue
    let ledger = open_ledger(&dir.join("ledger.db"))?;
    let (events, order, dup_count) = publish_plan(&mut rng, args.events, args.dup_rate, None);
    {
        let tx = rusqlite::Transaction::new_unchecked(
            &ledger,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        for e in &events {
            tx.execute(
                "INSERT INTO effects (event_id, amount) VALUES (?1, ?2)",
                params![e.id, e.amount],
            )?;
        }
        tx.commit()?;
    }
    let queue = SqliteQueue::open(dir.join("queue.db"), QUEUE)?;
    let bodies: Vec<Vec<u8>> = order
        .iter()
        .map(|&i| serde_json::to_vec(&events[i]))
        .collect::<Result<_, _>>()?;
    // the last quarter is held back while kills are due, and handed out a little at a time if
    // the queue runs dry before they happened: every asked kill finds a message to stop at
    let held = if args.kills == 0 { 0 } else { bodies.len() / 4 };
    let (now, reserve) = bodies.split_at(bodies.len() - held);
    for chunk in now.chunks(1000) {
        queue.send_batch(chunk.iter().map(|b| (b.as_slice(), Duration::ZERO)))?;
    }
    let mut reserve: std::collections::VecDeque<&[u8]> =
        reserve.iter().map(Vec::as_slice).collect();

    let bar = progress.add(ProgressBar::new(args.events));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} events applied · {msg}")?
            .progress_chars("=> "),
    );
    bar.set_prefix(mode.name());

    let (tx, rx) = mpsc::channel();
    let mut sup = Supervisor {
        args,
        mode,
        dir: dir.clone(),
        rng,
        lines: tx,
        next_generation: 0,
        armed: None,
        kills: 0,
        by_point: BTreeMap::new(),
    };
    let start = Instant::now();
    let mut slots = (0..usize::from(args.workers))
        .map(|i| sup.spawn(i))
        .collect::<Result<Vec<_>, _>>()?;
    let result = supervise(
        &mut sup,
        &mut slots,
        &rx,
        (&queue, &mut reserve),
        &ledger,
        &bar,
        start,
    );
    for s in &mut slots {
        let _ = s.child.kill();
        let _ = s.child.wait();
    }
    result?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_with_message(format!("done in {seconds:.1}s, {} kills", sup.kills));

    let (lost, twice, applied, balance_ok): (i64, i64, i64, bool) = ledger.query_row(
        "SELECT count(*) FILTER (WHERE applied = 0),
                count(*) FILTER (WHERE applied >= 2),
                coalesce(sum(applied), 0),
                (SELECT total FROM balance) = coalesce(sum(amount * applied), 0)
           FROM effects",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    let (lost, twice, applied) = (count(lost), count(twice), count(applied));
    let stats = queue.stats()?;
    Ok(Figures {
        mode: mode.name(),
        events: args.events,
        deliveries: stats.receives,
        duplicate_deliveries: stats.receives.saturating_sub(args.events),
        published_twice: dup_count as u64,
        kills: sup.kills,
        kills_by_point: sup.by_point,
        lost,
        applied_twice: twice,
        extra_effects: (applied + lost).saturating_sub(args.events),
        balance_ok,
        seconds,
    })
}

/// How many events have their effect applied.
fn applied(ledger: &Connection) -> Result<u64, BoxError> {
    let n: i64 = ledger.query_row("SELECT count(*) FROM effects WHERE applied > 0", [], |r| {
        r.get(0)
    })?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn supervise(
    sup: &mut Supervisor<'_>,
    slots: &mut [Slot],
    rx: &mpsc::Receiver<(usize, u64, String)>,
    (queue, reserve): (&SqliteQueue, &mut std::collections::VecDeque<&[u8]>),
    ledger: &Connection,
    bar: &ProgressBar,
    start: Instant,
) -> Result<(), BoxError> {
    let deadline = start + Duration::from_secs(sup.args.timeout_secs);
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    loop {
        if let Ok((slot, generation, line)) = rx.recv_timeout(Duration::from_millis(25)) {
            let point = line
                .strip_prefix("AT ")
                .and_then(|p| KillPoint::ALL.into_iter().find(|x| x.name() == p));
            if let (Some(point), true) = (point, sup.armed == Some((slot, generation))) {
                // the worker is parked at the point: a real SIGKILL, then a fresh process
                slots[slot].child.kill()?;
                slots[slot].child.wait()?;
                sup.kills += 1;
                sup.armed = None;
                *sup.by_point.entry(point.name()).or_default() += 1;
                slots[slot] = sup.spawn(slot)?;
            }
        }
        for (i, s) in slots.iter_mut().enumerate() {
            if let Some(status) = s.child.try_wait()? {
                let log = sup.dir.join(format!("worker-{i}-{}.log", s.generation));
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "worker {i} exited on its own ({status}):\n{}",
                    tail.trim_end()
                )
                .into());
            }
        }
        let due = sup.kills < u64::from(sup.args.kills);
        if sup.armed.is_none() && due {
            sup.arm(slots, applied(ledger)?)?;
        }
        if !reserve.is_empty() {
            // all of it once the kills happened; a few while they are due and the queue is dry
            let release = if due {
                if queue.stats()?.messages > 0 {
                    0
                } else {
                    reserve.len().min(usize::from(sup.args.workers) * 2)
                }
            } else {
                reserve.len()
            };
            if release > 0 {
                queue.send_batch(reserve.drain(..release).map(|b| (b, Duration::ZERO)))?;
            }
        }
        if last_poll.elapsed() >= Duration::from_millis(150) {
            last_poll = Instant::now();
            let applied = applied(ledger)?;
            let stats = queue.stats()?;
            bar.set_position(applied);
            bar.set_message(format!(
                "{} deliveries · {} kills · {} in queue",
                stats.receives, sup.kills, stats.messages
            ));
            if stats.messages == 0 && reserve.is_empty() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the {} run did not drain its queue in {}s",
                sup.mode.name(),
                sup.args.timeout_secs
            )
            .into());
        }
    }
}

//! `idemgate chaos`: the chaos harness against real brokers and stores.
//!
//! A producer publishes events (some twice) to a real broker; worker *processes* run the real
//! consumer runtime (or, for the naive run, a plain receive-apply-ack loop) and apply each
//! event's effect to a ledger with a deliberately non-idempotent increment. The supervisor
//! SIGKILLs workers at named points, freezes one past its lease (SIGSTOP, SIGCONT), restarts the
//! store and the broker, cuts store connections, and counts from the ledger how often every
//! event's effect happened. The same seed gives the same fault schedule.

mod bridge;
mod broker;
pub(crate) mod http;
mod ledger;
pub(crate) mod pipeline;
mod report;
pub(crate) mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub(crate) use self::broker::ChaosBroker;
use self::broker::Producer;
use self::ledger::{Ledger, Tally, is_mysql, is_postgres, sqlite_path};
use self::worker::{SqlInbox, WorkerMode};
use crate::BoxError;
use idemgate::core::{EventId, Key, Store};
use idemgate_testkit::kill::KillPoint;

/// The consumer's name: the scope of every event's key.
pub(crate) const CONSUMER: &str = "chaos";

/// One event: its id and the amount its effect adds to the balance.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Event {
    pub(crate) id: String,
    pub(crate) amount: i32,
    /// A poison event's handler fails this many times before it succeeds ([`ALWAYS`]: never).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) fails: u32,
    /// The ordering key (an account): its events are published in `seq` order.
    #[serde(default)]
    pub(crate) key: String,
    /// The event's place in its key's publish order.
    #[serde(default)]
    pub(crate) seq: u32,
}

/// How the idemgate run deduplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum IdemMode {
    /// The dedup row commits with the effect, in the store's database.
    Inbox,
    /// A claim in the store; the effect in the ledger, outside the claim's transaction.
    Gate,
}

impl IdemMode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            IdemMode::Inbox => "inbox",
            IdemMode::Gate => "gate",
        }
    }
}

/// A fraction between 0 and 1.
pub(crate) fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

/// Ordering keys of a run: each event belongs to one, round robin.
pub(crate) const KEYS: usize = 64;

/// The ordering key of the `i`-th event.
pub(crate) fn key_of(i: usize) -> String {
    format!("k{}", i % KEYS)
}

/// The `fails` of an event whose handler always fails: it must end in the dead-letter
/// destination, never in the ledger.
pub(crate) const ALWAYS: u32 = u32::MAX;

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The settings of `idemgate chaos`.
#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// The broker.
    #[arg(long, value_enum, default_value = "embedded")]
    pub(crate) broker: ChaosBroker,
    /// The broker's URL (default: the local one).
    #[arg(long)]
    pub(crate) url: Option<String>,
    /// The dedup store: any store URL in gate mode; a `postgres://`, `mysql://` or `sqlite:`
    /// database in inbox mode, which then also holds the ledger (default: SQLite in the run
    /// directory).
    #[arg(long)]
    pub(crate) store: Option<String>,
    /// `inbox`: the dedup row commits with the effect; `gate`: a claim in the store, the effect
    /// in the ledger outside its transaction.
    #[arg(long, value_enum, default_value = "gate")]
    pub(crate) mode: IdemMode,
    /// Where effects are counted in gate mode: `sqlite:PATH` (default: in the run directory),
    /// `postgres://…` or `mysql://…`. In inbox mode the ledger is the store's database.
    #[arg(long)]
    pub(crate) ledger: Option<String>,
    /// Events to produce.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub(crate) events: u64,
    /// Fraction of events published twice.
    #[arg(long, default_value_t = 0.1, value_parser = parse_rate)]
    pub(crate) dup_rate: f64,
    /// Worker processes.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) workers: u16,
    /// Messages each worker handles at once.
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub(crate) concurrency: usize,
    /// Inbox mode: deliveries that share one transaction (`Consumer::with_batch`; its default).
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub(crate) inbox_batch: usize,
    /// SIGKILLs per run, each at one of the named points.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub(crate) kills: u32,
    /// SQS: a FIFO queue, each ordering key a message group (SQS hands a group to one consumer
    /// at a time; it also drops the re-publishes within its deduplication window).
    #[arg(long)]
    pub(crate) fifo: bool,
    /// Fraction of events that are poison (idemgate runs): half fail once or twice and then
    /// succeed, half always fail and must be dead-lettered, once, with their reason.
    #[arg(long, default_value_t = 0.02, value_parser = parse_rate)]
    pub(crate) poison_rate: f64,
    /// Workers frozen (SIGSTOP) at `after-claim` past their lease while a duplicate is handled
    /// elsewhere, then thawed (SIGCONT): fencing must refuse their late completion.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000))]
    pub(crate) zombies: u32,
    /// Restarts of the store (and ledger) server, at even steps of progress, by
    /// `--store-restart-cmd`.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000))]
    pub(crate) store_restarts: u32,
    /// The shell command that restarts the store, run with `sh -c`.
    #[arg(long)]
    pub(crate) store_restart_cmd: Option<String>,
    /// Restarts of the broker, at even steps of progress, by `--broker-restart-cmd`.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000))]
    pub(crate) broker_restarts: u32,
    /// The shell command that restarts the broker, run with `sh -c`.
    #[arg(long)]
    pub(crate) broker_restart_cmd: Option<String>,
    /// Cuts of every client connection to the store, at even steps of progress
    /// (`pg_terminate_backend`, MySQL `KILL`, Redis `CLIENT KILL`).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000))]
    pub(crate) cuts: u32,
    /// Seed of the events and the fault schedule (random if not given; printed).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Gate lease, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub(crate) lease_ms: u64,
    /// Visibility timeout (embedded, SQS) or ack wait (NATS), in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1000..=600_000))]
    pub(crate) visibility_ms: u64,
    /// Apply the gate-mode effect without the derived key, to show what the window between the
    /// effect and `complete` costs.
    #[arg(long)]
    pub(crate) no_derived_keys: bool,
    /// Skip the naive run.
    #[arg(long)]
    pub(crate) no_naive: bool,
    /// Events the naive run produces (default: `--events`), with the same kills and faults:
    /// it only has to show the damage.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub(crate) naive_events: Option<u64>,
    /// Keep the run directory, tables and destinations here (default: a temporary directory,
    /// removed afterwards, and the tables dropped).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Give up on a run after this many seconds (what is not applied by then is lost).
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub(crate) timeout_secs: u64,
    /// Give up on a run when nothing has been delivered or applied for this many seconds.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) stall_secs: u64,
    /// Prove the HTTP layer instead of a consumer: a service process behind the layer on
    /// `--store` (SQLite, PostgreSQL, MySQL or Redis; default SQLite), killed at `after-claim`,
    /// `after-effect`, `before-complete` and `mid-response`, under `--workers` × `--concurrency`
    /// clients that disconnect and retry. The broker flags do not apply.
    #[arg(long)]
    pub(crate) http: bool,
    /// Prove a consume-transform-produce chain instead: billing workers consume orders and
    /// enqueue invoices in their inbox transaction (the transactional outbox), relays publish
    /// them, ledger workers consume them with their own inbox. Kills at `after-commit`,
    /// `in-transaction`, `before-mark` (a relay published and did not mark) and `mid-batch`,
    /// with `--store-restarts` and `--broker-restarts`; the naive chain commits, then
    /// publishes. `--store` is a `postgres://`, `mysql://` or `sqlite:` database.
    #[arg(long, conflicts_with = "http")]
    pub(crate) pipeline: bool,
    /// Prove the sidecar instead: events on the broker (embedded, RabbitMQ or NATS), some
    /// published twice, delivered by `idemgate bridge` through `idemgate proxy` to a Python
    /// service that records the key with its effect, while the bridge and the service are
    /// SIGKILLed in turn; the naive chain's bridge forgets at every kill and its service
    /// applies whatever comes.
    #[arg(long, conflicts_with_all = ["http", "pipeline"])]
    pub(crate) bridge: bool,
    /// Print the figures as one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write a self-contained HTML report with a timeline of throughput, faults and duplicates.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
}

/// A fault the supervisor injects when progress reaches a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Fault {
    StoreRestart,
    BrokerRestart,
    Cut,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::StoreRestart => "store restart",
            Fault::BrokerRestart => "broker restart",
            Fault::Cut => "connection cut",
        }
    }
}

/// Events with fresh ids and amounts of 1 to 100, and their publish order: every event once,
/// `dup_rate` of them (rounded up) a second time, at most `spread` positions after the event's
/// own index. Returns the events, the order (indexes) and how many were published twice.
fn publish_plan(
    rng: &mut StdRng,
    events: u64,
    dup_rate: f64,
    spread: usize,
) -> (Vec<(String, i32)>, Vec<usize>, usize) {
    let events: Vec<(String, i32)> = (0..events)
        .map(|_| {
            // drawn as i64, as the seeds' schedules always were
            let amount: i64 = rng.random_range(1..=100);
            (
                EventId::new().to_string(),
                i32::try_from(amount).unwrap_or(100),
            )
        })
        .collect();
    // dup_rate is in [0, 1], so the count is in 0..=events
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let dup_count = ((events.len() as f64) * dup_rate).ceil() as usize;
    let mut order: Vec<usize> = (0..events.len()).collect();
    let mut dups: Vec<usize> = (0..events.len()).collect();
    dups.shuffle(rng);
    for &d in dups.iter().take(dup_count) {
        let last = order.len().min(d + spread);
        let at = rng.random_range(d + 1..=last);
        order.insert(at, d);
    }
    (events, order, dup_count)
}

/// What a given seed decides: the events, the duplicates, and every fault.
#[derive(Debug, Serialize)]
struct Schedule {
    #[serde(skip)]
    events: Vec<Event>,
    /// Publish order: event indexes, the duplicated ones twice.
    #[serde(skip)]
    order: Vec<usize>,
    published_twice: u64,
    /// Kill plans in spawn order: the point and the delivery count it waits for.
    kills: Vec<(&'static str, u64)>,
    /// Kills the supervisor arms once this fraction of the events is settled, each on a
    /// redelivered message where one comes: the run's tail.
    tail_kills: Vec<(&'static str, f64)>,
    /// Zombie plans in spawn order: the delivery count.
    zombies: Vec<u64>,
    /// Faults at fractions of the events applied.
    faults: Vec<(f64, Fault)>,
}

impl Schedule {
    fn new(args: &ChaosArgs, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // the second copy of a duplicate somewhere later, up to a few hundred messages on
        let (events, order, dup_count) = publish_plan(&mut rng, args.events, args.dup_rate, 500);
        // a key's sequence follows the publish order of its events' first copies (a copy
        // published twice may go out first)
        let mut seqs = vec![0u32; events.len()];
        let (mut next, mut seen) = (vec![0u32; KEYS], vec![false; events.len()]);
        for &i in &order {
            if !std::mem::replace(&mut seen[i], true) {
                seqs[i] = next[i % KEYS];
                next[i % KEYS] += 1;
            }
        }
        let events: Vec<Event> = events
            .into_iter()
            .enumerate()
            .map(|(i, (id, amount))| Event {
                id,
                key: key_of(i),
                seq: seqs[i],
                amount,
                fails: if rng.random_bool(args.poison_rate) {
                    if rng.random_bool(0.5) {
                        rng.random_range(1..=2)
                    } else {
                        ALWAYS
                    }
                } else {
                    0
                },
            })
            .collect();
        // the plans are spread over the run: each slot goes through its share of the kills and
        // zombies one worker life after another, and a life lasts between half and all of an
        // equal part of the slot's deliveries (redeliveries included), so the last lives die
        // in the redelivery tail and none outlives the events
        // Half the kills are armed by the supervisor later in the run, on redeliveries
        let tail = args.kills / 2;
        let workers = u64::from(args.workers.max(1));
        let per_slot = u64::from(args.kills - tail + args.zombies).div_ceil(workers) + 1;
        let span = (args.events / workers / per_slot).max(2);
        let kills = (0..args.kills - tail)
            .map(|_| {
                let p = KillPoint::ALL[rng.random_range(0..KillPoint::ALL.len())];
                (p.name(), rng.random_range(span / 2..=span))
            })
            .collect();
        let tail_kills = (0..tail)
            .map(|j| {
                let p = KillPoint::ALL[rng.random_range(0..KillPoint::ALL.len())];
                (
                    p.name(),
                    TAIL_FROM + TAIL_SPAN * f64::from(j + 1) / f64::from(tail),
                )
            })
            .collect();
        let zombies = (0..args.zombies)
            .map(|_| rng.random_range(span / 2..=span))
            .collect();
        let mut faults = Vec::new();
        for (n, fault) in [
            (args.store_restarts, Fault::StoreRestart),
            (args.broker_restarts, Fault::BrokerRestart),
            (args.cuts, Fault::Cut),
        ] {
            for i in 0..n {
                // even steps, shifted a little per kind so two faults rarely coincide
                let at = f64::from(i + 1) / f64::from(n + 1) + rng.random_range(-0.03..0.03);
                faults.push((at.clamp(0.05, 0.9), fault));
            }
        }
        faults.sort_by(|a, b| a.0.total_cmp(&b.0));
        Schedule {
            events,
            order,
            published_twice: dup_count as u64,
            kills,
            tail_kills,
            zombies,
            faults,
        }
    }
}

/// Tail kills are armed between these fractions of the events settled, evenly.
const TAIL_FROM: f64 = 0.5;
const TAIL_SPAN: f64 = 0.4;
/// The producer holds back this share of the events while kills are due, so there is work to
/// kill a worker in: while nothing is delivered for [`IDLE`], one held event per worker goes
/// out every [`IDLE`] (once none is left, a re-published one).
const RESERVE: f64 = 0.05;
/// No delivery for this long: the run is idle.
const IDLE: Duration = Duration::from_millis(500);
/// An armed tail kill that did not fire in this long is armed in another worker.
const ARMED_FOR: Duration = Duration::from_secs(3);

/// The figures of one run.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Figures {
    mode: &'static str,
    events: u64,
    deliveries: u64,
    duplicate_deliveries: u64,
    published_twice: u64,
    /// Messages the producer had published (and the broker confirmed) when the run ended.
    published: u64,
    publish_retries: u64,
    kills: u64,
    kills_by_point: BTreeMap<&'static str, u64>,
    zombies: u64,
    zombies_fenced: u64,
    store_restarts: u64,
    broker_restarts: u64,
    connection_cuts: u64,
    worker_exits: u64,
    /// Dead letters the workers reported stored.
    dead_letters: u64,
    /// Poison events planned: failing once or twice, and always failing.
    poison_transient: u64,
    poison_permanent: u64,
    /// Events found in the dead-letter destination after the run.
    dead_lettered: u64,
    /// Events found there more than once.
    dead_lettered_twice: u64,
    /// Events both applied and dead-lettered.
    applied_and_dead_lettered: u64,
    /// Events that are not poison but were dead-lettered.
    healthy_dead_lettered: u64,
    /// Dead letters without the reason header (the broker's own redrive, not the consumer's).
    dead_letters_without_reason: u64,
    /// Up to 10 of their events, to look for in the workers' logs (`--dir`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unreasoned_events: Vec<String>,
    /// Events neither applied nor dead-lettered.
    lost: u64,
    /// Effects applied after a later event of the same ordering key.
    out_of_order: u64,
    /// Up to 10 of the lost events, to look for in the workers' logs (`--dir`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    lost_events: Vec<String>,
    applied_twice: u64,
    /// Gate mode: effects run again because a kill or a freeze came between the effect and its
    /// recorded completion (the Gate's window), each stopped by the derived key; without
    /// derived keys (`--no-derived-keys`) they are in `applied_twice` instead.
    window_reruns: u64,
    extra_effects: u64,
    balance_ok: bool,
    seconds: f64,
    /// When each kill happened, in seconds from the start: they are spread over the run.
    kill_times: Vec<f64>,
    /// Kills of a worker while it handled a redelivered message.
    kills_on_redelivery: u64,
    /// When the last message was delivered, in seconds from the start: the end of the
    /// redelivery tail.
    last_delivery: f64,
    #[serde(skip)]
    timeline: Vec<Sample>,
    #[serde(skip)]
    fault_log: Vec<(f64, String)>,
}

/// One point of the timeline.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    t: f64,
    deliveries: u64,
    duplicates: u64,
    applications: u64,
}

#[derive(Serialize)]
struct Report<'a> {
    seed: u64,
    broker: &'static str,
    store: &'a str,
    ledger: &'a str,
    schedule: &'a Schedule,
    naive: Option<&'a Figures>,
    idemgate: &'a Figures,
}

/// Where a run's pieces are.
struct Setup {
    broker_url: String,
    store: Option<String>,
    ledger: String,
    run_id: String,
}

/// Runs `idemgate chaos`: both phases (naive, then idemgate), the report, and the verdict.
pub fn run(args: ChaosArgs) -> Result<ExitCode, BoxError> {
    run_as("chaos", &args)
}

/// Runs the harness as `idemgate <command>` (`chaos`, or `demo` on embedded defaults).
pub(crate) fn run_as(command: &str, args: &ChaosArgs) -> Result<ExitCode, BoxError> {
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
    if args.http {
        return http::run(args, seed, &base);
    }
    if args.pipeline {
        return pipeline::run(args, seed, &base);
    }
    if args.bridge {
        return bridge::run(args, seed, &base);
    }
    let setup = validate(args, seed, &base)?;
    if !args.json {
        let faults = report::nonzero(
            [
                (args.kills, "kills"),
                (args.zombies, "zombies"),
                (args.store_restarts, "store restarts"),
                (args.broker_restarts, "broker restarts"),
                (args.cuts, "connection cuts"),
            ]
            .map(|(n, what)| (u64::from(n), what)),
        );
        eprintln!(
            "idemgate {command}: {} broker, {} mode, store {}, ledger {}; {} events ({}% published \
             twice), {} workers, {}; seed {seed}",
            args.broker.name(),
            args.mode.name(),
            setup.store.as_deref().unwrap_or("-"),
            setup.ledger,
            args.events,
            args.dup_rate * 100.0,
            args.workers,
            faults.as_deref().unwrap_or("no faults")
        );
    }
    let schedule = Schedule::new(args, seed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let progress = MultiProgress::new();
    if args.json {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let naive = if args.no_naive {
        None
    } else {
        let naive = ChaosArgs {
            events: args.naive_events.unwrap_or(args.events),
            ..args.clone()
        };
        let naive_schedule = Schedule::new(&naive, seed);
        Some(rt.block_on(phase(
            WorkerMode::Naive,
            &naive,
            &setup,
            &naive_schedule,
            &base,
            &progress,
        ))?)
    };
    let mode = match args.mode {
        IdemMode::Inbox => WorkerMode::Inbox,
        IdemMode::Gate => WorkerMode::Gate,
    };
    let idem = rt.block_on(phase(mode, args, &setup, &schedule, &base, &progress))?;
    let _ = progress.clear();

    if args.json {
        let r = Report {
            seed,
            broker: args.broker.name(),
            store: setup.store.as_deref().unwrap_or("-"),
            ledger: &setup.ledger,
            schedule: &schedule,
            naive: naive.as_ref(),
            idemgate: &idem,
        };
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        report::table(naive.as_ref(), &idem);
    }
    if let Some(path) = &args.report {
        let title = format!(
            "idemgate {command}: {} broker, {} mode, {} events, seed {seed}",
            args.broker.name(),
            args.mode.name(),
            args.events
        );
        std::fs::write(path, report::html(&title, naive.as_ref(), &idem))?;
        if !args.json {
            eprintln!("report written to {}", path.display());
        }
    }

    let mut failures = Vec::new();
    if idem.lost > 0 {
        failures.push(format!("{} effects lost", idem.lost));
    }
    if idem.applied_twice > 0 {
        failures.push(format!("{} effects applied twice", idem.applied_twice));
    }
    for (n, what) in [
        (idem.dead_lettered_twice, "events dead-lettered twice"),
        (
            idem.applied_and_dead_lettered,
            "events applied and dead-lettered",
        ),
        (
            idem.healthy_dead_lettered,
            "events dead-lettered that were not poison",
        ),
        (
            idem.dead_letters_without_reason,
            "dead letters without their reason",
        ),
    ] {
        if n > 0 {
            failures.push(format!("{n} {what}"));
        }
    }
    if idem.poison_permanent > idem.dead_lettered {
        failures.push(format!(
            "{} always-failing events, {} dead-lettered",
            idem.poison_permanent, idem.dead_lettered
        ));
    }
    let order_kept = if args.broker_restarts > 0 {
        args.broker.keeps_order_across_restarts()
    } else {
        args.broker.keeps_order()
    };
    if idem.out_of_order > 0 && order_kept {
        failures.push(format!(
            "{} effects applied out of their key's order",
            idem.out_of_order
        ));
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
    if idem.zombies < u64::from(args.zombies) {
        failures.push(format!(
            "only {} of {} zombies happened",
            idem.zombies, args.zombies
        ));
    }
    if failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("idemgate {command} FAILED: {}", failures.join("; "));
        Ok(ExitCode::FAILURE)
    }
}

/// Checks the flags against each other and settles the store and ledger URLs.
fn validate(args: &ChaosArgs, seed: u64, base: &Path) -> Result<Setup, BoxError> {
    if args.fifo && !args.broker.has_fifo() {
        return Err("--fifo is for --broker sqs".into());
    }
    let broker_url = args
        .url
        .clone()
        .unwrap_or_else(|| args.broker.default_url().to_owned());
    let sqlite = |name: &str| format!("sqlite:{}", base.join(name).display());
    let (store, ledger) = match args.mode {
        IdemMode::Inbox => {
            let store = args.store.clone().unwrap_or_else(|| sqlite("ledger.db"));
            if !is_postgres(&store) && !is_mysql(&store) && sqlite_path(&store).is_none() {
                return Err(format!(
                    "inbox mode needs a postgres://, mysql:// or sqlite: store, not {store:?}"
                )
                .into());
            }
            if args.ledger.as_ref().is_some_and(|l| *l != store) {
                return Err(
                    "in inbox mode the ledger is the store's database: drop --ledger".into(),
                );
            }
            (store.clone(), store)
        }
        IdemMode::Gate => (
            args.store.clone().unwrap_or_else(|| sqlite("store.db")),
            args.ledger.clone().unwrap_or_else(|| sqlite("ledger.db")),
        ),
    };
    if args.zombies > 0 && args.mode != IdemMode::Gate {
        return Err(
            "--zombies needs gate mode: a lease to outlive and a completion to fence".into(),
        );
    }
    if args.store_restarts > 0 && args.store_restart_cmd.is_none() {
        return Err("--store-restarts needs --store-restart-cmd".into());
    }
    if args.broker_restarts > 0 && args.broker_restart_cmd.is_none() {
        return Err("--broker-restarts needs --broker-restart-cmd".into());
    }
    if args.cuts > 0 && !(is_postgres(&store) || is_mysql(&store) || store.starts_with("redis://"))
    {
        return Err(format!(
            "--cuts works on a postgres://, mysql:// or redis:// store, not {store:?}"
        )
        .into());
    }
    Ok(Setup {
        broker_url,
        store: Some(store),
        ledger,
        run_id: format!(
            "{:08x}",
            (seed ^ u64::from(std::process::id())) & 0xffff_ffff
        ),
    })
}

/// One worker slot.
struct Slot {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    generation: u64,
    /// When a replacement may start (a killed Kafka member waits out its session).
    respawn_at: Option<Instant>,
    /// Last reported (handled, duplicates, fenced) of the current generation.
    stats: (u64, u64, u64),
    ready: bool,
    /// The plan the current generation carries, until it fires.
    plan: Option<Plan>,
    /// When the current generation last received a message.
    last_recv: Option<Instant>,
}

/// A fault planned for one worker's life.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// SIGKILL at the point, at or after this many deliveries.
    Kill(&'static str, u64),
    /// Frozen past its lease at or after this many deliveries.
    Zombie(u64),
}

/// A tail kill armed in a worker.
struct ArmedKill {
    slot: usize,
    generation: u64,
    since: Instant,
    kill: (&'static str, f64),
}

/// A worker frozen past its lease.
struct Zombie {
    slot: usize,
    pid: u32,
    id: String,
    since: Instant,
    // the token of the frozen worker's claim, once read from the store
    token: Option<u64>,
}

/// One phase (the naive run or the idemgate run) in progress.
struct Phase<'a> {
    args: &'a ChaosArgs,
    setup: &'a Setup,
    mode: WorkerMode,
    dir: PathBuf,
    prefix: String,
    destination: String,
    lines: mpsc::UnboundedSender<(usize, u64, String)>,
    next_generation: u64,
    /// Plans not yet handed to a worker; a worker that exits before its plan fired gives it
    /// back, so every planned fault happens.
    plans: std::collections::VecDeque<Plan>,
    /// Tail kills not yet fired: the point and the fraction settled that arms it.
    tail: std::collections::VecDeque<(&'static str, f64)>,
    /// Tail kills armed in workers, not fired yet.
    armed: Vec<ArmedKill>,
    slots: Vec<Slot>,
    fig: Figures,
    seen: HashSet<String>,
    /// Events the workers dead-lettered (the broker confirmed the dead letter).
    dead: HashSet<String>,
    /// Stats of finished generations: (handled, duplicates, fenced).
    past: (u64, u64, u64),
    start: Instant,
    /// With `--dir`: every line the workers said, with its slot and generation.
    trace: Option<std::io::BufWriter<File>>,
    /// When a worker last died: no replacement joins a Kafka group within the rejoin delay of
    /// *any* death (tansu never assigns partitions to a member that joined while a dead
    /// member's session was still open).
    last_death: Instant,
}

/// The binary workers run: this very image. On Linux `/proc/self/exe` still works after the
/// file was replaced (a rebuild during a long run), where the path of `current_exe` is gone.
fn worker_exe() -> std::io::Result<PathBuf> {
    let proc_exe = Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe.to_owned());
    }
    std::env::current_exe()
}

fn signal(pid: u32, sig: &str) -> Result<(), BoxError> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill {sig} {pid} failed").into())
    }
}

impl Phase<'_> {
    fn t(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Seconds since the start, to a tenth, for the report.
    fn t_tenths(&self) -> f64 {
        (self.t() * 10.0).round() / 10.0
    }

    fn log_fault(&mut self, what: impl Into<String>) {
        let t = self.t();
        self.fig.fault_log.push((t, what.into()));
    }

    /// Starts a worker in `slot` with the next kill or zombie plan, if any is left.
    fn spawn(&mut self, slot: usize) -> Result<(), BoxError> {
        self.next_generation += 1;
        let generation = self.next_generation;
        let a = self.args;
        let mut cmd = Command::new(worker_exe()?);
        cmd.arg("chaos-worker")
            .args(["--broker", a.broker.name(), "--url", &self.setup.broker_url])
            .args(["--destination", &self.destination])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--slot", &slot.to_string()])
            .args(["--mode", self.mode.name()])
            .args(["--ledger", &self.setup.ledger, "--prefix", &self.prefix])
            .args(["--lease-ms", &a.lease_ms.to_string()])
            .args(["--visibility-ms", &a.visibility_ms.to_string()])
            .args(["--concurrency", &a.concurrency.to_string()])
            .args(["--inbox-batch", &a.inbox_batch.to_string()]);
        if self.mode != WorkerMode::Naive
            && let Some(store) = &self.setup.store
        {
            cmd.args(["--store", store]);
        }
        if a.no_derived_keys {
            cmd.arg("--no-derived-keys");
        }
        let plan = self.plans.pop_front();
        match plan {
            Some(Plan::Zombie(after)) => {
                cmd.args(["--zombie-after", &after.to_string()]);
            }
            Some(Plan::Kill(point, after)) => {
                cmd.args(["--die-at", point, "--die-after", &after.to_string()]);
            }
            None => {}
        }
        let log = File::create(self.dir.join(format!("worker-{slot}-{generation}.log")))?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no worker stdout")?;
        let stdin = child.stdin.take();
        let tx = self.lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((slot, generation, line)).is_err() {
                    return;
                }
            }
        });
        let s = &mut self.slots[slot];
        s.child = Some(child);
        s.stdin = stdin;
        s.generation = generation;
        s.respawn_at = None;
        s.stats = (0, 0, 0);
        s.ready = false;
        s.plan = plan;
        s.last_recv = None;
        Ok(())
    }

    /// Ends the current generation of `slot` (its stats kept) and schedules its replacement.
    fn retire(&mut self, slot: usize, delay: Duration) {
        let s = &mut self.slots[slot];
        // a plan that did not fire goes to the next worker
        if let Some(plan) = s.plan.take() {
            self.plans.push_front(plan);
        }
        if let Some(mut c) = s.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        s.stdin = None;
        self.past.0 += s.stats.0;
        self.past.1 += s.stats.1;
        self.past.2 += s.stats.2;
        s.stats = (0, 0, 0);
        s.respawn_at = Some(Instant::now() + delay);
        self.last_death = Instant::now();
        // a kill armed in a worker that went otherwise is armed again elsewhere
        while let Some(i) = self.armed.iter().position(|a| a.slot == slot) {
            let a = self.armed.swap_remove(i);
            self.tail.push_front(a.kill);
        }
    }

    /// Whether a kill or zombie is still to happen.
    fn faults_due(&self) -> bool {
        !self.tail.is_empty()
            || !self.armed.is_empty()
            || !self.plans.is_empty()
            || self.slots.iter().any(|s| s.plan.is_some())
    }

    /// Brings the plans of live workers forward when nothing moves: a kill plan is armed at its
    /// point, a zombie plan freezes at its next claim (a worker may not see the deliveries its
    /// plan counts on before the events run out).
    fn force_plans(&mut self) {
        for slot in 0..self.slots.len() {
            let s = &self.slots[slot];
            if s.child.is_none() || !s.ready || self.armed.iter().any(|a| a.slot == slot) {
                continue;
            }
            match s.plan {
                Some(Plan::Kill(point, _)) => self.tell(slot, &format!("ARM {point}")),
                Some(Plan::Zombie(_)) => self.tell(slot, "ZOMBIE"),
                None => {}
            }
        }
    }

    /// Arms every tail kill whose share of the events is settled, each in a worker of its own:
    /// those without a plan of their own first, then those that received last (under a single
    /// active consumer, the only one receiving). One armed for too long without firing is
    /// armed again, elsewhere if it can.
    fn arm_tail(&mut self, done: f64) {
        let mut i = 0;
        while i < self.armed.len() {
            if self.armed[i].since.elapsed() < ARMED_FOR {
                i += 1;
                continue;
            }
            let a = self.armed.swap_remove(i);
            if self.slots[a.slot].generation == a.generation {
                self.tell(a.slot, "DISARM");
            }
            self.tail.push_front(a.kill);
        }
        let mut free: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                let s = &self.slots[i];
                // never a worker that is to be a zombie: a kill would take its completion
                s.child.is_some()
                    && s.ready
                    && !matches!(s.plan, Some(Plan::Zombie(_)))
                    && !self.armed.iter().any(|a| a.slot == i)
            })
            .collect();
        // the best candidate last
        free.sort_by_key(|&i| (self.slots[i].plan.is_none(), self.slots[i].last_recv));
        while self.tail.front().is_some_and(|&(_, at)| done >= at) {
            let Some(slot) = free.pop() else {
                break;
            };
            let Some(kill) = self.tail.pop_front() else {
                break;
            };
            self.tell(slot, &format!("ARM {}", kill.0));
            self.armed.push(ArmedKill {
                slot,
                generation: self.slots[slot].generation,
                since: Instant::now(),
                kill,
            });
        }
    }

    /// Writes one line to the worker in `slot`.
    fn tell(&mut self, slot: usize, line: &str) {
        if let Some(stdin) = &mut self.slots[slot].stdin {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    fn worker_log(&self, slot: usize) -> String {
        let g = self.slots[slot].generation;
        let log = self.dir.join(format!("worker-{slot}-{g}.log"));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Handles one line a worker said. Returns a zombie to handle, if it froze itself.
    fn line(
        &mut self,
        slot: usize,
        generation: u64,
        line: &str,
    ) -> Result<Option<Zombie>, BoxError> {
        if let Some(trace) = &mut self.trace {
            writeln!(
                trace,
                "{:.3} {slot}/{generation} {line}",
                self.start.elapsed().as_secs_f64()
            )?;
        }
        if self.slots[slot].generation != generation {
            return Ok(None);
        }
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "READY" => self.slots[slot].ready = true,
            "RECV" => {
                self.fig.deliveries += 1;
                self.slots[slot].last_recv = Some(Instant::now());
                self.fig.last_delivery = self.t_tenths();
                if !self.seen.insert(rest.to_owned()) {
                    self.fig.duplicate_deliveries += 1;
                }
            }
            "REPEAT" => self.fig.window_reruns += 1,
            "DEAD" => {
                self.fig.dead_letters += 1;
                self.dead.insert(rest.to_owned());
            }
            "STATS" => {
                let n: Vec<u64> = rest.split(' ').filter_map(|v| v.parse().ok()).collect();
                if let [h, d, f] = n[..] {
                    self.slots[slot].stats = (h, d, f);
                }
            }
            "AT" => {
                let mut words = rest.split(' ');
                let point = words.next().unwrap_or("");
                // a third word: an armed kill (the tail's, or a plan brought forward), on a
                // redelivery or not
                if let Some(what) = words.nth(1) {
                    if what == "redelivery" {
                        self.fig.kills_on_redelivery += 1;
                    }
                    // the armed tail kill fired (a plan brought forward is cleared below)
                    self.armed.retain(|a| a.slot != slot);
                }
                let point = KillPoint::ALL
                    .into_iter()
                    .find(|p| p.name() == point)
                    .ok_or_else(|| format!("a worker stopped at an unknown point: {line}"))?;
                // the worker is parked at the point: a real SIGKILL, then a fresh process
                self.fig.kills += 1;
                *self.fig.kills_by_point.entry(point.name()).or_default() += 1;
                self.log_fault(format!("SIGKILL at {}", point.name()));
                let t = self.t_tenths();
                self.fig.kill_times.push(t);
                self.slots[slot].plan = None;
                self.retire(slot, self.args.broker.rejoin_delay());
            }
            "ZOMBIE" => {
                let pid = self.slots[slot]
                    .child
                    .as_ref()
                    .map(Child::id)
                    .ok_or("a zombie without a process")?;
                signal(pid, "-STOP")?;
                self.slots[slot].plan = None;
                self.log_fault("SIGSTOP (zombie)");
                return Ok(Some(Zombie {
                    slot,
                    pid,
                    id: rest.to_owned(),
                    since: Instant::now(),
                    token: None,
                }));
            }
            _ => {}
        }
        Ok(None)
    }

    fn stats(&self) -> (u64, u64, u64) {
        self.slots.iter().fold(self.past, |acc, s| {
            (acc.0 + s.stats.0, acc.1 + s.stats.1, acc.2 + s.stats.2)
        })
    }
}

/// Runs `cmd` with `sh -c`; its output goes to the phase directory's log.
pub(super) async fn shell(cmd: &str, log: &Path) -> Result<(), BoxError> {
    let (cmd, log) = (cmd.to_owned(), log.to_owned());
    tokio::task::spawn_blocking(move || -> Result<(), BoxError> {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        writeln!(out, "$ {cmd}")?;
        let status = Command::new("sh")
            .args(["-c", &cmd])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("`{cmd}` failed ({status}); see {}", log.display()).into())
        }
    })
    .await?
}

/// Cuts every other client connection of the store at `url`, once the server takes
/// connections: a cut may fall in a restart of the same server.
pub(super) async fn cut(url: &str) -> Result<u64, BoxError> {
    for_a_minute(|| cut_once(url), |_| true).await
}

/// Runs `op` again every 200 ms while it fails with an error `retry` accepts, for up to a
/// minute: a server that restarts comes back within it.
pub(super) async fn for_a_minute<T, E, F>(
    mut op: impl FnMut() -> F,
    retry: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        match op().await {
            Err(e) if retry(&e) && Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            done => return done,
        }
    }
}

async fn cut_once(url: &str) -> Result<u64, BoxError> {
    if is_postgres(url) {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url).await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
                AND backend_type = 'client backend'",
        )
        .fetch_one(&mut conn)
        .await?;
        return Ok(u64::try_from(n).unwrap_or(0));
    }
    if is_mysql(url) {
        let url = url.replacen("mariadb://", "mysql://", 1);
        let mut conn = <sqlx::MySqlConnection as sqlx::Connection>::connect(&url).await?;
        let ids: Vec<u64> = sqlx::query_scalar(
            "SELECT CAST(ID AS UNSIGNED) FROM information_schema.PROCESSLIST
              WHERE ID <> CONNECTION_ID() AND DB = DATABASE() AND COMMAND <> 'Daemon'",
        )
        .fetch_all(&mut conn)
        .await?;
        let mut n = 0;
        for id in ids {
            // a connection may be gone by now
            if sqlx::query(&format!("KILL {id}"))
                .execute(&mut conn)
                .await
                .is_ok()
            {
                n += 1;
            }
        }
        return Ok(n);
    }
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let n: u64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
        .query_async(&mut conn)
        .await?;
    Ok(n)
}

/// The producer's count of published messages carries this bit once the whole schedule is out.
const ALL_OUT: u64 = 1 << 63;

/// The producer: publishes the schedule's order, keeping at most `backlog` events ahead of
/// those applied, and re-publishes what the supervisor asks for (a frozen worker's event).
struct Production {
    broker: ChaosBroker,
    url: String,
    destination: String,
    dir: PathBuf,
    workers: usize,
    events: Vec<Event>,
    order: Vec<usize>,
    /// At most this many distinct events published and not yet applied.
    backlog: u64,
    /// The last events of the order, held back until the supervisor releases them.
    reserve: usize,
    /// How many of the reserve may go out.
    release: Arc<AtomicU64>,
    /// Events applied (from the ledger).
    touched: Arc<AtomicU64>,
    /// Messages published, with [`ALL_OUT`] once the schedule is out.
    published: Arc<AtomicU64>,
    /// Publishes retried on a fresh connection.
    retries: Arc<AtomicU64>,
}

async fn produce(p: Production, mut again: mpsc::UnboundedReceiver<usize>) -> Result<(), BoxError> {
    let Production {
        broker,
        url,
        destination,
        dir,
        workers,
        events,
        order,
        backlog,
        reserve,
        release,
        touched,
        published,
        retries,
    } = p;
    let held_from = order.len().saturating_sub(reserve);
    let connect = || Producer::connect(broker, &url, &destination, &dir, workers);
    let mut producer = connect().await?;
    // distinct events among the first n published, to compare with the events applied (a
    // count of messages would run ahead by the duplicates and wait for ever at the end)
    let mut firsts = vec![false; events.len()];
    let distinct: Vec<u64> = order
        .iter()
        .scan(0u64, |n, &i| {
            *n += u64::from(!std::mem::replace(&mut firsts[i], true));
            Some(*n)
        })
        .collect();
    let mut next = 0usize;
    loop {
        let i = match again.try_recv() {
            Ok(i) => i,
            Err(_) if next < order.len() => {
                let ahead = if next == 0 { 0 } else { distinct[next - 1] };
                let held = next >= held_from
                    && u64::try_from(next - held_from).unwrap_or(u64::MAX)
                        >= release.load(Ordering::Relaxed);
                if held || ahead >= touched.load(Ordering::Relaxed) + backlog {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                next += 1;
                order[next - 1]
            }
            Err(_) => match again.recv().await {
                Some(i) => i,
                None => return Ok(()),
            },
        };
        // a failed publish is retried on a fresh connection (a broker restart): a publish that
        // did land before the failure arrives twice, as it would in production
        while let Err(e) = producer.publish(&events[i]).await {
            retries.fetch_add(1, Ordering::Relaxed);
            let _ = e;
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(p) = connect().await {
                producer = p;
            }
        }
        published.fetch_add(1, Ordering::Relaxed);
        if next == order.len() {
            // the whole schedule is out (set again after a re-publish: no harm)
            published.fetch_or(ALL_OUT, Ordering::Relaxed);
        }
    }
}

async fn phase(
    mode: WorkerMode,
    args: &ChaosArgs,
    setup: &Setup,
    schedule: &Schedule,
    base: &Path,
    progress: &MultiProgress,
) -> Result<Figures, BoxError> {
    let dir = base.join(mode.name());
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let prefix = format!("chaos_{}_{}", setup.run_id, mode.name());
    let name = format!("idemgate-chaos-{}-{}", setup.run_id, mode.name());
    let workers = usize::from(args.workers);
    let visibility = Duration::from_millis(args.visibility_ms);
    let faults_log = dir.join("faults.log");

    // the ledger, the inbox (its tables beside the ledger's) or the store, and the destination
    let ledger = Ledger::open(&setup.ledger, &prefix, 4).await?;
    ledger.create(&schedule.events).await?;
    let inbox = match (mode, &setup.store) {
        (WorkerMode::Inbox, Some(url)) => {
            let inbox = SqlInbox::open(url, &prefix, 2).await?;
            inbox.migrate().await?;
            Some(inbox)
        }
        _ => None,
    };
    if let (WorkerMode::Gate, Some(url)) = (mode, &setup.store) {
        // migrates a SQL store once, before the workers open it
        let (_, warnings) = idemgate::open_checked(url).await?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
    }
    let destination = broker::create_destination(
        args.broker,
        &setup.broker_url,
        &name,
        &dir,
        workers,
        visibility,
        args.fifo,
    )
    .await?;

    let bar = progress.add(ProgressBar::new(args.events));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} events applied · {msg}")?
            .progress_chars("=> "),
    );
    bar.set_prefix(mode.name());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut ph = Phase {
        args,
        setup,
        mode,
        dir: dir.clone(),
        prefix: prefix.clone(),
        destination: destination.clone(),
        lines: tx,
        next_generation: 0,
        plans: schedule
            .zombies
            .iter()
            .map(|&after| Plan::Zombie(after))
            .chain(
                schedule
                    .kills
                    .iter()
                    .map(|&(p, after)| Plan::Kill(p, after)),
            )
            .collect(),
        tail: schedule.tail_kills.iter().copied().collect(),
        armed: Vec::new(),
        slots: (0..workers)
            .map(|_| Slot {
                child: None,
                stdin: None,
                generation: 0,
                respawn_at: None,
                stats: (0, 0, 0),
                ready: false,
                plan: None,
                last_recv: None,
            })
            .collect(),
        fig: Figures {
            mode: mode.name(),
            events: args.events,
            published_twice: schedule.published_twice,
            ..Figures::default()
        },
        seen: HashSet::new(),
        dead: HashSet::new(),
        past: (0, 0, 0),
        start: Instant::now(),
        trace: match &args.dir {
            Some(_) => Some(std::io::BufWriter::new(File::create(
                dir.join("lines.log"),
            )?)),
            None => None,
        },
        last_death: Instant::now(),
    };
    let result = supervise(&mut ph, &mut rx, schedule, &ledger, &bar, &faults_log).await;
    for s in &mut ph.slots {
        if let Some(c) = &mut s.child {
            let _ = signal(c.id(), "-CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    let seconds = ph.start.elapsed().as_secs_f64();
    result?;
    bar.finish_with_message(format!("done in {seconds:.1}s, {} kills", ph.fig.kills));

    let tally = ledger.tally().await?;
    let fig = &mut ph.fig;
    fig.lost = tally.lost;
    if tally.lost > 0 {
        fig.lost_events = ledger.lost_ids().await?;
    }
    if mode != WorkerMode::Naive {
        // each event applied exactly once, or in the dead-letter destination exactly once with
        // its reason
        let dead = broker::dead_letters(args.broker, &setup.broker_url, &destination, &dir).await?;
        check_dead_letters(fig, schedule, &ledger.applications().await?, &dead);
    }
    fig.applied_twice = tally.twice;
    fig.out_of_order = tally.out_of_order;
    fig.extra_effects = (tally.applications + tally.lost).saturating_sub(args.events);
    fig.balance_ok = tally.balance_ok;
    fig.seconds = seconds;
    if args.dir.is_none() {
        ledger.drop_tables().await?;
        if let Some(inbox) = &inbox {
            inbox
                .drop_tables(setup.store.as_deref().unwrap_or_default(), &prefix)
                .await?;
        }
        broker::delete_destination(args.broker, &setup.broker_url, &destination).await?;
    }
    Ok(std::mem::take(&mut ph.fig))
}

impl Figures {
    /// Gate mode: effects run again in the window between an effect and its recorded
    /// completion, stopped by the derived key or (without one) applied twice.
    pub(crate) fn window(&self) -> u64 {
        self.window_reruns + self.applied_twice
    }
}

/// Compares the ledger and the dead-letter destination with the plan.
fn check_dead_letters(
    fig: &mut Figures,
    schedule: &Schedule,
    applied: &[(String, i64)],
    dead: &[broker::DeadLetter],
) {
    let applied: HashMap<&str, i64> = applied.iter().map(|(id, n)| (id.as_str(), *n)).collect();
    let mut found: HashMap<&str, u64> = HashMap::new();
    for d in dead {
        *found.entry(d.id.as_str()).or_default() += 1;
        if d.reason.as_deref().is_none_or(str::is_empty) {
            fig.dead_letters_without_reason += 1;
            if fig.unreasoned_events.len() < 10 {
                fig.unreasoned_events.push(d.id.clone());
            }
        }
    }
    fig.lost = 0;
    fig.lost_events.clear();
    for e in &schedule.events {
        let a = applied.get(e.id.as_str()).copied().unwrap_or(0);
        let d = found.get(e.id.as_str()).copied().unwrap_or(0);
        match e.fails {
            0 => {}
            ALWAYS => fig.poison_permanent += 1,
            _ => fig.poison_transient += 1,
        }
        if d > 0 {
            fig.dead_lettered += 1;
            if e.fails == 0 {
                fig.healthy_dead_lettered += 1;
            }
        }
        if d > 1 {
            fig.dead_lettered_twice += 1;
        }
        if a > 0 && d > 0 {
            fig.applied_and_dead_lettered += 1;
        }
        if a == 0 && d == 0 {
            fig.lost += 1;
            if fig.lost_events.len() < 10 {
                fig.lost_events.push(e.id.clone());
            }
        }
    }
}

async fn supervise(
    ph: &mut Phase<'_>,
    rx: &mut mpsc::UnboundedReceiver<(usize, u64, String)>,
    schedule: &Schedule,
    ledger: &Ledger,
    bar: &ProgressBar,
    faults_log: &Path,
) -> Result<(), BoxError> {
    let args = ph.args;
    for slot in 0..ph.slots.len() {
        ph.spawn(slot)?;
    }
    // every initial worker subscribed (MQTT sessions exist) before anything is published
    let ready_by = Instant::now() + Duration::from_secs(60);
    while !ph.slots.iter().all(|s| s.ready) {
        match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            Ok(Some((slot, g, line))) => {
                ph.line(slot, g, &line)?;
            }
            Ok(None) => return Err("the workers' output closed".into()),
            Err(_) => {}
        }
        for slot in 0..ph.slots.len() {
            if let Some(Some(status)) = ph.slots[slot]
                .child
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
            {
                return Err(format!(
                    "worker {slot} could not start ({status}):\n{}",
                    ph.worker_log(slot)
                )
                .into());
            }
        }
        if Instant::now() > ready_by {
            return Err("the workers did not connect within 60 s".into());
        }
    }
    ph.start = Instant::now();

    let touched = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let release = Arc::new(AtomicU64::new(if !ph.faults_due() { u64::MAX } else { 0 }));
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let reserve = (schedule.order.len() as f64 * RESERVE) as usize;
    let (again_tx, again_rx) = mpsc::unbounded_channel();
    let backlog = args.broker.backlog(ph.slots.len());
    let producer = tokio::spawn(produce(
        Production {
            broker: args.broker,
            url: ph.setup.broker_url.clone(),
            destination: ph.destination.clone(),
            dir: ph.dir.clone(),
            workers: ph.slots.len(),
            events: schedule.events.clone(),
            order: schedule.order.clone(),
            backlog,
            reserve,
            release: Arc::clone(&release),
            touched: Arc::clone(&touched),
            published: Arc::clone(&published),
            retries: Arc::clone(&retries),
        },
        again_rx,
    ));
    let index: HashMap<&str, usize> = schedule
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.as_str(), i))
        .collect();

    let deadline = ph.start + Duration::from_secs(args.timeout_secs);
    let lease = Duration::from_millis(args.lease_ms);
    let quiet_for = args
        .broker
        .redelivery(Duration::from_millis(args.visibility_ms))
        .max(Duration::from_secs(1))
        + Duration::from_secs(1);
    let mut faults = schedule.faults.iter().peekable();
    let mut zombie: Option<Zombie> = None;
    // the Gate's store, where a zombie's key is seen taken over (the naive run has none)
    let zombie_store = match ph.setup.store.as_deref() {
        Some(url) if args.zombies > 0 && ph.mode == WorkerMode::Gate => {
            Some(idemgate::open(url).await?)
        }
        _ => None,
    };
    // when the last zombie thawed: its refused completion comes with a later STATS line
    let mut thawed: Option<Instant> = None;
    let mut last_release = Instant::now();
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    let mut last_change = Instant::now();
    let mut last = (0u64, Tally::default());
    let mut exits_allowed =
        20 + 10 * u64::from(args.store_restarts + args.broker_restarts + args.cuts);
    let result = loop {
        // lines first, as many as there are
        let mut got = match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            Ok(Some(l)) => vec![l],
            Ok(None) => break Err("the workers' output closed".into()),
            Err(_) => Vec::new(),
        };
        while let Ok(l) = rx.try_recv() {
            got.push(l);
        }
        for (slot, g, line) in got {
            if let Some(z) = ph.line(slot, g, &line)? {
                let i = *index
                    .get(z.id.as_str())
                    .ok_or_else(|| format!("a zombie on an unknown event {}", z.id))?;
                // a duplicate reaches another worker while this one is frozen
                let _ = again_tx.send(i);
                zombie = Some(z);
            }
        }
        // a zombie thaws once another worker took its key over (Gate: a later token in the
        // store) and applied the event: an effect applied before the freeze (a run killed
        // before its completion) is no sign of a take-over, and a thaw before one would let the
        // zombie complete unfenced
        if let Some(z) = &mut zombie {
            let taken_over = match &zombie_store {
                Some(store) => {
                    let key = Key::new(CONSUMER, &z.id)?;
                    let now = store.get(&key).await?.map(|r| r.token());
                    let frozen = *z.token.get_or_insert(now.unwrap_or(0));
                    now.is_some_and(|t| t > frozen)
                }
                // the naive run claims no key
                None => true,
            };
            let elsewhere = taken_over && ledger.applied(&z.id).await? > 0;
            let waited = z.since.elapsed();
            if (elsewhere && waited > lease) || waited > Duration::from_secs(60) {
                signal(z.pid, "-CONT")?;
                if let Some(stdin) = &mut ph.slots[z.slot].stdin {
                    let _ = writeln!(stdin);
                    let _ = stdin.flush();
                }
                ph.fig.zombies += 1;
                ph.log_fault("SIGCONT (zombie)");
                zombie = None;
                thawed = Some(Instant::now());
                last_change = Instant::now();
            }
        }
        // workers that exited on their own (a broker or store restart) start again
        for slot in 0..ph.slots.len() {
            let exited = match ph.slots[slot].child.as_mut() {
                Some(c) => c.try_wait()?.is_some(),
                None => false,
            };
            if exited {
                ph.fig.worker_exits += 1;
                if ph.fig.worker_exits > exits_allowed {
                    break;
                }
                ph.log_fault("worker exited");
                ph.retire(slot, Duration::from_secs(1).max(args.broker.rejoin_delay()));
            }
            if ph.slots[slot]
                .respawn_at
                .is_some_and(|at| Instant::now() >= at)
            {
                ph.spawn(slot)?;
            }
        }
        if ph.fig.worker_exits > exits_allowed {
            let slot = ph.slots.len() - 1;
            break Err(format!(
                "workers keep exiting ({} times); the last log:\n{}",
                ph.fig.worker_exits,
                ph.worker_log(slot)
            )
            .into());
        }
        if last_poll.elapsed() < Duration::from_millis(300) {
            continue;
        }
        last_poll = Instant::now();
        let mut tally = ledger.tally().await?;
        // a dead-lettered event is settled too
        tally.touched += ph.dead.len() as u64;
        touched.store(tally.touched, Ordering::Relaxed);
        if (ph.fig.deliveries, tally) != last {
            last = (ph.fig.deliveries, tally);
            last_change = Instant::now();
        }
        let t = ph.t();
        ph.fig.timeline.push(Sample {
            t,
            deliveries: ph.fig.deliveries,
            duplicates: ph.fig.duplicate_deliveries,
            applications: tally.applications,
        });
        ph.fig.publish_retries = retries.load(Ordering::Relaxed);
        ph.fig.published = published.load(Ordering::Relaxed) & !ALL_OUT;
        let (_, dups, fenced) = ph.stats();
        ph.fig.zombies_fenced = fenced;
        // a thawed zombie is left alone until its completion was seen fenced (or 10 s passed,
        // and the run fails on it)
        let fencing_due = ph.fig.zombies > fenced
            && thawed.is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        bar.set_position(tally.touched);
        bar.set_message(format!(
            "{} deliveries ({} dup) · {} skipped · {} kills · {} zombies · {} restarts/cuts",
            ph.fig.deliveries,
            ph.fig.duplicate_deliveries,
            dups,
            ph.fig.kills,
            ph.fig.zombies,
            ph.fig.store_restarts + ph.fig.broker_restarts + ph.fig.connection_cuts
        ));
        // faults at their share of progress
        #[allow(clippy::cast_precision_loss)]
        let done = tally.touched as f64 / args.events as f64;
        if zombie.is_none()
            && let Some(&&(at, fault)) = faults.peek()
            && done >= at
        {
            faults.next();
            ph.log_fault(fault.name());
            match fault {
                Fault::StoreRestart => {
                    shell(
                        args.store_restart_cmd.as_deref().unwrap_or("true"),
                        faults_log,
                    )
                    .await?;
                    ph.fig.store_restarts += 1;
                }
                Fault::BrokerRestart => {
                    shell(
                        args.broker_restart_cmd.as_deref().unwrap_or("true"),
                        faults_log,
                    )
                    .await?;
                    ph.fig.broker_restarts += 1;
                }
                Fault::Cut => {
                    let store = ph.setup.store.as_deref().unwrap_or_default();
                    let n = cut(store).await?;
                    let mut log = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(faults_log)?;
                    writeln!(log, "cut {n} connections of {store}")?;
                    ph.fig.connection_cuts += 1;
                }
            }
            exits_allowed += u64::from(args.workers);
            last_change = Instant::now();
        }
        // the tail kills, with work held back while any fault is due: a few events go out at
        // a time while nothing moves, and the plans of live workers are brought forward
        if zombie.is_none() && !fencing_due {
            ph.arm_tail(done);
        }
        if !ph.faults_due() {
            release.store(u64::MAX, Ordering::Relaxed);
        } else if last_release.elapsed() > IDLE
            && ph
                .slots
                .iter()
                .filter_map(|s| s.last_recv)
                .max()
                .is_none_or(|t| t.elapsed() > IDLE)
        {
            if published.load(Ordering::Relaxed) & ALL_OUT == 0 {
                release.fetch_add(ph.slots.len() as u64, Ordering::Relaxed);
            } else {
                // nothing held back is left: re-published events (duplicates) are the work
                for _ in 0..ph.slots.len() {
                    let _ = again_tx.send(rand::random_range(0..schedule.events.len()));
                }
            }
            last_release = Instant::now();
            ph.force_plans();
        }
        let all_published = published.load(Ordering::Relaxed) & ALL_OUT != 0;
        if all_published
            && !ph.faults_due()
            && tally.touched == args.events
            && zombie.is_none()
            && !fencing_due
            && faults.peek().is_none()
            && last_change.elapsed() >= quiet_for
        {
            break Ok(());
        }
        if Instant::now() > deadline {
            bar.println(format!(
                "{}: gave up after {} s with {} of {} events applied",
                ph.mode.name(),
                args.timeout_secs,
                tally.touched,
                args.events
            ));
            break Ok(());
        }
        if zombie.is_none() && last_change.elapsed() > Duration::from_secs(args.stall_secs) {
            bar.println(format!(
                "{}: nothing moved for {} s with {} of {} events applied",
                ph.mode.name(),
                args.stall_secs,
                tally.touched,
                args.events
            ));
            break Ok(());
        }
    };
    drop(again_tx);
    producer.abort();
    result
}

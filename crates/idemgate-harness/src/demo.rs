//! `idemgate demo`: the chaos harness on embedded defaults.
//!
//! The embedded SQLite queue is the broker, and SQLite files hold the ledger and the store: no
//! server. A producer publishes events (some twice); worker *processes* run the consumer
//! runtime and apply each event's effect to the ledger with a deliberately non-idempotent
//! increment; the supervisor SIGKILLs workers at named points and restarts them, and the
//! queue's visibility timeout brings unacknowledged messages back. The same scenario runs
//! without idempotency, then with idemgate, and the ledger says what happened to every event.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::BoxError;
use crate::chaos::{ChaosArgs, IdemMode, parse_rate, run_as};

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
    /// How the idemgate run deduplicates: `inbox` (a SqliteInbox row commits with the effect in
    /// the ledger's file) or `gate` (a SqliteStore claim; the effect outside its transaction,
    /// under a key derived from the event's).
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

impl DemoArgs {
    /// The chaos run this demo is: the embedded queue, SQLite files, kills and duplicates, and
    /// no other fault.
    fn chaos(self) -> ChaosArgs {
        ChaosArgs {
            broker: crate::chaos::ChaosBroker::Embedded,
            url: None,
            store: None,
            mode: self.mode,
            ledger: None,
            events: self.events,
            dup_rate: self.dup_rate,
            workers: self.workers,
            concurrency: 8,
            inbox_batch: 16,
            kills: self.kills,
            fifo: false,
            poison_rate: 0.0,
            zombies: 0,
            store_restarts: 0,
            store_restart_cmd: None,
            broker_restarts: 0,
            broker_restart_cmd: None,
            cuts: 0,
            seed: self.seed,
            lease_ms: self.lease_ms,
            visibility_ms: self.visibility_ms,
            no_derived_keys: false,
            no_naive: false,
            naive_events: None,
            dir: self.dir,
            timeout_secs: self.timeout_secs,
            stall_secs: 90,
            http: false,
            pipeline: false,
            bridge: false,
            json: self.json,
            report: None,
        }
    }
}

/// Runs `idemgate demo`: a naive phase and an idemgate phase under the same kills.
pub fn run(args: DemoArgs) -> Result<ExitCode, BoxError> {
    run_as("demo", &args.chaos())
}

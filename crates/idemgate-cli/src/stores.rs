//! `explain`, `forget` and `purge` of a store given by URL (`idemgate::open`).

use std::process::ExitCode;

use clap::Args;
use idemgate::core::backend::to_millis;
use std::time::{Duration, SystemTime};

use idemgate::core::{Forgotten, Key, Record, State, Store};
use idemgate::{BoxStore, open_checked};

use crate::BoxError;

/// The store and key of `explain` and `forget`.
#[derive(Debug, Args)]
pub(crate) struct KeyArgs {
    /// The store: `sqlite:PATH`, `postgres://…`, `mysql://…`, `redis://…`,
    /// `redis+cluster://host:port,…` or `memory:`.
    #[arg(long)]
    store: String,
    /// The key's scope (or give the key as `scope/id`).
    #[arg(long)]
    scope: Option<String>,
    /// The key's id, or `scope/id` without `--scope`.
    key: String,
}

impl KeyArgs {
    fn key(&self) -> Result<Key, BoxError> {
        parse_key(self.scope.as_deref(), &self.key)
    }
}

/// `id` under `--scope`, or `scope/id` without it.
fn parse_key(scope: Option<&str>, key: &str) -> Result<Key, BoxError> {
    Ok(match scope {
        Some(scope) => Key::new(scope, key)?,
        None => match key.split_once('/') {
            Some((scope, id)) => Key::new(scope, id)?,
            None => return Err("give the key as scope/id, or its scope with --scope".into()),
        },
    })
}

#[derive(Debug, Args)]
pub(crate) struct ExplainArgs {
    /// The store (or, with --inbox or --positions, the SQL database): `sqlite:PATH`,
    /// `postgres://…`, `mysql://…`, `redis://…`, `redis+cluster://host:port,…`,
    /// `dynamodb://TABLE` or `memory:`.
    #[arg(long)]
    store: String,
    /// The key's scope (or give the key as `scope/id`).
    #[arg(long)]
    scope: Option<String>,
    /// The key's id, or `scope/id` without `--scope` (not with --positions).
    #[arg(required_unless_present = "positions")]
    key: Option<String>,
    /// Explain the key's inbox row instead of a store record.
    #[arg(long, conflicts_with = "positions")]
    inbox: bool,
    /// The inbox table.
    #[arg(long, default_value = "idemgate_inbox", requires = "inbox")]
    inbox_table: String,
    /// Explain the Kafka positions stored for `GROUP/TOPIC`.
    #[arg(long, value_name = "GROUP/TOPIC")]
    positions: Option<String>,
    /// The positions table.
    #[arg(long, default_value = "idemgate_offsets", requires = "positions")]
    offsets_table: String,
    /// Answer in JSON (one object) instead of words.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ForgetArgs {
    #[command(flatten)]
    target: KeyArgs,
    /// Take the key from a live lease too. Its holder stays fenced: its completion is refused.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct PurgeArgs {
    /// The store: `sqlite:PATH`, `postgres://…`, `mysql://…`, `redis://…`,
    /// `redis+cluster://host:port,…` or `memory:`.
    #[arg(long)]
    store: String,
    /// Delete at most this many records per batch.
    #[arg(long, default_value_t = 10_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    batch: usize,
}

fn runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub(crate) fn explain(args: ExplainArgs) -> Result<ExitCode, BoxError> {
    let rt = runtime()?;
    if let Some(which) = &args.positions {
        return explain_positions(&rt, &args, which);
    }
    let key = parse_key(
        args.scope.as_deref(),
        args.key.as_deref().unwrap_or_default(),
    )?;
    if args.inbox {
        return explain_inbox(&rt, &args, &args.inbox_table, &key);
    }
    let store = opened(rt.block_on(open_checked(&args.store))?);
    let rec = rt.block_on(store.get(&key))?;
    let e = Explained::new(&key, rec.as_ref(), SystemTime::now());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&e.json())?);
    } else {
        print!("{}", e.words());
    }
    Ok(ExitCode::SUCCESS)
}

fn explain_inbox(
    rt: &tokio::runtime::Runtime,
    args: &ExplainArgs,
    table: &str,
    key: &Key,
) -> Result<ExitCode, BoxError> {
    let row = rt.block_on(idemgate::inspect::inbox_row(&args.store, table, key))?;
    let now = to_millis(SystemTime::now());
    let live = row.filter(|r| u64::try_from(r.expires_at).unwrap_or(0) > now);
    let (gets, why) = match live {
        Some(_) => (
            "skip",
            "the inbox has the key: a redelivery now is acked without running the handler \
             (its effect committed with the key)",
        ),
        None => (
            "fresh",
            "the inbox has no live row for the key: a delivery now runs the handler, in the \
             transaction that records the key",
        ),
    };
    if args.json {
        let v = serde_json::json!({
            "key": { "scope": key.scope(), "id": key.id() },
            "inbox": table,
            "processed_at_ms": row.map(|r| r.processed_at),
            "expires_at_ms": row.map(|r| r.expires_at),
            "duplicate_now": { "gets": gets, "why": why },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let at = |ms: i64| time(from_ms(ms));
        println!("{:<14}{key}", "key");
        println!("{:<14}{table}", "inbox");
        match row {
            Some(r) => {
                println!("{:<14}{}", "processed_at", at(r.processed_at));
                println!(
                    "{:<14}{} ({})",
                    "expires_at",
                    at(r.expires_at),
                    from_now(from_ms(r.expires_at), SystemTime::now())
                );
            }
            None => println!("{:<14}no row", "state"),
        }
        println!("{:<14}{gets}: {why}", "duplicate now");
    }
    Ok(ExitCode::SUCCESS)
}

fn explain_positions(
    rt: &tokio::runtime::Runtime,
    args: &ExplainArgs,
    which: &str,
) -> Result<ExitCode, BoxError> {
    let Some((group, topic)) = which.split_once('/') else {
        return Err("give --positions as GROUP/TOPIC".into());
    };
    let positions = rt.block_on(idemgate::inspect::positions(
        &args.store,
        &args.offsets_table,
        group,
        topic,
    ))?;
    let why = "on assignment the consumer seeks each partition to its stored position; an \
               offset below it was applied in the transaction that stored the position, and \
               is skipped";
    if args.json {
        let parts: serde_json::Map<String, serde_json::Value> = positions
            .iter()
            .map(|(p, o)| (p.to_string(), (*o).into()))
            .collect();
        let v = serde_json::json!({
            "group": group, "topic": topic, "table": args.offsets_table,
            "next_offsets": parts, "why": why,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("group {group}, topic {topic} ({})", args.offsets_table);
        if positions.is_empty() {
            println!("no stored positions: the consumer starts where Kafka's own offset says");
        }
        for (p, o) in &positions {
            println!("  partition {p:>4}: next offset {o}");
        }
        println!("{why}");
    }
    Ok(ExitCode::SUCCESS)
}

fn from_ms(ms: i64) -> SystemTime {
    idemgate::core::backend::from_millis(u64::try_from(ms).unwrap_or(0))
}

pub(crate) fn forget(args: ForgetArgs) -> Result<ExitCode, BoxError> {
    let key = args.target.key()?;
    let rt = runtime()?;
    let store = opened(rt.block_on(open_checked(&args.target.store))?);
    match rt.block_on(store.forget(&key, args.force))? {
        Forgotten::Absent => println!("{key}: no live record, nothing to forget"),
        Forgotten::Removed { token } => println!(
            "{key}: forgot the completed record; the next request runs afresh (tombstone token {token})"
        ),
        Forgotten::Tombstoned { token } => println!(
            "{key}: ended the lease; the next request runs afresh and the old holder is fenced \
             (tombstone token {token})"
        ),
        Forgotten::Held { lease_until } => {
            eprintln!(
                "{key}: a live lease holds the key until {}; nothing changed (--force takes it, \
                 fencing the holder)",
                time(lease_until)
            );
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// How far `t` is from `now`, in words (`in 12s`, `3m ago`).
fn from_now(t: SystemTime, now: SystemTime) -> String {
    let round = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs()));
    match t.duration_since(now) {
        Ok(d) => format!("in {}", round(d)),
        Err(e) => format!("{} ago", round(e.duration())),
    }
}

/// One key's record and what a duplicate arriving now would get.
struct Explained<'a> {
    key: &'a Key,
    rec: Option<&'a Record>,
    now: SystemTime,
    /// `fresh`, `in_progress`, `takeover`, `replay`.
    verdict: &'static str,
    why: String,
}

impl<'a> Explained<'a> {
    fn new(key: &'a Key, rec: Option<&'a Record>, now: SystemTime) -> Self {
        let (verdict, why) = match rec {
            None => (
                "fresh",
                "no live record: a duplicate now runs the handler".to_owned(),
            ),
            Some(r) => match &r.state {
                State::InProgress { lease_until, .. } if *lease_until > now => (
                    "in_progress",
                    format!(
                        "a live lease holds the key until {} ({}): HTTP answers 409 in-progress \
                         (or waits, with a wait policy), a consumer leaves the message for \
                         redelivery, a Gate returns InProgress",
                        time(*lease_until),
                        from_now(*lease_until, now)
                    ),
                ),
                State::InProgress { lease_until, .. } => (
                    "takeover",
                    format!(
                        "the lease ran out at {}: a duplicate now takes the key over and runs \
                         the handler (token {}, attempt {}); the earlier holder is fenced",
                        time(*lease_until),
                        r.token() + 1,
                        r.attempts + 1
                    ),
                ),
                State::Completed { outcome, .. } => (
                    "replay",
                    match r.fingerprint {
                        Some(_) => format!(
                            "completed: a duplicate with the same fingerprint gets the stored \
                             outcome (status {}) without running; another request under this \
                             key is a mismatch (HTTP 422)",
                            outcome.status
                        ),
                        None => format!(
                            "completed: a duplicate gets the stored outcome (status {}) without \
                             running",
                            outcome.status
                        ),
                    },
                ),
            },
        };
        Explained {
            key,
            rec,
            now,
            verdict,
            why,
        }
    }

    fn state(&self) -> &'static str {
        match self.rec.map(|r| &r.state) {
            None => "absent",
            Some(State::InProgress { lease_until, .. }) if *lease_until > self.now => "in_progress",
            Some(State::InProgress { .. }) => "lease_over",
            Some(State::Completed { .. }) => "completed",
        }
    }

    fn words(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut line = |k: &str, v: String| {
            let _ = writeln!(out, "{k:<14}{v}");
        };
        line("key", self.key.to_string());
        line("state", self.state().replace('_', " "));
        if let Some(r) = self.rec {
            line("token", r.token().to_string());
            line("attempts", r.attempts.to_string());
            match &r.state {
                State::InProgress { lease_until, .. } => line(
                    "lease_until",
                    format!(
                        "{} ({})",
                        time(*lease_until),
                        from_now(*lease_until, self.now)
                    ),
                ),
                State::Completed {
                    outcome,
                    completed_at,
                    ..
                } => {
                    line("completed_at", time(*completed_at));
                    line(
                        "outcome",
                        format!(
                            "status {}, {} metadata pairs, {} body bytes ({} stored)",
                            outcome.status,
                            outcome.meta.len(),
                            outcome.body.len(),
                            outcome.encoded_len()
                        ),
                    );
                }
            }
            line("created_at", time(r.created_at));
            line(
                "expires_at",
                format!(
                    "{} ({}; retention ends, the key is free)",
                    time(r.expires_at),
                    from_now(r.expires_at, self.now)
                ),
            );
            line(
                "fingerprint",
                r.fingerprint.map_or("none".to_owned(), |f| f.to_string()),
            );
        }
        line("duplicate now", format!("{}: {}", self.verdict, self.why));
        line(
            "clock",
            "times are the store's; \"in\"/\"ago\" are from this host's clock".to_owned(),
        );
        out
    }

    fn json(&self) -> serde_json::Value {
        let ms = |t: SystemTime| to_millis(t);
        let mut v = serde_json::json!({
            "key": { "scope": self.key.scope(), "id": self.key.id() },
            "state": self.state(),
            "duplicate_now": { "gets": self.verdict, "why": self.why },
        });
        if let Some(r) = self.rec {
            v["token"] = r.token().into();
            v["attempts"] = r.attempts.into();
            v["created_at_ms"] = ms(r.created_at).into();
            v["expires_at_ms"] = ms(r.expires_at).into();
            v["fingerprint"] = r.fingerprint.map(|f| f.to_string()).into();
            match &r.state {
                State::InProgress { lease_until, .. } => {
                    v["lease_until_ms"] = ms(*lease_until).into();
                }
                State::Completed {
                    outcome,
                    completed_at,
                    ..
                } => {
                    v["completed_at_ms"] = ms(*completed_at).into();
                    v["outcome"] = serde_json::json!({
                        "status": outcome.status,
                        "meta_pairs": outcome.meta.len(),
                        "body_bytes": outcome.body.len(),
                    });
                }
            }
        }
        v
    }
}

pub(crate) fn purge(args: PurgeArgs) -> Result<ExitCode, BoxError> {
    if args.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    let rt = runtime()?;
    let store = opened(rt.block_on(open_checked(&args.store))?);
    let mut total = 0u64;
    loop {
        let n = rt.block_on(store.purge_expired(args.batch))?;
        total += n;
        if n < args.batch as u64 {
            break;
        }
    }
    println!("purged {total} expired records");
    Ok(ExitCode::SUCCESS)
}

/// The store, its warnings printed to stderr.
/// The store with its warnings printed (a Redis without AOF, one that evicts keys).
pub(crate) fn opened((store, warnings): (BoxStore, Vec<idemgate::Warning>)) -> BoxStore {
    for w in warnings {
        eprintln!("warning: {w}");
    }
    store
}

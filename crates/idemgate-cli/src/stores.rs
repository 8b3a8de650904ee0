//! `inspect` and `purge` of a store given by URL (`idemgate::open`).

use std::process::ExitCode;

use clap::Args;
use idemgate::core::backend::to_millis;
use idemgate::core::{Key, State, Store};
use idemgate::{BoxStore, open_checked};

use crate::BoxError;

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
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

pub(crate) fn inspect(args: InspectArgs) -> Result<ExitCode, BoxError> {
    let key = match &args.scope {
        Some(scope) => Key::new(scope, &args.key)?,
        None => match args.key.split_once('/') {
            Some((scope, id)) => Key::new(scope, id)?,
            None => return Err("give the key as scope/id, or its scope with --scope".into()),
        },
    };
    let rt = runtime()?;
    let store = opened(rt.block_on(open_checked(&args.store))?);
    let Some(rec) = rt.block_on(store.get(&key))? else {
        println!("{key}: no live record");
        return Ok(ExitCode::from(1));
    };
    let ms = |t| to_millis(t);
    println!("key           {key}");
    match &rec.state {
        State::InProgress { token, lease_until } => {
            println!("state         in-progress");
            println!("token         {token}");
            println!("lease_until   {} (unix ms)", ms(*lease_until));
        }
        State::Completed {
            token,
            outcome,
            completed_at,
        } => {
            println!("state         completed");
            println!("token         {token}");
            println!("completed_at  {} (unix ms)", ms(*completed_at));
            println!(
                "outcome       status {}, {} metadata pairs, {} body bytes ({} stored)",
                outcome.status,
                outcome.meta.len(),
                outcome.body.len(),
                outcome.encoded_len()
            );
        }
    }
    println!("attempts      {}", rec.attempts);
    println!("created_at    {} (unix ms)", ms(rec.created_at));
    println!("expires_at    {} (unix ms)", ms(rec.expires_at));
    match rec.fingerprint {
        Some(fp) => println!("fingerprint   {fp}"),
        None => println!("fingerprint   none"),
    }
    Ok(ExitCode::SUCCESS)
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

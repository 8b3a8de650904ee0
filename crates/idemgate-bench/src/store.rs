//! `idemgate bench store --store URL`: a store beside its raw ceiling, same client library, same
//! concurrency, same run.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use idemgate::core::{Claim, ClaimOptions, Key, Outcome, Store};
use idemgate::mysql::{MySqlInbox, MySqlStore};
use idemgate::postgres::{PgInbox, PostgresStore};
use idemgate::redis::RedisStore;

use crate::{BoxError, drive, median};

/// `bench store`: claim + complete and the inbox against raw `SET NX PX` or a raw insert.
#[derive(Debug, Args)]
pub struct StoreBench {
    /// `postgres://…`, `mysql://…` or `redis://…`.
    #[arg(long)]
    store: String,
    /// Concurrent clients (default: 50 for Redis, 8 for SQL).
    #[arg(long)]
    clients: Option<usize>,
    /// Single operations per measurement.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    ops: u64,
    /// Rows per batch in the batched measurements.
    #[arg(long, default_value_t = 100, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    batch: usize,
    /// Rounds; each figure is the median of its rounds, each ratio the median of the rounds'
    /// ratios. Odd rounds measure the store before its ceiling, even rounds after it.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
}

/// Runs `bench store`.
pub(crate) fn run(b: StoreBench) -> Result<ExitCode, BoxError> {
    crate::runtime()?.block_on(async {
        // several rounds, each measuring every row once, so slow phases of a noisy machine hit
        // the ceiling and the store alike; each figure is the median of its rounds
        let mut rounds = Vec::new();
        for round in 0..b.rounds.max(1) {
            let swap = round % 2 == 1;
            rounds.push(if let Some(nodes) = b.store.strip_prefix("redis+cluster://") {
                cluster_bench(&b, nodes, round).await?
            } else if b.store.starts_with("redis://") {
                redis_bench(&b, swap).await?
            } else if b.store.starts_with("postgres://") || b.store.starts_with("postgresql://") {
                sql_bench(&b, Sql::Postgres, swap).await?
            } else if b.store.starts_with("mysql://") {
                sql_bench(&b, Sql::MySql, swap).await?
            } else {
                return Err(format!(
                    "bench store takes postgres://, mysql://, redis:// or redis+cluster:// URLs, not {:?}",
                    b.store
                )
                .into());
            });
        }
        let against = if b.store.starts_with("redis+cluster://") {
            "vs 1 master"
        } else {
            "vs raw"
        };
        println!("{:<58} {:>12} {:>9}", "measurement", "ops/s", against);
        for i in 0..rounds[0].len() {
            let name = &rounds[0][i].0;
            let rate = median(rounds.iter().map(|r| r[i].1));
            if rounds[0][i].2.is_some() {
                // each round's row against the ceiling measured in that same round
                let ratio = median(rounds.iter().filter_map(|r| r[i].2.map(|c| r[i].1 / c)));
                println!("{name:<58} {rate:>12.0} {:>8.0}%", 100.0 * ratio);
            } else {
                println!("{name:<58} {rate:>12.0} {:>9}", "(ceiling)");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

static NEXT_RUN: AtomicU64 = AtomicU64::new(0);

type Row = (String, f64, Option<f64>);

fn run_id() -> String {
    format!(
        "{}_{}",
        std::process::id(),
        NEXT_RUN.fetch_add(1, Ordering::Relaxed)
    )
}

async fn redis_bench(b: &StoreBench, swap: bool) -> Result<Vec<Row>, BoxError> {
    let clients = b.clients.unwrap_or(50);
    let prefix = format!("idemgate-bench:{}:", run_id());
    let store = RedisStore::builder()
        .with_url(&b.store)
        .with_key_prefix(format!("{prefix}store:"))
        .build()
        .await?;
    // the raw command on the store's own connection (the same client, the same response
    // timeout), so the two differ only in what is sent
    let raw_set = |round: u32| {
        let (store, prefix) = (store.clone(), prefix.clone());
        drive(clients, b.ops, move |i| {
            let (store, key) = (store.clone(), format!("{prefix}raw{round}:{i}"));
            async move {
                let _: Option<String> = store
                    .query(
                        redis::cmd("SET")
                            .arg(key)
                            .arg("1")
                            .arg("NX")
                            .arg("PX")
                            .arg(60_000),
                    )
                    .await?;
                Ok(())
            }
        })
    };
    raw_set(0).await?; // warm-up: connections, server allocations
    let opts = ClaimOptions {
        lease: Duration::from_secs(60),
        retention: Duration::from_secs(60),
    };
    let claim = {
        let store = store.clone();
        drive(clients, b.ops, move |i| {
            let store = store.clone();
            async move {
                let key = Key::new("bench", format!("c{i}"))?;
                let _claim = store.claim(&key, None, &opts).await?;
                Ok(())
            }
        })
    };
    let (raw, claim) = ordered(swap, raw_set(1), claim).await?;
    // the floor of any one-script operation: EVALSHA of `return 1`, on the same connection
    let sha: String = store
        .query(redis::cmd("SCRIPT").arg("LOAD").arg("return 1"))
        .await?;
    let floor = {
        let (store, sha) = (store.clone(), Arc::new(sha));
        drive(clients, b.ops, move |i| {
            let (store, sha) = (store.clone(), Arc::clone(&sha));
            async move {
                let _: i64 = store
                    .query(redis::cmd("EVALSHA").arg(&*sha).arg(1).arg(format!("x{i}")))
                    .await?;
                Ok(())
            }
        })
        .await?
    };
    // the two-command ceiling of claim + complete: `SET NX PX`, then a plain `SET XX PX` of a
    // value the size of a completed record, on the same key; or, for the second command, the
    // least a fenced write costs on Redis 7 (no compare-and-set command): a script that reads
    // the key and writes it
    let fenced: String = store
        .query(redis::cmd("SCRIPT").arg("LOAD").arg(FENCED_WRITE))
        .await?;
    let pair = |fenced: Option<String>| {
        let (store, prefix) = (store.clone(), prefix.clone());
        let fenced = fenced.map(Arc::new);
        drive(clients, b.ops, move |i| {
            let (store, fenced) = (store.clone(), fenced.clone());
            let key = format!("{prefix}pair{}:{i}", u8::from(fenced.is_some()));
            async move {
                let _: Option<String> = store
                    .query(
                        redis::cmd("SET")
                            .arg(&key)
                            .arg("1")
                            .arg("NX")
                            .arg("PX")
                            .arg(60_000),
                    )
                    .await?;
                let mut second = redis::cmd(if fenced.is_some() { "EVALSHA" } else { "SET" });
                match &fenced {
                    Some(sha) => second
                        .arg(&**sha)
                        .arg(1)
                        .arg(&key)
                        .arg(COMPLETED)
                        .arg(60_000),
                    None => second
                        .arg(&key)
                        .arg(COMPLETED)
                        .arg("XX")
                        .arg("PX")
                        .arg(60_000),
                };
                let _: redis::Value = store.query(&second).await?;
                Ok(())
            }
        })
    };
    let both = {
        let store = store.clone();
        drive(clients, b.ops, move |i| {
            let store = store.clone();
            async move {
                let key = Key::new("bench", format!("cc{i}"))?;
                if let Claim::Acquired(l) = store.claim(&key, None, &opts).await? {
                    store
                        .complete(&l, &Outcome::new(0, "ok"), Duration::from_secs(60))
                        .await?;
                }
                Ok(())
            }
        })
    };
    let (raw_pair, both) = ordered(swap, pair(None), both).await?;
    let fenced = pair(Some(fenced)).await?;
    Ok(vec![
        (format!("raw SET NX PX, {clients} clients"), raw, None),
        (
            format!("floor: EVALSHA of `return 1`, {clients} clients"),
            floor,
            Some(raw),
        ),
        (
            format!("RedisStore claim, {clients} clients"),
            claim,
            Some(raw),
        ),
        (
            format!("raw SET NX PX + SET XX PX, {clients} clients"),
            raw_pair,
            None,
        ),
        (
            "  SET NX PX + the least fenced write (script: GET, SET)".into(),
            fenced,
            Some(raw_pair),
        ),
        (
            format!("RedisStore claim + complete, {clients} clients"),
            both,
            Some(raw_pair),
        ),
        (
            "  against SET NX PX + the least fenced write".into(),
            both,
            Some(fenced),
        ),
    ])
}

/// Claim + complete on a Redis Cluster with the keys on one master, then two, then all: each
/// master gets a store whose key prefix carries a hash tag of a slot it serves, and the clients
/// are split evenly between the stores. Rounds rotate which masters the smaller sets use.
async fn cluster_bench(b: &StoreBench, nodes: &str, round: u32) -> Result<Vec<Row>, BoxError> {
    let clients = b.clients.unwrap_or(50);
    let nodes: Vec<String> = nodes
        .split(',')
        .filter(|n| !n.is_empty())
        .map(|n| format!("redis://{n}"))
        .collect();
    let connect = |prefix: String| {
        RedisStore::builder()
            .with_cluster_nodes(nodes.clone())
            .with_key_prefix(prefix)
            .build()
    };
    let probe = connect("idemgate-bench:".into()).await?;
    let masters = masters(&probe).await?;
    if masters.is_empty() {
        return Err("CLUSTER SLOTS named no master".into());
    }
    // one hash tag per master, for a slot that master serves
    let mut tags = Vec::new();
    for (_, ranges) in &masters {
        let mut found = None;
        for t in 0..100_000u32 {
            let tag = format!("m{t}");
            let slot: i64 = probe
                .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(&tag))
                .await?;
            if ranges.iter().any(|(a, z)| (*a..=*z).contains(&slot)) {
                found = Some(tag);
                break;
            }
        }
        tags.push(found.ok_or("no hash tag lands on a master")?);
    }
    let n = masters.len();
    let opts = ClaimOptions {
        lease: Duration::from_secs(60),
        retention: Duration::from_secs(60),
    };
    let run = run_id();
    let mut rows = Vec::new();
    let mut one = None;
    for k in 1..=n {
        let mut stores = Vec::new();
        for j in 0..k {
            let tag = &tags[(j + round as usize) % n];
            stores.push(connect(format!("{{{tag}}}idemgate-bench:{run}:{k}:")).await?);
        }
        let stores = Arc::new(stores);
        let rate = drive(clients, b.ops, move |i| {
            let stores = Arc::clone(&stores);
            async move {
                let store = &stores[usize::try_from(i).unwrap_or(0) % stores.len()];
                let key = Key::new("bench", format!("cc{i}"))?;
                if let Claim::Acquired(l) = store.claim(&key, None, &opts).await? {
                    store
                        .complete(&l, &Outcome::new(0, "ok"), Duration::from_secs(60))
                        .await?;
                }
                Ok(())
            }
        })
        .await?;
        let name =
            format!("RedisStore claim + complete, keys on {k} of {n} masters, {clients} clients");
        rows.push((name, rate, one));
        one.get_or_insert(rate);
    }
    Ok(rows)
}

/// The masters of a cluster (`host:port`) and the slot ranges each serves, from `CLUSTER SLOTS`.
async fn masters(store: &RedisStore) -> Result<Vec<(String, Vec<(i64, i64)>)>, BoxError> {
    let slots: redis::Value = store.query(redis::cmd("CLUSTER").arg("SLOTS")).await?;
    let mut by_node: std::collections::BTreeMap<String, Vec<(i64, i64)>> = Default::default();
    let redis::Value::Array(entries) = slots else {
        return Err(format!("CLUSTER SLOTS answered {slots:?}").into());
    };
    for e in entries {
        let redis::Value::Array(f) = e else { continue };
        let int = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(i)) => Some(*i),
            _ => None,
        };
        let (Some(a), Some(z), Some(redis::Value::Array(node))) =
            (int(f.first()), int(f.get(1)), f.get(2))
        else {
            continue;
        };
        let host = match node.first() {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => continue,
        };
        let port = int(node.get(1)).unwrap_or(0);
        by_node
            .entry(format!("{host}:{port}"))
            .or_default()
            .push((a, z));
    }
    Ok(by_node.into_iter().collect())
}

/// The least a fenced write does on Redis 7: read the key, write it.
const FENCED_WRITE: &str = "if redis.call('GET', KEYS[1]) then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end \
     return 1";

/// A value the size of a completed record with a two-byte outcome.
const COMPLETED: &str = "1|1|1796000000000000000||1796000000000|1796000060000|1|\
                         |1796000000000|\x00\x00ok";

#[derive(Clone, Copy, PartialEq)]
enum Sql {
    Postgres,
    MySql,
}

/// Raw multi-row inserts of `batch` ids per transaction; returns transactions per second.
macro_rules! batch_rate {
    ($clients:expr, $batches:expr, $batch:expr, $pool:expr, $many:expr, |$q:ident, $ids:ident| $bind_many:expr) => {{
        let (pool, many, batch) = ($pool.clone(), $many.clone(), $batch);
        drive($clients, $batches, move |i| {
            let (pool, many) = (pool.clone(), many.clone());
            async move {
                let $ids: Vec<String> = (0..batch).map(|j| format!("m{i}-{j}")).collect();
                let $q = sqlx::query(&many);
                let mut tx = pool.begin().await?;
                $bind_many.execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }
        })
    }};
}

/// Runs two measurements one after the other, `b` first when `swap`: rounds alternate the order,
/// so a machine that slows down (or speeds up) during a round favours neither.
async fn ordered(
    swap: bool,
    a: impl Future<Output = Result<f64, BoxError>>,
    b: impl Future<Output = Result<f64, BoxError>>,
) -> Result<(f64, f64), BoxError> {
    if swap {
        let b = b.await?;
        Ok((a.await?, b))
    } else {
        let a = a.await?;
        Ok((a, b.await?))
    }
}

/// The four inbox measurements, the same for every SQL driver: the raw insert and the inbox,
/// one row per transaction and `batch` rows per transaction. `$bind_many` binds the batch's ids
/// (`$ids`) to the raw multi-row statement (`$q`).
macro_rules! inbox_rates {
    ($swap:expr, $clients:expr, $ops:expr, $batch:expr, $batches:expr, $pool:expr, $inbox:expr, $one:expr, $many:expr,
     |$q:ident, $ids:ident| $bind_many:expr) => {{
        let (clients, batch) = ($clients, $batch);
        let raw1 = {
            let (pool, one) = ($pool.clone(), $one.clone());
            drive(clients, $ops, move |i| {
                let (pool, one) = (pool.clone(), one.clone());
                async move {
                    let mut tx = pool.begin().await?;
                    sqlx::query(&one)
                        .bind("a")
                        .bind(format!("r{i}"))
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    Ok(())
                }
            })
        };
        let inbox1 = {
            let (pool, inbox) = ($pool.clone(), $inbox.clone());
            drive(clients, $ops, move |i| {
                let (pool, inbox) = (pool.clone(), inbox.clone());
                async move {
                    let mut tx = pool.begin().await?;
                    inbox
                        .first_time(&mut tx, &Key::new("a", format!("i{i}"))?)
                        .await?;
                    tx.commit().await?;
                    Ok(())
                }
            })
        };
        let (raw1, inbox1) = ordered($swap, raw1, inbox1).await?;
        let rawn = batch_rate!(clients, $batches, batch, $pool, $many, |$q, $ids| {
            $bind_many
        });
        let inboxn = {
            let (pool, inbox) = ($pool.clone(), $inbox.clone());
            drive(clients, $batches, move |i| {
                let (pool, inbox) = (pool.clone(), inbox.clone());
                async move {
                    let keys: Vec<Key> = (0..batch)
                        .map(|j| Key::new("b", format!("n{i}-{j}")))
                        .collect::<Result<_, _>>()?;
                    let mut tx = pool.begin().await?;
                    inbox.first_time_many(&mut tx, &keys).await?;
                    tx.commit().await?;
                    Ok(())
                }
            })
        };
        let (rawn, inboxn) = ordered($swap, rawn, inboxn).await?;
        (raw1, inbox1, rawn, inboxn)
    }};
}

async fn sql_bench(b: &StoreBench, kind: Sql, swap: bool) -> Result<Vec<Row>, BoxError> {
    let clients = b.clients.unwrap_or(8);
    let id = run_id();
    let (raw_table, inbox_table, store_table) = (
        format!("bench_raw_{id}"),
        format!("bench_inbox_{id}"),
        format!("bench_store_{id}"),
    );
    let batch = b.batch.max(1);
    let batches = (b.ops / batch as u64).max(10);
    let max = u32::try_from(clients).unwrap_or(8);
    let drop_all = format!("DROP TABLE IF EXISTS {raw_table}, {inbox_table}, {store_table}");
    let (raw1, inbox1, rawn, shapen, inboxn, claim1, claimn, raw_name) = match kind {
        Sql::Postgres => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(max)
                .connect(&b.store)
                .await?;
            sqlx::query(&format!("CREATE TABLE {raw_table} (scope TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (scope, id))")).execute(&pool).await?;
            let inbox = PgInbox::new(pool.clone()).with_table(&inbox_table);
            inbox.migrate().await?;
            let store = PostgresStore::builder()
                .with_pool(pool.clone())
                .with_table(&store_table)
                .build()?;
            store.migrate().await?;
            let one = format!(
                "INSERT INTO {raw_table} (scope, id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            );
            let many = format!(
                "INSERT INTO {raw_table} (scope, id) SELECT 'b', unnest($1::text[]) ON CONFLICT DO NOTHING"
            );
            let (raw1, inbox1, rawn, inboxn) = inbox_rates!(
                swap,
                clients,
                b.ops,
                batch,
                batches,
                pool,
                inbox,
                one,
                many,
                |q, ids| q.bind(ids)
            );
            // the same insert into a table shaped like the inbox (its columns and retention index)
            sqlx::query(&format!(
                "CREATE TABLE {raw_table}_shape (LIKE {inbox_table} INCLUDING ALL)"
            ))
            .execute(&pool)
            .await?;
            let shaped = format!(
                "INSERT INTO {raw_table}_shape (scope, id, processed_at, expires_at)
                 SELECT 'b', unnest($1::text[]), 0, 0 ON CONFLICT DO NOTHING"
            );
            let shapen =
                batch_rate!(clients, batches, batch, pool, shaped, |q, ids| q.bind(ids)).await?;
            let (claim1, claimn) = store_rates(store, clients, b.ops, batch, batches).await?;
            let _ = sqlx::query(&drop_all).execute(&pool).await;
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {raw_table}_shape"))
                .execute(&pool)
                .await;
            (
                raw1,
                inbox1,
                rawn,
                shapen,
                inboxn,
                claim1,
                claimn,
                "INSERT … ON CONFLICT DO NOTHING",
            )
        }
        Sql::MySql => {
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(max)
                .connect(&b.store)
                .await?;
            sqlx::query(&format!(
                "CREATE TABLE {raw_table} (scope VARBINARY(255) NOT NULL, id VARBINARY(255) NOT NULL, PRIMARY KEY (scope, id)) ENGINE=InnoDB"
            ))
            .execute(&pool)
            .await?;
            let inbox = MySqlInbox::new(pool.clone()).with_table(&inbox_table);
            inbox.migrate().await?;
            let store = MySqlStore::builder()
                .with_pool(pool.clone())
                .with_table(&store_table)
                .build()?;
            store.migrate().await?;
            let one = format!("INSERT IGNORE INTO {raw_table} (scope, id) VALUES (?, ?)");
            let many = format!(
                "INSERT IGNORE INTO {raw_table} (scope, id) VALUES {}",
                vec!["('b', ?)"; batch].join(", ")
            );
            let (raw1, inbox1, rawn, inboxn) = inbox_rates!(
                swap,
                clients,
                b.ops,
                batch,
                batches,
                pool,
                inbox,
                one,
                many,
                |q, ids| ids.into_iter().fold(q, |q, id| q.bind(id))
            );
            sqlx::query(&format!(
                "CREATE TABLE {raw_table}_shape LIKE {inbox_table}"
            ))
            .execute(&pool)
            .await?;
            let shaped = format!(
                "INSERT IGNORE INTO {raw_table}_shape (scope, id, processed_at, expires_at, nonce) VALUES {}",
                vec!["('b', ?, 0, 0, 0)"; batch].join(", ")
            );
            let shapen = batch_rate!(clients, batches, batch, pool, shaped, |q, ids| {
                ids.into_iter().fold(q, |q, id| q.bind(id))
            })
            .await?;
            let (claim1, claimn) = store_rates(store, clients, b.ops, batch, batches).await?;
            let _ = sqlx::query(&drop_all).execute(&pool).await;
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {raw_table}_shape"))
                .execute(&pool)
                .await;
            (
                raw1,
                inbox1,
                rawn,
                shapen,
                inboxn,
                claim1,
                claimn,
                "INSERT IGNORE",
            )
        }
    };
    let rows_per = |r: f64| r * batch as f64;
    Ok(vec![
        (
            format!("raw {raw_name}, 1 row/tx, {clients} clients"),
            raw1,
            None,
        ),
        (
            format!("inbox first_time, 1 row/tx, {clients} clients"),
            inbox1,
            Some(raw1),
        ),
        (
            format!("store claim + complete, {clients} clients"),
            claim1,
            Some(raw1),
        ),
        (
            format!("raw {raw_name}, {batch} rows/tx (rows/s)"),
            rows_per(rawn),
            None,
        ),
        (
            format!("inbox first_time_many, {batch} rows/tx (rows/s)"),
            rows_per(inboxn),
            Some(rows_per(rawn)),
        ),
        (
            format!("  raw {raw_name} into the inbox's table shape (rows/s)"),
            rows_per(shapen),
            Some(rows_per(rawn)),
        ),
        (
            "  inbox first_time_many vs that same-shape insert".to_owned(),
            rows_per(inboxn),
            Some(rows_per(shapen)),
        ),
        (
            format!("store claim_many + complete_many, {batch}/batch (keys/s)"),
            rows_per(claimn),
            Some(rows_per(rawn)),
        ),
    ])
}

/// Claim + complete, single and batched, on any store.
async fn store_rates<S: Store + Clone>(
    store: S,
    clients: usize,
    ops: u64,
    batch: usize,
    batches: u64,
) -> Result<(f64, f64), BoxError> {
    let opts = ClaimOptions {
        lease: Duration::from_secs(60),
        retention: Duration::from_secs(600),
    };
    let single = {
        let store = store.clone();
        drive(clients, ops, move |i| {
            let store = store.clone();
            async move {
                if let Claim::Acquired(l) = store
                    .claim(&Key::new("s", format!("k{i}"))?, None, &opts)
                    .await?
                {
                    store
                        .complete(&l, &Outcome::new(0, "ok"), Duration::from_secs(600))
                        .await?;
                }
                Ok(())
            }
        })
        .await?
    };
    let batched = drive(clients, batches, move |i| {
        let store = store.clone();
        async move {
            let keys: Vec<(Key, Option<idemgate::core::Fingerprint>)> = (0..batch)
                .map(|j| Key::new("m", format!("k{i}-{j}")).map(|k| (k, None)))
                .collect::<Result<_, _>>()?;
            let claims = store.claim_many(&keys, &opts).await?;
            let done: Vec<_> = claims
                .into_iter()
                .filter_map(|c| match c {
                    Claim::Acquired(l) => Some((l, Outcome::new(0, "ok"))),
                    _ => None,
                })
                .collect();
            store.complete_many(&done, Duration::from_secs(600)).await?;
            Ok(())
        }
    })
    .await?;
    Ok((single, batched))
}

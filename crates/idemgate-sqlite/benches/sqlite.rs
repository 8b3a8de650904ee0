//! `SqliteStore` claim + complete beside its raw ceiling: a bare `INSERT OR IGNORE` per key, one
//! transaction each, on the same kind of file at the same durability.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemgate_core::{Claim, ClaimOptions, Key, Outcome, Store};
use idemgate_sqlite::{SqliteStore, Synchronous};
use rusqlite::Connection;

fn keys(n: u64) -> Vec<Key> {
    (0..n)
        .map(|i| Key::new("bench", format!("evt-{i:012}")).unwrap())
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let opts = ClaimOptions::with_lease(Duration::from_secs(30));
    let outcome = Outcome::new(0, "ok");
    let mut run = 0u32;

    for (sync, sync_name) in [(Synchronous::Normal, "NORMAL"), (Synchronous::Full, "FULL")] {
        let mut g = c.benchmark_group(format!("sqlite claim+complete, synchronous={sync_name}"));
        g.throughput(Throughput::Elements(1));

        g.bench_function("raw INSERT OR IGNORE (one transaction per key)", |b| {
            b.iter_custom(|iters| {
                run += 1;
                let conn = Connection::open(dir.path().join(format!("raw-{run}.db"))).unwrap();
                conn.execute_batch(&format!(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync_name};
                     CREATE TABLE raw (scope TEXT NOT NULL, id TEXT NOT NULL, v BLOB,
                                       PRIMARY KEY (scope, id)) WITHOUT ROWID;"
                ))
                .unwrap();
                let keys = keys(iters);
                let mut stmt = conn
                    .prepare("INSERT OR IGNORE INTO raw (scope, id, v) VALUES (?1, ?2, ?3)")
                    .unwrap();
                let start = Instant::now();
                for k in &keys {
                    stmt.execute(rusqlite::params![k.scope(), k.id(), &b"ok"[..]])
                        .unwrap();
                }
                start.elapsed()
            })
        });

        for callers in [1usize, 16] {
            g.bench_function(
                BenchmarkId::new("SqliteStore claim+complete, concurrent callers", callers),
                |b| {
                    b.iter_custom(|iters| {
                        run += 1;
                        let store = Arc::new(
                            SqliteStore::builder()
                                .with_path(dir.path().join(format!("store-{run}.db")))
                                .with_synchronous(sync)
                                .build()
                                .unwrap(),
                        );
                        let keys = Arc::new(keys(iters));
                        rt.block_on(async {
                            let start = Instant::now();
                            let tasks: Vec<_> = (0..callers)
                                .map(|c| {
                                    let (store, keys, outcome) =
                                        (Arc::clone(&store), Arc::clone(&keys), outcome.clone());
                                    tokio::spawn(async move {
                                        for key in keys.iter().skip(c).step_by(callers) {
                                            let Ok(Claim::Acquired(lease)) =
                                                store.claim(key, None, &opts).await
                                            else {
                                                unreachable!("fresh key")
                                            };
                                            store
                                                .complete(&lease, &outcome, Duration::from_secs(60))
                                                .await
                                                .unwrap();
                                        }
                                    })
                                })
                                .collect();
                            for t in tasks {
                                t.await.unwrap();
                            }
                            let t = start.elapsed();
                            black_box(&store);
                            t
                        })
                    })
                },
            );
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);

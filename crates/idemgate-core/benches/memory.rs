//! `MemoryStore` claim + complete beside its raw ceiling: a bare `HashMap` insert and update.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use idemgate_core::{Claim, ClaimOptions, Key, MemoryStore, Outcome, Store};

fn keys(n: u64) -> Vec<Key> {
    (0..n)
        .map(|i| Key::new("bench", format!("evt-{i:012}")).unwrap())
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("memory claim+complete");
    g.throughput(Throughput::Elements(1));
    let outcome = Outcome::new(0, "ok");
    let opts = ClaimOptions::with_lease(Duration::from_secs(30));

    g.bench_function("raw HashMap insert+update", |b| {
        b.iter_custom(|iters| {
            let ids: Vec<String> = (0..iters).map(|i| format!("bench/evt-{i:012}")).collect();
            let mut map: HashMap<String, (u64, Option<Outcome>)> = HashMap::new();
            let start = Instant::now();
            for id in &ids {
                map.insert(id.clone(), (1, None));
                if let Some(v) = map.get_mut(id) {
                    v.1 = Some(outcome.clone());
                }
            }
            let t = start.elapsed();
            black_box(map);
            t
        })
    });

    g.bench_function("MemoryStore claim+complete", |b| {
        b.iter_custom(|iters| {
            let keys = keys(iters);
            let store = MemoryStore::unbounded();
            rt.block_on(async {
                let start = Instant::now();
                for key in &keys {
                    let Ok(Claim::Acquired(lease)) = store.claim(key, None, &opts).await else {
                        unreachable!("fresh key")
                    };
                    store
                        .complete(&lease, &outcome, Duration::from_secs(60))
                        .await
                        .unwrap();
                }
                let t = start.elapsed();
                black_box(&store);
                t
            })
        })
    });

    g.bench_function("MemoryStore replay (claim of a completed key)", |b| {
        let store = MemoryStore::unbounded();
        let keys = keys(1024);
        rt.block_on(async {
            for key in &keys {
                let Ok(Claim::Acquired(lease)) = store.claim(key, None, &opts).await else {
                    unreachable!()
                };
                store
                    .complete(&lease, &outcome, Duration::from_secs(3600))
                    .await
                    .unwrap();
            }
        });
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % keys.len();
            rt.block_on(store.claim(&keys[i], None, &opts)).unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);

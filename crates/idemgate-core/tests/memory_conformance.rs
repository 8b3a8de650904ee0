//! The conformance suite and the model test on `MemoryStore`.

use idemgate_core::{ManualClock, MemoryStore};
use idemgate_testkit::conformance::{self, Ctx};

fn store(clock: &ManualClock) -> MemoryStore {
    MemoryStore::builder()
        .with_clock(clock.clone())
        .build()
        .unwrap()
}

idemgate_testkit::conformance_tests!(async {
    let clock = ManualClock::new();
    Ctx::manual(store(&clock), clock)
});

#[tokio::test]
async fn capacity() {
    let clock = ManualClock::new();
    let bounded = MemoryStore::builder()
        .with_clock(clock.clone())
        .with_capacity(5)
        .with_shards(3)
        .build()
        .unwrap();
    conformance::capacity(&Ctx::manual(bounded, clock), 5).await;
}

#[test]
fn matches_reference_model() {
    idemgate_testkit::model::check_against_model(256, |clock| store(&clock));
}

#[test]
fn zero_shards_is_a_config_error() {
    assert!(matches!(
        MemoryStore::builder().with_shards(0).build(),
        Err(idemgate_core::Error::Config { .. })
    ));
}

/// A full store makes room from expired records in any shard, and never overshoots its bound
/// under concurrent claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_is_exact_under_concurrency_and_sweeps_every_shard() {
    use idemgate_core::{Claim, Error, Key, Outcome, Store, StoreExt};
    use std::sync::Arc;
    use std::time::Duration;

    let clock = ManualClock::new();
    let store = Arc::new(
        MemoryStore::builder()
            .with_clock(clock.clone())
            .with_capacity(40)
            .with_shards(16)
            .build()
            .unwrap(),
    );
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .claim_for(
                        &Key::new("cap", format!("k{i}")).unwrap(),
                        Duration::from_secs(1),
                    )
                    .await
            })
        })
        .collect();
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(Claim::Acquired(l)) => won.push(l),
            Err(Error::Capacity { limit: 40 }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(won.len(), 40, "the bound was not exact");
    assert_eq!(store.len(), 40);
    for l in &won {
        store
            .complete(l, &Outcome::new(0, "x"), Duration::from_secs(1))
            .await
            .unwrap();
    }
    clock.advance(Duration::from_secs(2));
    for i in 0..40 {
        let key = Key::new("cap", format!("fresh{i}")).unwrap();
        assert!(
            matches!(
                store.claim_for(&key, Duration::from_secs(1)).await,
                Ok(Claim::Acquired(_))
            ),
            "expired records did not make room for {key}"
        );
    }
}

/// Outcomes are bounded in bytes too: a store full of responses refuses a large one with
/// `Capacity` (the key stays claimed), still takes a small marker, and frees the bytes of
/// expired and purged records.
#[tokio::test]
async fn outcome_bytes_are_bounded() {
    use idemgate_core::{Claim, Error, Key, Outcome, Store, StoreExt};
    use std::time::Duration;

    let clock = ManualClock::new();
    let store = MemoryStore::builder()
        .with_clock(clock.clone())
        .with_max_outcome_bytes(10_000)
        .build()
        .unwrap();
    let big = Outcome::new(200, vec![7u8; 4_000]);
    let claim = |i: usize| {
        let store = &store;
        async move {
            let key = Key::new("bytes", format!("k{i}")).unwrap();
            match store.claim_for(&key, Duration::from_secs(1)).await.unwrap() {
                Claim::Acquired(lease) => lease,
                other => panic!("{other:?}"),
            }
        }
    };
    for i in 0..2 {
        let lease = claim(i).await;
        store
            .complete(&lease, &big, Duration::from_secs(1))
            .await
            .unwrap();
    }
    let third = claim(2).await;
    assert!(matches!(
        store.complete(&third, &big, Duration::from_secs(1)).await,
        Err(Error::Capacity { limit: 10_000 })
    ));
    // the refused completion changed nothing: the key is still held, and a marker fits
    store
        .complete(
            &third,
            &Outcome::new(200, "").with_meta(":not-stored", "4000"),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert!(store.outcome_bytes() <= 10_000);
    // once the first two expire, their bytes make room again
    clock.advance(Duration::from_secs(2));
    let fourth = claim(3).await;
    store
        .complete(&fourth, &big, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(store.outcome_bytes() < 10_000, "{}", store.outcome_bytes());
    clock.advance(Duration::from_secs(2));
    store.purge_expired(100).await.unwrap();
    assert_eq!(store.outcome_bytes(), 0);
}

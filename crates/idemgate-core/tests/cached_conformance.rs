//! The conformance suite and the model test on `CachedStore` over `MemoryStore`, and what the
//! cache itself promises: replays from memory, fingerprints checked, forget seen at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idemgate_core::{
    CachedStore, Claim, ClaimOptions, Fingerprint, Forgotten, Key, Lease, ManualClock, MemoryStore,
    Outcome, Record, Result, Store,
};
use idemgate_testkit::conformance::Ctx;

fn store(clock: &ManualClock) -> CachedStore<MemoryStore> {
    let inner = MemoryStore::builder()
        .with_clock(clock.clone())
        .build()
        .unwrap();
    CachedStore::new(inner).with_clock(clock.clone())
}

idemgate_testkit::conformance_tests!(async {
    let clock = ManualClock::new();
    Ctx::manual(store(&clock), clock)
});

#[test]
fn matches_reference_model() {
    idemgate_testkit::model::check_against_model(256, |clock| store(&clock));
}

/// A store that counts the claims that reach it.
#[derive(Debug)]
struct Counting(MemoryStore, AtomicU32);

impl Store for Counting {
    async fn claim(&self, k: &Key, fp: Option<&Fingerprint>, o: &ClaimOptions) -> Result<Claim> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.claim(k, fp, o).await
    }
    async fn complete(&self, l: &Lease, o: &Outcome, r: Duration) -> Result<()> {
        self.0.complete(l, o, r).await
    }
    async fn release(&self, l: Lease) -> Result<()> {
        self.0.release(l).await
    }
    async fn renew(&self, l: &Lease, e: Duration) -> Result<Lease> {
        self.0.renew(l, e).await
    }
    async fn get(&self, k: &Key) -> Result<Option<Record>> {
        self.0.get(k).await
    }
    async fn purge_expired(&self, n: usize) -> Result<u64> {
        self.0.purge_expired(n).await
    }
    async fn forget(&self, k: &Key, force: bool) -> Result<Forgotten> {
        self.0.forget(k, force).await
    }
    async fn claim_many(
        &self,
        c: &[(Key, Option<Fingerprint>)],
        o: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        self.1
            .fetch_add(u32::try_from(c.len()).unwrap(), Ordering::SeqCst);
        self.0.claim_many(c, o).await
    }
    async fn complete_many(&self, d: &[(Lease, Outcome)], r: Duration) -> Result<Vec<Result<()>>> {
        self.0.complete_many(d, r).await
    }
}

#[tokio::test]
async fn replays_come_from_memory_but_never_leases_or_another_request() {
    let clock = ManualClock::new();
    let inner = MemoryStore::builder()
        .with_clock(clock.clone())
        .build()
        .unwrap();
    let store = CachedStore::new(Arc::new(Counting(inner, AtomicU32::new(0))))
        .with_clock(clock.clone())
        .with_ttl(Duration::from_secs(10));
    let reached = || store.inner().1.load(Ordering::SeqCst);
    let (key, fp, other) = (
        Key::new("c", "k").unwrap(),
        Fingerprint::of(b"a"),
        Fingerprint::of(b"b"),
    );
    let opts = ClaimOptions::with_lease(Duration::from_secs(5));
    let Claim::Acquired(lease) = store.claim(&key, Some(&fp), &opts).await.unwrap() else {
        panic!("a new key was not acquired")
    };
    // in progress: never cached, every duplicate asks the store
    for _ in 0..3 {
        let c = store.claim(&key, Some(&fp), &opts).await.unwrap();
        assert!(matches!(c, Claim::InProgress { .. }), "{c:?}");
    }
    assert_eq!(reached(), 4);
    store
        .complete(
            &lease,
            &Outcome::new(201, "made"),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    // the first replay reads the store; the next ones do not
    for _ in 0..5 {
        let c = store.claim(&key, Some(&fp), &opts).await.unwrap();
        assert!(
            matches!(&c, Claim::Completed(r) if r.outcome().unwrap().body == "made"),
            "{c:?}"
        );
    }
    assert_eq!(reached(), 5, "replays of a hot key went to the store");
    // another request under the key is a mismatch, from the cache too
    let c = store.claim(&key, Some(&other), &opts).await.unwrap();
    assert_eq!(c, Claim::Mismatch { stored: fp });
    assert_eq!(reached(), 5);
    // past the TTL the store is asked again
    clock.advance(Duration::from_secs(11));
    assert!(matches!(
        store.claim(&key, Some(&fp), &opts).await.unwrap(),
        Claim::Completed(_)
    ));
    assert_eq!(reached(), 6);
    // a forget through the cache is seen at once: the next claim runs afresh
    assert!(matches!(
        store.forget(&key, false).await.unwrap(),
        Forgotten::Removed { .. }
    ));
    assert!(matches!(
        store.claim(&key, Some(&other), &opts).await.unwrap(),
        Claim::Acquired(_)
    ));
}

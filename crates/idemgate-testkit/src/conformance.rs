//! The conformance suite: one function per rule of the `Store` contract.
//!
//! Every function panics with a message naming the broken rule. Backends stamp them into tests
//! with [`conformance_tests!`](crate::conformance_tests).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use idemgate_core::{
    Claim, ClaimOptions, Error, Fingerprint, Key, Lease, ManualClock, Outcome, Record, State, Store,
};

/// A store under test and a way to make its time pass.
pub struct Ctx<S> {
    /// The store under test, shared with the racing tasks.
    pub store: Arc<S>,
    clock: Option<ManualClock>,
    scope: String,
    self_expiring: bool,
    _guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Ctx<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("store", &self.store)
            .field("scope", &self.scope)
            .finish()
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl<S: Store> Ctx<S> {
    /// A store whose expiry is judged by `clock` (the one it was built with).
    pub fn manual(store: S, clock: ManualClock) -> Self {
        Self::new(store, Some(clock))
    }

    /// A store on a real clock (a server's): time passes by sleeping.
    pub fn real_time(store: S) -> Self {
        Self::new(store, None)
    }

    fn new(store: S, clock: Option<ManualClock>) -> Self {
        let scope = format!(
            "conformance-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Ctx {
            store: Arc::new(store),
            clock,
            scope,
            self_expiring: false,
            _guard: None,
        }
    }

    /// Marks a backend that deletes expired records by itself (Redis key expiry): its
    /// `purge_expired` may find nothing left to delete.
    pub fn self_expiring(mut self) -> Self {
        self.self_expiring = true;
        self
    }

    /// Keeps `guard` (a temporary directory, a server handle) alive as long as the context.
    pub fn keep(mut self, guard: impl std::any::Any + Send + Sync) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }

    /// A key unique to this context.
    pub fn key(&self, id: &str) -> Key {
        Key::new(&self.scope, id).expect("test keys are valid")
    }

    /// Makes `d` pass on the store's clock.
    pub async fn advance(&self, d: Duration) {
        match &self.clock {
            Some(clock) => clock.advance(d),
            None => tokio::time::sleep(d).await,
        }
    }
}

/// What a `conformance_tests!` factory may yield: a context, or `None` when the service is
/// missing and the run allows skipping (see [`crate::service`]).
pub trait IntoCtx<S> {
    /// The context, if any.
    fn into_ctx(self) -> Option<Ctx<S>>;
}

impl<S> IntoCtx<S> for Ctx<S> {
    fn into_ctx(self) -> Option<Ctx<S>> {
        Some(self)
    }
}

impl<S> IntoCtx<S> for Option<Ctx<S>> {
    fn into_ctx(self) -> Option<Ctx<S>> {
        self
    }
}

/// Leases and retentions are in units of this, so that real-time backends run quickly.
const UNIT: Duration = Duration::from_millis(400);
const LONG: Duration = Duration::from_secs(3600);

fn opts(lease: Duration) -> ClaimOptions {
    ClaimOptions {
        lease,
        retention: LONG,
    }
}

async fn acquire<S: Store>(ctx: &Ctx<S>, key: &Key, lease: Duration) -> Lease {
    match ctx.store.claim(key, None, &opts(lease)).await {
        Ok(Claim::Acquired(lease)) => lease,
        other => panic!("expected Acquired for a free key {key}, got {other:?}"),
    }
}

/// `key`'s record, which must exist (`what` names it in the failure).
async fn record<S: Store>(ctx: &Ctx<S>, key: &Key, what: &str) -> Record {
    ctx.store
        .get(key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no {what} record for {key}"))
}

async fn claim<S: Store>(ctx: &Ctx<S>, key: &Key, fp: Option<&Fingerprint>) -> Claim {
    ctx.store
        .claim(key, fp, &opts(UNIT))
        .await
        .expect("claim must not fail")
}

fn outcome(tag: &str) -> Outcome {
    Outcome::new(200, tag.as_bytes().to_vec()).with_meta("x-tag", tag.as_bytes())
}

/// Rule 2: a new key is acquired with attempt 1, and the record shows it in progress.
pub async fn claim_new_key<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("new");
    assert_eq!(
        ctx.store.get(&key).await.unwrap(),
        None,
        "unknown key has a record"
    );
    let lease = acquire(ctx, &key, UNIT).await;
    assert_eq!(lease.key(), &key);
    assert_eq!(lease.attempt(), 1);
    let rec = record(ctx, &key, "claimed").await;
    assert!(
        matches!(rec.state, State::InProgress { token, .. } if token == lease.token()),
        "record {rec:?} does not show lease {lease:?}"
    );
    assert_eq!(rec.attempts, 1);
}

/// Rules 1 and 2: of 64 concurrent claims of a free key exactly one is `Acquired`; repeated.
pub async fn exclusive_claim_race<S: Store>(ctx: &Ctx<S>) {
    for round in 0..20 {
        let key = ctx.key(&format!("race-{round}"));
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (store, key, barrier) =
                    (Arc::clone(&ctx.store), key.clone(), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.claim(&key, None, &opts(LONG)).await
                })
            })
            .collect();
        let mut acquired = 0;
        for t in tasks {
            match t.await.expect("claim task panicked").expect("claim failed") {
                Claim::Acquired(_) => acquired += 1,
                Claim::InProgress { .. } => {}
                other => panic!("round {round}: unexpected {other:?} in a race on a free key"),
            }
        }
        assert_eq!(
            acquired, 1,
            "round {round}: {acquired} of 64 racing claims acquired the key"
        );
    }
}

/// Rule 4: a completed record is replayed, with its outcome, to every later claim.
pub async fn completed_is_replayed<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("done");
    let fp = Fingerprint::of(b"request");
    let Claim::Acquired(lease) = claim(ctx, &key, Some(&fp)).await else {
        panic!("new key not acquired")
    };
    ctx.store
        .complete(&lease, &outcome("first"), LONG)
        .await
        .unwrap();
    for _ in 0..3 {
        match claim(ctx, &key, Some(&fp)).await {
            Claim::Completed(rec) => {
                assert_eq!(
                    rec.outcome(),
                    Some(&outcome("first")),
                    "outcome not replayed intact"
                );
                assert_eq!(rec.fingerprint, Some(fp));
                assert_eq!(rec.attempts, 1);
            }
            other => panic!("completed key claimed as {other:?}"),
        }
    }
    assert!(
        matches!(claim(ctx, &key, None).await, Claim::Completed(_)),
        "claim without a fingerprint must replay"
    );
    let rec = record(ctx, &key, "completed").await;
    assert!(matches!(rec.state, State::Completed { token, .. } if token == lease.token()));
}

/// A completed record keeps its claim's `created_at`, and reads back `completed_at` when
/// `complete` was called and `expires_at` one retention after it, on the store's clock.
pub async fn completed_record_keeps_its_times<S: Store>(ctx: &Ctx<S>) {
    // what two readings of the store's clock (or a derivation from a TTL) may differ by
    let close = |a: SystemTime, b: SystemTime, what: &str| {
        let d = a.duration_since(b).unwrap_or_else(|e| e.duration());
        assert!(d <= Duration::from_millis(5), "{what}: {a:?} against {b:?}");
    };
    let key = ctx.key("times");
    let lease = acquire(ctx, &key, UNIT).await;
    let claimed = record(ctx, &key, "claimed").await;
    ctx.advance(UNIT / 2).await;
    let retention = Duration::from_secs(600);
    ctx.store
        .complete(&lease, &outcome("timed"), retention)
        .await
        .unwrap();
    let rec = record(ctx, &key, "completed").await;
    let State::Completed { completed_at, .. } = rec.state else {
        panic!("not completed: {rec:?}")
    };
    close(rec.created_at, claimed.created_at, "created_at kept");
    let ran = completed_at
        .duration_since(rec.created_at)
        .expect("completed after created");
    assert!(
        ran + Duration::from_millis(5) >= UNIT / 2,
        "completed_at {ran:?} after created_at, not the {:?} that passed",
        UNIT / 2
    );
    close(rec.expires_at, completed_at + retention, "expires_at");
}

/// A released key is free at once; the next claim gets a larger token.
pub async fn release_then_reclaim<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("release");
    let first = acquire(ctx, &key, LONG).await;
    let token = first.token();
    ctx.store.release(first).await.unwrap();
    let second = acquire(ctx, &key, LONG).await;
    assert!(second.token() > token, "token did not grow after release");
    assert_eq!(second.attempt(), 2);

    // a released attempt leaves the key unused: the next claim may carry another request
    // (a client that corrects a rejected request retries with the same key)
    let key = ctx.key("release-fp");
    let (a, b) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));
    let first = match ctx.store.claim(&key, Some(&a), &opts(LONG)).await {
        Ok(Claim::Acquired(lease)) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    };
    ctx.store.release(first).await.unwrap();
    match ctx.store.claim(&key, Some(&b), &opts(LONG)).await {
        Ok(Claim::Acquired(lease)) => {
            ctx.store
                .complete(&lease, &outcome("b"), LONG)
                .await
                .unwrap();
        }
        other => panic!("a released key refused another request: {other:?}"),
    }
    assert!(
        matches!(ctx.store.claim(&key, Some(&a), &opts(LONG)).await, Ok(Claim::Mismatch { stored }) if stored == b),
        "the completed key forgot its request's fingerprint"
    );
}

/// Rules 4 and 5: after `expires_at` a completed key is free again, judged by the clock.
pub async fn expiry_frees_key<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("expiry");
    let lease = acquire(ctx, &key, UNIT).await;
    ctx.store
        .complete(&lease, &outcome("old"), UNIT)
        .await
        .unwrap();
    assert!(matches!(claim(ctx, &key, None).await, Claim::Completed(_)));
    ctx.advance(UNIT * 2).await;
    assert_eq!(
        ctx.store.get(&key).await.unwrap(),
        None,
        "expired record still returned by get"
    );
    let again = acquire(ctx, &key, UNIT).await;
    assert_eq!(
        again.attempt(),
        1,
        "a key free after expiry starts a new record"
    );
    assert!(
        again.token() > lease.token(),
        "token must keep growing across expiry"
    );
}

/// Rule 3: an expired lease is taken over with a larger token; a live one is reported.
pub async fn takeover_after_lease_expiry<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("takeover");
    let first = acquire(ctx, &key, UNIT).await;
    match claim(ctx, &key, None).await {
        Claim::InProgress {
            attempts,
            lease_until,
        } => {
            assert_eq!(attempts, 1);
            assert!(lease_until >= first.expires_at() - Duration::from_millis(5));
        }
        other => panic!("live lease claimed as {other:?}"),
    }
    ctx.advance(UNIT * 2).await;
    let second = acquire(ctx, &key, UNIT).await;
    assert!(
        second.token() > first.token(),
        "take-over must increase the token"
    );
    assert_eq!(second.attempt(), 2);
}

/// Rule 3: complete, release and renew with a stale token fail with `LeaseLost` and change
/// nothing.
pub async fn fencing<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("fencing");
    let stale = acquire(ctx, &key, UNIT).await;
    ctx.advance(UNIT * 2).await;
    let current = acquire(ctx, &key, LONG).await;
    let before = ctx.store.get(&key).await.unwrap();

    let r = ctx.store.complete(&stale, &outcome("zombie"), LONG).await;
    assert!(
        matches!(r, Err(Error::LeaseLost)),
        "stale complete gave {r:?}"
    );
    let r = ctx.store.renew(&stale, LONG).await;
    assert!(matches!(r, Err(Error::LeaseLost)), "stale renew gave {r:?}");
    let r = ctx.store.release(stale.clone()).await;
    assert!(
        matches!(r, Err(Error::LeaseLost)),
        "stale release gave {r:?}"
    );
    assert_eq!(
        ctx.store.get(&key).await.unwrap(),
        before,
        "a stale lease changed the record"
    );

    ctx.store
        .complete(&current, &outcome("owner"), LONG)
        .await
        .unwrap();
    let r = ctx.store.complete(&stale, &outcome("zombie"), LONG).await;
    assert!(
        matches!(r, Err(Error::LeaseLost)),
        "stale complete after completion gave {r:?}"
    );
    let r = ctx.store.complete(&current, &outcome("twice"), LONG).await;
    assert!(
        matches!(r, Err(Error::LeaseLost)),
        "second complete gave {r:?}"
    );
    let rec = record(ctx, &key, "stored").await;
    assert_eq!(
        rec.outcome(),
        Some(&outcome("owner")),
        "the owner's outcome was overwritten"
    );
}

/// Rule 10: `forget` deletes a completed record, refuses a live lease without `force`, and with
/// it leaves a tombstone that frees the key while the old holder stays fenced.
pub async fn forget_keeps_fencing<S: Store>(ctx: &Ctx<S>) {
    use idemgate_core::Forgotten;
    let absent = ctx.key("forget-absent");
    assert_eq!(
        ctx.store.forget(&absent, true).await.unwrap(),
        Forgotten::Absent
    );

    // a completed record's outcome goes: the next claim runs afresh with a larger token
    let done = ctx.key("forget-done");
    let first = acquire(ctx, &done, LONG).await;
    ctx.store
        .complete(&first, &outcome("first"), LONG)
        .await
        .unwrap();
    let Forgotten::Removed { token } = ctx.store.forget(&done, false).await.unwrap() else {
        panic!("forget of a completed record did not remove it")
    };
    assert!(token > first.token(), "the tombstone kept the last token");
    assert_eq!(
        ctx.store
            .get(&done)
            .await
            .unwrap()
            .and_then(|r| r.outcome().cloned()),
        None,
        "a forgotten outcome is still there"
    );
    let again = acquire(ctx, &done, LONG).await;
    assert!(again.token() > token, "a forgotten key reused a token");
    assert!(matches!(
        ctx.store.complete(&first, &outcome("late"), LONG).await,
        Err(Error::LeaseLost)
    ));

    // a live lease is refused without force, and nothing changes
    let live = ctx.key("forget-live");
    let (a, b) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));
    let zombie = match ctx.store.claim(&live, Some(&a), &opts(LONG)).await {
        Ok(Claim::Acquired(lease)) => lease,
        other => panic!("expected Acquired for a free key, got {other:?}"),
    };
    assert!(
        matches!(
            ctx.store.forget(&live, false).await.unwrap(),
            Forgotten::Held { .. }
        ),
        "forget without force took a live lease away"
    );
    let held = record(ctx, &live, "held").await;
    assert_eq!(
        (held.token(), held.fingerprint),
        (zombie.token(), Some(a)),
        "forget without force changed the record"
    );

    // forced: a tombstone; the key is free (for another request, too), the zombie is fenced
    let Forgotten::Tombstoned { token } = ctx.store.forget(&live, true).await.unwrap() else {
        panic!("a forced forget of a live lease left no tombstone")
    };
    assert!(
        token > zombie.token(),
        "the tombstone kept the zombie's token"
    );
    let next = match ctx.store.claim(&live, Some(&b), &opts(LONG)).await {
        Ok(Claim::Acquired(lease)) => lease,
        other => panic!("a forgotten key was not free: {other:?}"),
    };
    assert!(
        next.token() > token,
        "the claim after a tombstone reused its token"
    );
    for r in [
        ctx.store.complete(&zombie, &outcome("zombie"), LONG).await,
        ctx.store.renew(&zombie, LONG).await.map(drop),
        ctx.store.release(zombie.clone()).await,
    ] {
        assert!(
            matches!(r, Err(Error::LeaseLost)),
            "the forgotten lease's holder was not fenced: {r:?}"
        );
    }
    ctx.store
        .complete(&next, &outcome("next"), LONG)
        .await
        .unwrap();
    assert_eq!(
        record(ctx, &live, "completed").await.outcome(),
        Some(&outcome("next"))
    );

    // a tombstone left without a new claim still fences the zombie
    let idle = ctx.key("forget-idle");
    let zombie = acquire(ctx, &idle, LONG).await;
    assert!(matches!(
        ctx.store.forget(&idle, true).await.unwrap(),
        Forgotten::Tombstoned { .. }
    ));
    assert!(matches!(
        ctx.store.complete(&zombie, &outcome("zombie"), LONG).await,
        Err(Error::LeaseLost)
    ));
    assert!(
        matches!(claim(ctx, &idle, None).await, Claim::Acquired(_)),
        "a tombstone was not free"
    );
}

/// A claim with another fingerprint is `Mismatch`, for completed and in-progress keys.
pub async fn fingerprint_mismatch<S: Store>(ctx: &Ctx<S>) {
    let (a, b) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));
    let key = ctx.key("mismatch");
    let Claim::Acquired(lease) = claim(ctx, &key, Some(&a)).await else {
        panic!("new key not acquired")
    };
    assert_eq!(
        claim(ctx, &key, Some(&b)).await,
        Claim::Mismatch { stored: a },
        "in progress"
    );
    ctx.store
        .complete(&lease, &outcome("a"), LONG)
        .await
        .unwrap();
    assert_eq!(
        claim(ctx, &key, Some(&b)).await,
        Claim::Mismatch { stored: a },
        "completed"
    );
    assert!(matches!(
        claim(ctx, &key, Some(&a)).await,
        Claim::Completed(_)
    ));
}

/// Renewing a lease keeps others out past its first expiry.
pub async fn renew_extends_lease<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("renew");
    let lease = acquire(ctx, &key, UNIT * 2).await;
    ctx.advance(UNIT).await;
    let renewed = ctx.store.renew(&lease, UNIT * 3).await.unwrap();
    assert_eq!(renewed.token(), lease.token());
    assert!(
        renewed.expires_at() > lease.expires_at(),
        "renew did not move the expiry"
    );
    ctx.advance(UNIT * 2).await;
    assert!(
        matches!(claim(ctx, &key, None).await, Claim::InProgress { .. }),
        "a renewed lease was taken over"
    );
    ctx.store
        .complete(&renewed, &outcome("late"), LONG)
        .await
        .unwrap();
}

/// Rule 9: an abandoned claim's record outlives its lease, so its holder stays fenced, and
/// purge does not remove it early.
pub async fn abandoned_claim_stays_fenced<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("abandoned");
    let first = acquire(ctx, &key, UNIT).await;
    ctx.advance(UNIT * 2).await;
    ctx.store.purge_expired(1000).await.unwrap();
    let second = acquire(ctx, &key, UNIT).await;
    ctx.store.release(second).await.unwrap();
    ctx.store.purge_expired(1000).await.unwrap();
    let third = acquire(ctx, &key, LONG).await;
    assert!(
        third.token() > first.token() + 1,
        "tokens were reused after purge/release"
    );
    assert!(matches!(
        ctx.store.complete(&first, &outcome("zombie"), LONG).await,
        Err(Error::LeaseLost)
    ));
}

/// Rule 9, at its edge: a claim with no retention expires with its lease and may be purged; the
/// key's next record still hands out a token the purged one never had, so the first holder,
/// back late, cannot complete over the new one.
pub async fn fencing_survives_purge<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("purged");
    let short = ClaimOptions {
        lease: UNIT,
        retention: Duration::ZERO,
    };
    let zombie = match ctx.store.claim(&key, None, &short).await {
        Ok(Claim::Acquired(lease)) => lease,
        other => panic!("expected Acquired for a free key {key}, got {other:?}"),
    };
    ctx.advance(UNIT * 2).await;
    ctx.store.purge_expired(1000).await.unwrap();
    if !ctx.self_expiring {
        assert_eq!(
            ctx.store.get(&key).await.unwrap(),
            None,
            "the expired record was not purged"
        );
    }
    let owner = acquire(ctx, &key, LONG).await;
    let before = ctx.store.get(&key).await.unwrap();
    assert!(
        owner.token() > zombie.token(),
        "the token went backwards after a purge: {} then {}",
        zombie.token(),
        owner.token()
    );
    assert!(
        matches!(
            ctx.store.complete(&zombie, &outcome("zombie"), LONG).await,
            Err(Error::LeaseLost)
        ),
        "a lease of a purged record completed the key's new record"
    );
    assert!(matches!(
        ctx.store.renew(&zombie, LONG).await,
        Err(Error::LeaseLost)
    ));
    assert!(matches!(
        ctx.store.release(zombie).await,
        Err(Error::LeaseLost)
    ));
    // what the zombie could have changed; the times of a record a store derives from a TTL
    // (Redis) may read a millisecond apart
    let seen = |r: Option<idemgate_core::Record>| {
        r.map(|r| {
            let until = match r.state {
                State::InProgress { lease_until, .. } => Some(lease_until),
                State::Completed { .. } => None,
            };
            (r.token(), until, r.attempts, r.fingerprint)
        })
    };
    let (after, before) = (seen(ctx.store.get(&key).await.unwrap()), seen(before));
    let close = |a: Option<std::time::SystemTime>, b: Option<std::time::SystemTime>| match (a, b) {
        (Some(a), Some(b)) => {
            a.duration_since(b)
                .or_else(|_| b.duration_since(a))
                .unwrap()
                <= Duration::from_millis(5)
        }
        _ => false,
    };
    match (&after, &before) {
        (Some((t1, u1, a1, f1)), Some((t2, u2, a2, f2))) => assert!(
            t1 == t2 && t1 == &owner.token() && close(*u1, *u2) && a1 == a2 && f1 == f2,
            "the new record changed under the zombie's calls: {after:?} after {before:?}"
        ),
        _ => panic!("the new record is gone: {after:?} after {before:?}"),
    }
    ctx.store
        .complete(&owner, &outcome("owner"), LONG)
        .await
        .unwrap();
}

/// Leases and retentions of any length, up to `Duration::MAX`, get an answer or a typed error,
/// never a panic, and leave the store serving.
pub async fn huge_durations_are_answered<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("huge");
    let huge = ClaimOptions {
        lease: Duration::MAX,
        retention: Duration::MAX,
    };
    if let Ok(Claim::Acquired(lease)) = ctx.store.claim(&key, None, &huge).await {
        let _ = ctx.store.renew(&lease, Duration::MAX).await;
        let _ = ctx
            .store
            .complete(&lease, &outcome("h"), Duration::MAX)
            .await;
    }
    let other = ctx.key("huge-retention");
    let lease = acquire(ctx, &other, UNIT).await;
    let _ = ctx
        .store
        .complete(&lease, &outcome("h"), Duration::MAX)
        .await;
    // the store still serves ordinary calls
    let after = ctx.key("after-huge");
    let lease = acquire(ctx, &after, UNIT).await;
    ctx.store
        .complete(&lease, &outcome("a"), LONG)
        .await
        .unwrap();
}

/// Purge removes expired records only, at most `limit` at a time.
pub async fn purge_expired<S: Store>(ctx: &Ctx<S>) {
    for i in 0..3 {
        let key = ctx.key(&format!("short-{i}"));
        let lease = acquire(ctx, &key, UNIT).await;
        ctx.store
            .complete(&lease, &outcome("s"), UNIT)
            .await
            .unwrap();
    }
    let keep = ctx.key("long");
    let lease = acquire(ctx, &keep, UNIT).await;
    ctx.store
        .complete(&lease, &outcome("l"), LONG)
        .await
        .unwrap();
    assert_eq!(
        ctx.store.purge_expired(100).await.unwrap(),
        0,
        "purged live records"
    );
    ctx.advance(UNIT * 2).await;
    if ctx.self_expiring {
        for i in 0..3 {
            let key = ctx.key(&format!("short-{i}"));
            assert_eq!(
                ctx.store.get(&key).await.unwrap(),
                None,
                "an expired record is served"
            );
        }
        assert!(ctx.store.purge_expired(100).await.unwrap() <= 3);
    } else {
        assert_eq!(
            ctx.store.purge_expired(2).await.unwrap(),
            2,
            "purge ignored its limit"
        );
        assert_eq!(ctx.store.purge_expired(100).await.unwrap(), 1);
        assert_eq!(ctx.store.purge_expired(100).await.unwrap(), 0);
    }
    assert!(
        ctx.store.get(&keep).await.unwrap().is_some(),
        "purge removed a live record"
    );
}

/// Rule 7: `claim_many` and `complete_many` answer as the single forms would, in order.
pub async fn batched_forms_match_single_forms<S: Store>(ctx: &Ctx<S>) {
    let (fa, fb) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));
    let (n1, n2, c, d) = (
        ctx.key("b-n1"),
        ctx.key("b-n2"),
        ctx.key("b-c"),
        ctx.key("b-d"),
    );
    let Claim::Acquired(lc) = claim(ctx, &c, Some(&fa)).await else {
        panic!("c not acquired")
    };
    ctx.store.complete(&lc, &outcome("c"), LONG).await.unwrap();
    let Claim::Acquired(ld) = ctx.store.claim(&d, None, &opts(LONG)).await.unwrap() else {
        panic!("d not acquired")
    };
    assert_eq!(
        ctx.store.claim_many(&[], &opts(LONG)).await.unwrap(),
        Vec::<Claim>::new()
    );

    let batch = [
        (n1.clone(), None),
        (n2.clone(), Some(fa)),
        (n1.clone(), None),
        (c.clone(), Some(fa)),
        (c.clone(), Some(fb)),
        (d.clone(), None),
    ];
    let got = ctx.store.claim_many(&batch, &opts(LONG)).await.unwrap();
    assert_eq!(got.len(), batch.len());
    let (Claim::Acquired(l1), Claim::Acquired(l2)) = (&got[0], &got[1]) else {
        panic!("new keys in a batch were not acquired: {got:?}")
    };
    assert_eq!((l1.key(), l2.key()), (&n1, &n2));
    assert!(
        matches!(got[2], Claim::InProgress { attempts: 1, .. }),
        "a key repeated in a batch: {:?}",
        got[2]
    );
    assert!(
        matches!(&got[3], Claim::Completed(r) if r.outcome() == Some(&outcome("c"))),
        "{:?}",
        got[3]
    );
    assert_eq!(got[4], Claim::Mismatch { stored: fa });
    assert!(matches!(got[5], Claim::InProgress { .. }), "{:?}", got[5]);

    // the same without a repeated key (backends may take another path for repeats)
    let (m1, m2) = (ctx.key("b-m1"), ctx.key("b-m2"));
    let distinct = [
        (m1.clone(), Some(fb)),
        (c.clone(), Some(fa)),
        (m2.clone(), None),
    ];
    let got2 = ctx.store.claim_many(&distinct, &opts(LONG)).await.unwrap();
    assert!(
        matches!(&got2[..], [Claim::Acquired(a), Claim::Completed(_), Claim::Acquired(b)] if a.key() == &m1 && b.key() == &m2),
        "{got2:?}"
    );
    let got3 = ctx
        .store
        .claim_many(
            &[
                (m1.clone(), Some(fa)),
                (m2.clone(), None),
                (d.clone(), None),
            ],
            &opts(LONG),
        )
        .await
        .unwrap();
    assert!(
        matches!(
            &got3[..],
            [
                Claim::Mismatch { .. },
                Claim::InProgress { .. },
                Claim::InProgress { .. }
            ]
        ),
        "{got3:?}"
    );

    let stale = Lease::new(d.clone(), ld.token() + 1000, ld.expires_at(), 1);
    let done = [
        (l1.clone(), outcome("one")),
        (l2.clone(), outcome("two")),
        (stale, outcome("zombie")),
    ];
    let results = ctx.store.complete_many(&done, LONG).await.unwrap();
    assert!(
        matches!(results[..], [Ok(()), Ok(()), Err(Error::LeaseLost)]),
        "{results:?}"
    );
    assert_eq!(
        ctx.store.get(&n1).await.unwrap().unwrap().outcome(),
        Some(&outcome("one"))
    );
    assert_eq!(
        ctx.store.get(&n2).await.unwrap().unwrap().outcome(),
        Some(&outcome("two"))
    );
    assert!(matches!(
        ctx.store.get(&d).await.unwrap().unwrap().state,
        State::InProgress { .. }
    ));
    // completed by the batch: replayed by single claims
    assert!(matches!(claim(ctx, &n1, None).await, Claim::Completed(_)));
}

/// Outcomes of any size and content come back byte for byte.
pub async fn outcome_round_trip<S: Store>(ctx: &Ctx<S>) {
    let key = ctx.key("bytes");
    let lease = acquire(ctx, &key, UNIT).await;
    let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let o = Outcome::new(422, body)
        .with_meta("content-type", "application/json")
        .with_meta("set-cookie", vec![0u8, 1, 2, 255])
        .with_meta("set-cookie", "b=2");
    ctx.store.complete(&lease, &o, LONG).await.unwrap();
    let rec = record(ctx, &key, "stored").await;
    assert_eq!(rec.outcome(), Some(&o));
}

/// Rule 8, for bounded stores: at capacity a new key is refused, live keys are kept, and an
/// expired record makes room.
pub async fn capacity<S: Store>(ctx: &Ctx<S>, limit: usize) {
    for i in 0..limit {
        let lease = acquire(ctx, &ctx.key(&format!("cap-{i}")), UNIT).await;
        ctx.store
            .complete(&lease, &outcome("c"), UNIT)
            .await
            .unwrap();
    }
    let extra = ctx.key("cap-extra");
    let r = ctx.store.claim(&extra, None, &opts(UNIT)).await;
    assert!(
        matches!(r, Err(Error::Capacity { limit: l }) if l == limit),
        "got {r:?}"
    );
    for i in 0..limit {
        let key = ctx.key(&format!("cap-{i}"));
        assert!(
            matches!(claim(ctx, &key, None).await, Claim::Completed(_)),
            "a live key was evicted"
        );
    }
    ctx.advance(UNIT * 2).await;
    acquire(ctx, &extra, UNIT).await;
}

/// Stamps one `#[tokio::test]` per conformance case.
///
/// `$make` is an async expression evaluated per test that yields a
/// [`Ctx`](crate::conformance::Ctx); each test gets its own store, so tests run in parallel.
///
/// ```
/// use idemgate_core::{ManualClock, MemoryStore};
/// use idemgate_testkit::conformance::Ctx;
///
/// idemgate_testkit::conformance_tests!(async {
///     let clock = ManualClock::new();
///     Ctx::manual(MemoryStore::builder().with_clock(clock.clone()).build().unwrap(), clock)
/// });
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            claim_new_key, exclusive_claim_race, completed_is_replayed,
            completed_record_keeps_its_times, release_then_reclaim,
            expiry_frees_key, takeover_after_lease_expiry, fencing, fingerprint_mismatch,
            renew_extends_lease, abandoned_claim_stays_fenced, fencing_survives_purge,
            huge_durations_are_answered, purge_expired, outcome_round_trip,
            batched_forms_match_single_forms, forget_keeps_fencing);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some(ctx) = $crate::conformance::IntoCtx::into_ctx($make.await) else {
                    return;
                };
                $crate::conformance::$case(&ctx).await;
            }
        )*
    };
}

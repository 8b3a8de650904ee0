//! `CachedStore`: completed records kept in process, so replays of hot keys skip the round trip.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::{Clock, SystemClock};
use crate::error::Result;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::outcome::Outcome;
use crate::record::{Claim, ClaimOptions, Forgotten, Lease, Record, later};
use crate::store::Store;

/// A [`Store`] with a bounded in-process cache of *completed* records in front of it: a
/// duplicate of a hot key is answered from memory, without a round trip to the store.
///
/// - Only completed records are cached, as a claim of the inner store returned them (a
///   replay); in-progress records never are, so leases and fencing stay the store's.
/// - A cached record answers a claim exactly as the store would: `Completed` when the claim's
///   fingerprint matches the stored one (or either has none), `Mismatch` when it differs.
/// - A cached record is served until its `expires_at` or for the cache's TTL (default 30 s),
///   whichever comes first, by this process's clock. The TTL bounds how long a record another
///   process [`forget`](Store::forget)s here may still be replayed; a `forget` through this
///   store drops its entry at once.
/// - The cache is bounded by the bytes of the outcomes it holds (default 64 MiB; least
///   recently used goes first), and outcomes over a size (default 64 KiB) are not cached.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use idemgate_core::{CachedStore, Gate, Key, MemoryStore, Run};
///
/// let gate = Gate::new(CachedStore::new(MemoryStore::new()).with_ttl(Duration::from_secs(10)));
/// let key = Key::new("orders", "o-1")?;
/// assert_eq!(gate.run(&key, None, |_| async { Ok::<_, String>(7) }).await.unwrap(), Run::Fresh(7));
/// // the first replay reads the store and caches the record; later ones are served from memory
/// for _ in 0..3 {
///     assert_eq!(gate.run(&key, None, |_| async { Ok::<_, String>(8) }).await.unwrap(), Run::Replayed(7));
/// }
/// # Ok::<(), idemgate_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct CachedStore<S> {
    inner: S,
    cache: moka::sync::Cache<Key, Arc<Cached>>,
    ttl: Duration,
    max_outcome: usize,
    clock: Arc<dyn Clock>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for CachedStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStore")
            .field("inner", &self.inner)
            .field("entries", &self.cache.entry_count())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Cached {
    record: Record,
    until: SystemTime,
}

/// Default bound on the cached outcomes' bytes.
const DEFAULT_BYTES: u64 = 64 << 20;

impl<S: Store> CachedStore<S> {
    /// A cache of at most 64 MiB of outcomes, each served for at most 30 s, in front of `inner`.
    pub fn new(inner: S) -> Self {
        CachedStore {
            inner,
            cache: cache(DEFAULT_BYTES),
            ttl: Duration::from_secs(30),
            max_outcome: 64 << 10,
            clock: Arc::new(SystemClock),
        }
    }

    /// How long a record is served from the cache at most (it is never served past its own
    /// expiry).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The bound on the bytes of the cached outcomes (least recently used go first).
    pub fn with_max_bytes(mut self, bytes: u64) -> Self {
        self.cache = cache(bytes);
        self
    }

    /// Outcomes larger than this are not cached (default 64 KiB).
    pub fn with_max_outcome(mut self, bytes: usize) -> Self {
        self.max_outcome = bytes;
        self
    }

    /// The clock the cache judges expiry by (the inner store's, in tests on a manual clock).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The answer the cache has for a claim of `key`, if any.
    fn cached(&self, key: &Key, fp: Option<&Fingerprint>) -> Option<Claim> {
        let hit = self.cache.get(key)?;
        if hit.until <= self.clock.now() {
            self.cache.invalidate(key);
            return None;
        }
        crate::obs::cache(true);
        Some(match (hit.record.fingerprint, fp) {
            (Some(stored), Some(given)) if stored != *given => Claim::Mismatch { stored },
            _ => Claim::Completed(hit.record.clone()),
        })
    }

    /// Keeps a completed record the inner store answered with.
    fn keep(&self, claim: &Claim) {
        let Claim::Completed(record) = claim else {
            return;
        };
        if record
            .outcome()
            .is_none_or(|o| o.encoded_len() > self.max_outcome)
        {
            return;
        }
        let until = record.expires_at.min(later(self.clock.now(), self.ttl));
        self.cache.insert(
            record.key.clone(),
            Arc::new(Cached {
                record: record.clone(),
                until,
            }),
        );
    }
}

fn cache(bytes: u64) -> moka::sync::Cache<Key, Arc<Cached>> {
    moka::sync::Cache::builder()
        .max_capacity(bytes)
        .weigher(|k: &Key, v: &Arc<Cached>| {
            let size =
                k.scope().len() + k.id().len() + v.record.outcome().map_or(0, Outcome::encoded_len);
            u32::try_from(size + 128).unwrap_or(u32::MAX)
        })
        .build()
}

impl<S: Store> Store for CachedStore<S> {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        if let Some(hit) = self.cached(key, fp) {
            return Ok(hit);
        }
        crate::obs::cache(false);
        let claim = self.inner.claim(key, fp, opts).await?;
        self.keep(&claim);
        Ok(claim)
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        self.inner.complete(lease, outcome, retention).await
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        self.inner.release(lease).await
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        self.inner.renew(lease, extend).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        self.inner.get(key).await
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        self.inner.purge_expired(limit).await
    }

    async fn forget(&self, key: &Key, force: bool) -> Result<Forgotten> {
        self.cache.invalidate(key);
        let forgotten = self.inner.forget(key, force).await;
        // a replay that raced the forget may have cached the old record again
        self.cache.invalidate(key);
        forgotten
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        let mut out: Vec<Option<Claim>> = claims
            .iter()
            .map(|(k, fp)| self.cached(k, fp.as_ref()))
            .collect();
        let missed: Vec<(Key, Option<Fingerprint>)> = claims
            .iter()
            .zip(&out)
            .filter(|(_, hit)| hit.is_none())
            .map(|(c, _)| c.clone())
            .collect();
        if missed.is_empty() {
            return Ok(out.into_iter().flatten().collect());
        }
        let mut answers = self.inner.claim_many(&missed, opts).await?.into_iter();
        for slot in out.iter_mut().filter(|s| s.is_none()) {
            crate::obs::cache(false);
            let claim = answers.next().ok_or_else(|| crate::Error::Corrupt {
                backend: "cache",
                reason: "the store answered fewer claims than it was asked".into(),
            })?;
            self.keep(&claim);
            *slot = Some(claim);
        }
        Ok(out.into_iter().flatten().collect())
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        self.inner.complete_many(done, retention).await
    }
}

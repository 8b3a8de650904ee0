//! The in-process store.

use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::outcome::Outcome;
use crate::record::{Claim, ClaimOptions, Forgotten, Lease, Record, State, first_token, later};
use crate::store::Store;

/// An in-process [`Store`]: sharded maps behind short locks.
///
/// For tests, single-process services and as a reference. Bounded by default, so that callers
/// who choose their own keys (HTTP clients sending fresh `Idempotency-Key`s) cannot grow it
/// without limit: at most [`DEFAULT_RECORDS`](Self::DEFAULT_RECORDS) records and
/// [`DEFAULT_OUTCOME_BYTES`](Self::DEFAULT_OUTCOME_BYTES) of stored outcomes. At a bound it
/// first drops records whose `expires_at` has passed; if it is still full it refuses the new key
/// (or the outcome) with [`Error::Capacity`]. It never forgets a live key. An outcome refused
/// for its size leaves the key in progress, and an empty outcome always fits.
///
/// ```
/// use std::time::Duration;
/// use idemgate_core::{Claim, Key, MemoryStore, Outcome, Store, StoreExt};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let key = Key::new("emails", "user-7:welcome")?;
/// let Claim::Acquired(lease) = store.claim_for(&key, Duration::from_secs(30)).await? else {
///     unreachable!("a new key is free")
/// };
/// store.complete(&lease, &Outcome::new(0, "sent"), Duration::from_secs(3600)).await?;
/// assert!(matches!(store.claim_for(&key, Duration::from_secs(30)).await?, Claim::Completed(_)));
/// # Ok::<(), idemgate_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    // records keyed by their own `key`: one hash per operation picks the shard and the slot
    shards: Box<[Shard]>,
    hasher: RandomState,
    // the records held, counted only in a bounded store: an unbounded one adds up its shards
    // when asked, so a fresh claim writes no counter that every thread shares
    len: AtomicUsize,
    capacity: Option<usize>,
    // the bytes of stored outcomes (`Outcome::encoded_len`), counted only when bounded
    bytes: AtomicUsize,
    max_bytes: Option<usize>,
    clock: Arc<dyn Clock>,
}

/// One shard's lock and table, alone on its cache lines: two threads locking neighbouring
/// shards do not take each other's lines away.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    map: Mutex<HashTable<Record>>,
    // the largest token of a record this shard dropped (written under `map`'s lock): a key
    // that starts afresh here takes a larger one, so fencing holds across purges exactly
    gone: AtomicU64,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, HashTable<Record>> {
        // A poisoned lock only means another thread panicked while holding it; every update
        // is a single assignment, so the map is consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the records `doomed` picks, remembering the largest token dropped; answers how
    /// many it dropped and their outcomes' bytes. Call with the shard's lock held (`map`).
    fn drop_where(
        &self,
        map: &mut HashTable<Record>,
        mut doomed: impl FnMut(&Record) -> bool,
    ) -> (usize, usize) {
        let (before, mut high, mut bytes) = (map.len(), self.gone.load(Ordering::Relaxed), 0);
        map.retain(|r| {
            let drop = doomed(r);
            if drop {
                high = high.max(r.token());
                bytes += weight(r);
            }
            !drop
        });
        self.gone.store(high, Ordering::Relaxed);
        (before - map.len(), bytes)
    }
}

/// The outcome bytes a record holds.
fn weight(r: &Record) -> usize {
    r.outcome().map_or(0, Outcome::encoded_len)
}

/// Outcomes this small always fit a byte-bounded store (a marker that a response was not
/// stored, a serialized unit value).
const ALWAYS_FITS: usize = 256;

/// Builds a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryStoreBuilder {
    shards: usize,
    capacity: Option<usize>,
    max_bytes: Option<usize>,
    clock: Arc<dyn Clock>,
}

impl MemoryStoreBuilder {
    /// Bounds the number of records (default [`MemoryStore::DEFAULT_RECORDS`]).
    pub fn with_capacity(mut self, records: usize) -> Self {
        self.capacity = Some(records);
        self
    }

    /// Bounds the bytes of stored outcomes (default [`MemoryStore::DEFAULT_OUTCOME_BYTES`]).
    pub fn with_max_outcome_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// No bound on records or bytes: only for keys the caller controls (benchmarks, a
    /// consumer whose keys are its broker's event ids and whose purge keeps up).
    pub fn with_unbounded(mut self) -> Self {
        self.capacity = None;
        self.max_bytes = None;
        self
    }

    /// The number of independently locked shards (default: 64).
    pub fn with_shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// The clock that judges expiry (default: [`SystemClock`]).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Builds the store.
    pub fn build(self) -> Result<MemoryStore> {
        if self.shards == 0 {
            return Err(Error::Config {
                message: "a memory store needs at least one shard".into(),
            });
        }
        Ok(MemoryStore {
            shards: (0..self.shards).map(|_| Shard::default()).collect(),
            hasher: RandomState::default(),
            len: AtomicUsize::new(0),
            capacity: self.capacity,
            bytes: AtomicUsize::new(0),
            max_bytes: self.max_bytes,
            clock: self.clock,
        })
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn fp_conflict(stored: Option<&Fingerprint>, given: Option<&Fingerprint>) -> Option<Fingerprint> {
    match (stored, given) {
        (Some(s), Some(g)) if s != g => Some(*s),
        _ => None,
    }
}

fn lease_error<T>() -> Result<T> {
    Err(Error::LeaseLost)
}

impl MemoryStore {
    /// The default bound on records: about 200 MB of small records.
    pub const DEFAULT_RECORDS: usize = 1_000_000;

    /// The default bound on the bytes of stored outcomes (responses, serialized results).
    pub const DEFAULT_OUTCOME_BYTES: usize = 256 << 20;

    /// A store on the system clock with the default bounds.
    pub fn new() -> Self {
        Self::builder().build().expect("default builder is valid")
    }

    /// A store with no bound (see [`MemoryStoreBuilder::with_unbounded`]).
    pub fn unbounded() -> Self {
        Self::builder()
            .with_unbounded()
            .build()
            .expect("default builder is valid")
    }

    /// A builder for bounds, shards and clock.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            shards: 64,
            capacity: Some(Self::DEFAULT_RECORDS),
            max_bytes: Some(Self::DEFAULT_OUTCOME_BYTES),
            clock: Arc::new(SystemClock),
        }
    }

    /// The bytes of stored outcomes a bounded store holds.
    pub fn outcome_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Counts `add` outcome bytes in and `sub` out (only a byte-bounded store counts).
    fn weigh(&self, add: usize, sub: usize) {
        if self.max_bytes.is_some() {
            if add > 0 {
                self.bytes.fetch_add(add, Ordering::Relaxed);
            }
            if sub > 0 {
                self.bytes.fetch_sub(sub, Ordering::Relaxed);
            }
        }
    }

    /// Whether `n` more outcome bytes fit, after dropping expired records if they do not.
    fn room_for(&self, n: usize, now: SystemTime) -> bool {
        let Some(max) = self.max_bytes else {
            return true;
        };
        let fits = || n == 0 || self.bytes.load(Ordering::Relaxed).saturating_add(n) <= max;
        fits() || {
            self.sweep(now);
            fits()
        }
    }

    /// The number of records held, expired or not.
    pub fn len(&self) -> usize {
        match self.capacity {
            Some(_) => self.len.load(Ordering::Relaxed),
            None => self.shards.iter().map(|s| s.lock().len()).sum(),
        }
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn hash(&self, key: &Key) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard holding `key`, locked, and the key's hash.
    fn shard(&self, key: &Key) -> (MutexGuard<'_, HashTable<Record>>, u64) {
        let (shard, hash) = self.shard_of(key);
        (shard.lock(), hash)
    }

    /// The shard holding `key`, and the key's hash.
    fn shard_of(&self, key: &Key) -> (&Shard, u64) {
        let hash = self.hash(key);
        // bits the table uses for neither its index (low) nor its tags (top 7);
        // `shards.len()` is never 0 (the builder refuses it), so the index is in range
        let i = usize::try_from((hash >> 32) % self.shards.len() as u64).unwrap_or(0);
        (&self.shards[i], hash)
    }

    /// Counts `n` records dropped (only a bounded store counts).
    fn dropped(&self, n: usize) {
        if self.capacity.is_some() {
            self.len.fetch_sub(n, Ordering::Relaxed);
        }
    }

    fn drop_expired(&self, shard: &Shard, map: &mut HashTable<Record>, now: SystemTime) {
        let (n, bytes) = shard.drop_where(map, |r| r.expires_at <= now);
        self.dropped(n);
        self.weigh(0, bytes);
    }

    /// Takes one slot of the capacity; `false` when the store is full.
    fn reserve(&self) -> bool {
        match self.capacity {
            None => true,
            Some(limit) => self
                .len
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    /// Drops expired records from every shard, one lock at a time.
    fn sweep(&self, now: SystemTime) {
        for shard in self.shards.iter() {
            self.drop_expired(shard, &mut shard.lock(), now);
        }
    }

    fn claim_sync(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        let now = self.clock.now();
        let lease_until = later(now, opts.lease);
        let mut swept = false;
        loop {
            let (shard, hash) = self.shard_of(key);
            let mut map = shard.lock();
            let vacant = match map.entry(hash, |r| r.key == *key, |r| self.hash(&r.key)) {
                Entry::Occupied(mut r) => {
                    let r = r.get_mut();
                    let before = weight(r);
                    let claim = Self::claim_existing(r, key, fp, opts, now);
                    self.weigh(weight(r), before);
                    return Ok(claim);
                }
                Entry::Vacant(v) => v,
            };
            if !self.reserve() {
                drop(map);
                if swept {
                    // full of live records: refuse rather than forget one
                    return Err(Error::Capacity {
                        limit: self.capacity.unwrap_or(usize::MAX),
                    });
                }
                // expired records in any shard make room; nothing live is touched
                self.sweep(now);
                swept = true;
                continue;
            }
            // above every token a dropped record of this shard held (rule 9)
            let token = first_token(now).max(shard.gone.load(Ordering::Relaxed) + 1);
            vacant.insert(Record {
                key: key.clone(),
                fingerprint: fp.copied(),
                state: State::InProgress { token, lease_until },
                created_at: now,
                expires_at: later(lease_until, opts.retention),
                attempts: 1,
            });
            return Ok(Claim::Acquired(Lease::new(
                key.clone(),
                token,
                lease_until,
                1,
            )));
        }
    }

    fn claim_existing(
        r: &mut Record,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
        now: SystemTime,
    ) -> Claim {
        let lease_until = later(now, opts.lease);
        let (token, attempts) = if r.expires_at <= now {
            // expired: a fresh record, but the token keeps counting up
            r.created_at = now;
            r.fingerprint = fp.copied();
            (r.token() + 1, 1)
        } else {
            if let Some(stored) = fp_conflict(r.fingerprint.as_ref(), fp) {
                return Claim::Mismatch { stored };
            }
            match r.state {
                State::Completed { .. } => return Claim::Completed(r.clone()),
                State::InProgress {
                    lease_until: held, ..
                } if held > now => {
                    return Claim::InProgress {
                        lease_until: held,
                        attempts: r.attempts,
                    };
                }
                State::InProgress { token, .. } => {
                    if r.fingerprint.is_none() {
                        r.fingerprint = fp.copied();
                    }
                    (token + 1, r.attempts.saturating_add(1))
                }
            }
        };
        r.state = State::InProgress { token, lease_until };
        r.expires_at = later(lease_until, opts.retention);
        r.attempts = attempts;
        Claim::Acquired(Lease::new(key.clone(), token, lease_until, attempts))
    }

    fn complete_sync(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        let size = outcome.encoded_len();
        if size > ALWAYS_FITS && !self.room_for(size, self.clock.now()) {
            return Err(Error::Capacity {
                limit: self.max_bytes.unwrap_or(usize::MAX),
            });
        }
        self.with_lease(lease, |r, now, _| {
            r.state = State::Completed {
                token: lease.token(),
                outcome: outcome.clone(),
                completed_at: now,
            };
            r.expires_at = later(now, retention);
        })?;
        self.weigh(size, 0);
        Ok(())
    }

    /// Runs `f` on the record held by `lease`, or fails with `LeaseLost`.
    fn with_lease<T>(
        &self,
        lease: &Lease,
        f: impl FnOnce(&mut Record, SystemTime, SystemTime) -> T,
    ) -> Result<T> {
        let now = self.clock.now();
        let (mut map, hash) = self.shard(lease.key());
        match map.find_mut(hash, |r| r.key == *lease.key()) {
            Some(r) => match r.state {
                State::InProgress { token, lease_until } if token == lease.token() => {
                    Ok(f(r, now, lease_until))
                }
                _ => lease_error(),
            },
            None => lease_error(),
        }
    }
}

impl Store for MemoryStore {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        self.claim_sync(key, fp, opts)
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        self.complete_sync(lease, outcome, retention)
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        self.with_lease(&lease, |r, now, lease_until| {
            // the attempt failed: the key is unused, and its next claim may carry another request
            r.fingerprint = None;
            if lease_until > now {
                r.state = State::InProgress {
                    token: lease.token(),
                    lease_until: now,
                };
            }
        })
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        self.with_lease(lease, |r, now, lease_until| {
            let tail = r.expires_at.duration_since(lease_until).unwrap_or_default();
            let until = later(now, extend);
            r.state = State::InProgress {
                token: lease.token(),
                lease_until: until,
            };
            r.expires_at = r.expires_at.max(later(until, tail));
            Lease::new(lease.key().clone(), lease.token(), until, lease.attempt())
        })
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        let now = self.clock.now();
        let (map, hash) = self.shard(key);
        Ok(map
            .find(hash, |r| r.key == *key)
            .filter(|r| r.expires_at > now)
            .cloned())
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        let now = self.clock.now();
        let mut purged = 0usize;
        for shard in self.shards.iter() {
            if purged >= limit {
                break;
            }
            let mut map = shard.lock();
            let (n, bytes) = shard.drop_where(&mut map, |r| {
                let doomed = r.expires_at <= now && purged < limit;
                purged += usize::from(doomed);
                doomed
            });
            self.dropped(n);
            self.weigh(0, bytes);
        }
        Ok(purged as u64)
    }

    async fn forget(&self, key: &Key, force: bool) -> Result<Forgotten> {
        let now = self.clock.now();
        let (mut map, hash) = self.shard(key);
        let Some(r) = map.find_mut(hash, |r| r.key == *key) else {
            return Ok(Forgotten::Absent);
        };
        let (token, lease_until) = match r.state {
            _ if r.expires_at <= now => return Ok(Forgotten::Absent),
            State::InProgress { lease_until, .. } if lease_until > now && !force => {
                return Ok(Forgotten::Held { lease_until });
            }
            State::InProgress { token, lease_until } => (token + 1, lease_until.min(now)),
            State::Completed { token, .. } => (token + 1, now),
        };
        let bytes = weight(r);
        let completed = r.outcome().is_some();
        r.state = State::InProgress { token, lease_until };
        r.fingerprint = None;
        drop(map);
        self.weigh(0, bytes);
        Ok(if completed {
            Forgotten::Removed { token }
        } else {
            Forgotten::Tombstoned { token }
        })
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        claims
            .iter()
            .map(|(k, fp)| self.claim_sync(k, fp.as_ref(), opts))
            .collect()
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        Ok(done
            .iter()
            .map(|(l, o)| self.complete_sync(l, o, retention))
            .collect())
    }
}

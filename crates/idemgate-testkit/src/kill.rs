//! Kill points: wrappers that call a hook where a process can die in a delivery's life, so a
//! test harness can stop a worker there (park it for a SIGKILL, freeze it as a zombie) and
//! check that no effect is lost or applied twice.
//!
//! [`Watched`] wraps a [`Source`] (every receive, `before-ack`, every dead letter),
//! [`HookedStore`] a [`Store`] (`after-complete`), [`HookedInbox`] an [`Inbox`]
//! (`after-complete`, after its commit). The points a handler reaches itself (`after-claim`,
//! `after-effect`) it reports to the same [`KillPoints`].
//!
//! ```
//! use std::sync::Mutex;
//! use idemgate_testkit::kill::{KillPoint, KillPoints};
//!
//! #[derive(Default)]
//! struct Log(Mutex<Vec<(KillPoint, String)>>);
//!
//! impl KillPoints for Log {
//!     fn reach(&self, point: KillPoint, id: &str) {
//!         self.0.lock().unwrap().push((point, id.to_owned()));
//!     }
//! }
//!
//! let log = Log::default();
//! log.reach(KillPoint::AfterClaim, "evt-1");
//! assert_eq!("after-claim".parse::<KillPoint>(), Ok(KillPoint::AfterClaim));
//! assert_eq!(log.0.lock().unwrap()[0].0.name(), "after-claim");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use idemgate_consumer::{Delivery, Horizon, Message, Source};
use idemgate_core::{
    Claim, ClaimOptions, Fingerprint, Inbox, Key, Lease, Outcome, Position, Record, Result, Store,
};
use tokio::sync::{RwLock, RwLockReadGuard};

/// Where in a delivery's life a process can be killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KillPoint {
    /// The key is claimed (or the inbox row written), the effect not yet applied.
    AfterClaim,
    /// The effect is applied; in Gate mode it is committed, but `complete` has not run.
    AfterEffect,
    /// The completion (or the inbox transaction) is committed; not acknowledged.
    AfterComplete,
    /// Just before the acknowledgement.
    BeforeAck,
}

impl KillPoint {
    /// Every point, in a delivery's order.
    pub const ALL: [KillPoint; 4] = [
        KillPoint::AfterClaim,
        KillPoint::AfterEffect,
        KillPoint::AfterComplete,
        KillPoint::BeforeAck,
    ];

    /// The point's name: `after-claim`, `after-effect`, `after-complete`, `before-ack`.
    pub fn name(self) -> &'static str {
        match self {
            KillPoint::AfterClaim => "after-claim",
            KillPoint::AfterEffect => "after-effect",
            KillPoint::AfterComplete => "after-complete",
            KillPoint::BeforeAck => "before-ack",
        }
    }
}

impl fmt::Display for KillPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`KillPoint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kill point {0:?} (after-claim, after-effect, after-complete, before-ack)")]
pub struct UnknownKillPoint(pub String);

impl FromStr for KillPoint {
    type Err = UnknownKillPoint;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        KillPoint::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownKillPoint(s.to_owned()))
    }
}

/// What the wrappers call. Only [`reach`](KillPoints::reach) is required.
pub trait KillPoints: Send + Sync + 'static {
    /// A delivery of the event `id` reached `point` (it may never return: a parked process).
    fn reach(&self, point: KillPoint, id: &str);

    /// A delivery was received (before any point).
    fn received(&self, msg: &Message) {
        let _ = msg;
    }

    /// The event `id` was dead-lettered.
    fn dead_lettered(&self, id: &str) {
        let _ = id;
    }

    /// A lock every store and inbox operation holds shared while it runs, so a harness that
    /// takes it exclusively can freeze the process between operations (holding a lease, but no
    /// transaction or database lock). `None`: no such lock.
    fn io(&self) -> Option<&RwLock<()>> {
        None
    }
}

/// The event id of `msg`, or `-`.
pub fn id_of(msg: &Message) -> &str {
    msg.event_id.as_deref().unwrap_or("-")
}

async fn io<K: KillPoints>(hooks: &K) -> Option<RwLockReadGuard<'_, ()>> {
    match hooks.io() {
        Some(lock) => Some(lock.read().await),
        None => None,
    }
}

/// A [`Source`] whose deliveries report their receive, `before-ack` and dead letters.
#[derive(Debug)]
pub struct Watched<S, K> {
    inner: S,
    hooks: Arc<K>,
}

impl<S, K> Watched<S, K> {
    /// Wraps `inner`.
    pub fn new(inner: S, hooks: Arc<K>) -> Self {
        Watched { inner, hooks }
    }
}

impl<S: Source, K: KillPoints> Source for Watched<S, K> {
    type Delivery = WatchedDelivery<S::Delivery, K>;

    async fn recv(&mut self) -> idemgate_consumer::Result<Option<Self::Delivery>> {
        let Some(d) = self.inner.recv().await? else {
            return Ok(None);
        };
        self.hooks.received(d.message());
        Ok(Some(WatchedDelivery {
            inner: d,
            hooks: Arc::clone(&self.hooks),
        }))
    }

    fn horizon(&self) -> Option<Horizon> {
        self.inner.horizon()
    }

    fn ack_wait(&self) -> Option<Duration> {
        self.inner.ack_wait()
    }

    fn delivery_limit(&self) -> Option<u32> {
        self.inner.delivery_limit()
    }
}

/// A delivery of a [`Watched`] source.
#[derive(Debug)]
pub struct WatchedDelivery<D, K> {
    inner: D,
    hooks: Arc<K>,
}

impl<D: Delivery, K: KillPoints> Delivery for WatchedDelivery<D, K> {
    fn message(&self) -> &Message {
        self.inner.message()
    }

    async fn ack(self) -> idemgate_consumer::Result<()> {
        self.hooks
            .reach(KillPoint::BeforeAck, id_of(self.inner.message()));
        self.inner.ack().await
    }

    async fn nack(self, delay: Duration) -> idemgate_consumer::Result<()> {
        self.inner.nack(delay).await
    }

    async fn dead_letter(self, reason: &str) -> idemgate_consumer::Result<()> {
        let id = id_of(self.inner.message()).to_owned();
        self.inner.dead_letter(reason).await?;
        self.hooks.dead_lettered(&id);
        Ok(())
    }

    async fn in_progress(&self) -> idemgate_consumer::Result<()> {
        self.inner.in_progress().await
    }

    async fn reposition(self) -> idemgate_consumer::Result<()> {
        self.inner.reposition().await
    }
}

/// A [`Store`] that reports `after-complete` once a completion is stored.
#[derive(Debug)]
pub struct HookedStore<S, K> {
    inner: S,
    hooks: Arc<K>,
}

impl<S, K> HookedStore<S, K> {
    /// Wraps `inner`.
    pub fn new(inner: S, hooks: Arc<K>) -> Self {
        HookedStore { inner, hooks }
    }
}

impl<S: Store, K: KillPoints + fmt::Debug> Store for HookedStore<S, K> {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        let _io = io(&*self.hooks).await;
        self.inner.claim(key, fp, opts).await
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        let io = io(&*self.hooks).await;
        self.inner.complete(lease, outcome, retention).await?;
        drop(io);
        self.hooks.reach(KillPoint::AfterComplete, lease.key().id());
        Ok(())
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        let _io = io(&*self.hooks).await;
        self.inner.release(lease).await
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        let _io = io(&*self.hooks).await;
        self.inner.renew(lease, extend).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        let _io = io(&*self.hooks).await;
        self.inner.get(key).await
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        let _io = io(&*self.hooks).await;
        self.inner.purge_expired(limit).await
    }

    async fn forget(&self, key: &Key, force: bool) -> Result<idemgate_core::Forgotten> {
        let _io = io(&*self.hooks).await;
        self.inner.forget(key, force).await
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        let _io = io(&*self.hooks).await;
        self.inner.claim_many(claims, opts).await
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        let io = io(&*self.hooks).await;
        let results = self.inner.complete_many(done, retention).await?;
        drop(io);
        if let Some(((lease, _), _)) = done.iter().zip(&results).find(|(_, r)| r.is_ok()) {
            self.hooks.reach(KillPoint::AfterComplete, lease.key().id());
        }
        Ok(results)
    }
}

/// An [`Inbox`] that reports `after-complete` once its transaction committed.
#[derive(Debug)]
pub struct HookedInbox<I, K> {
    inner: I,
    hooks: Arc<K>,
}

impl<I, K> HookedInbox<I, K> {
    /// Wraps `inner`.
    pub fn new(inner: I, hooks: Arc<K>) -> Self {
        HookedInbox { inner, hooks }
    }
}

impl<I: Inbox, K: KillPoints> Inbox for HookedInbox<I, K> {
    type Tx = I::Tx;

    async fn begin(&self) -> Result<I::Tx> {
        self.inner.begin().await
    }

    async fn first_time(&self, tx: &mut I::Tx, key: &Key) -> Result<bool> {
        self.inner.first_time(tx, key).await
    }

    async fn first_time_many(&self, tx: &mut I::Tx, keys: &[Key]) -> Result<Vec<bool>> {
        self.inner.first_time_many(tx, keys).await
    }

    async fn savepoint(&self, tx: &mut I::Tx, n: u32) -> Result<bool> {
        self.inner.savepoint(tx, n).await
    }

    async fn rollback_to(&self, tx: &mut I::Tx, n: u32) -> Result<()> {
        self.inner.rollback_to(tx, n).await
    }

    async fn forget(&self, tx: &mut I::Tx, key: &Key) -> Result<()> {
        self.inner.forget(tx, key).await
    }

    async fn commit(&self, tx: I::Tx) -> Result<()> {
        self.inner.commit(tx).await?;
        self.hooks.reach(KillPoint::AfterComplete, "-");
        Ok(())
    }

    fn retention(&self) -> Duration {
        self.inner.retention()
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        self.inner.purge_expired(limit).await
    }

    async fn advance(&self, tx: &mut I::Tx, position: &Position) -> Result<()> {
        self.inner.advance(tx, position).await
    }

    async fn load_positions(&self, group: &str, topic: &str) -> Result<BTreeMap<i32, i64>> {
        self.inner.load_positions(group, topic).await
    }
}

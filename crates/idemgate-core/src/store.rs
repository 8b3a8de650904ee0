//! The `Store` contract, its extension trait and the type-erased `BoxStore`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::outcome::Outcome;
use crate::record::{Claim, ClaimOptions, Forgotten, Lease, Record};

/// A deduplication store: atomic check-and-claim, completion with a stored outcome, leases with
/// fencing tokens, and retention.
///
/// # Contract
/// Every backend obeys these rules; `idemgate-testkit`'s conformance suite checks each one.
/// 1. `claim` is one atomic operation on the backend (one statement, one script, one locked map
///    entry). Never read-then-write.
/// 2. Of N concurrent claims of a free key exactly one gets [`Claim::Acquired`].
/// 3. An expired lease may be taken over; the new lease has a larger token. `complete`,
///    `release` and `renew` with a token that is no longer current fail with
///    [`Error::LeaseLost`](crate::Error::LeaseLost) and change nothing (fencing).
/// 4. A completed record is returned to every claim until its `expires_at`; after that the key is
///    free.
/// 5. Expiry is judged from stored timestamps against the backend's clock, not from lazy
///    deletion. A backend without a clock its operations can read (SQLite, DynamoDB) uses the
///    host's [`Clock`](crate::Clock); hosts whose clocks differ by a skew see a lease end that
///    much early or late, so leases must be well above the skew. Fencing never depends on it.
/// 6. Duplicate, in-progress and mismatch are [`Claim`] values, never errors.
/// 7. The batched forms [`claim_many`](Store::claim_many) and
///    [`complete_many`](Store::complete_many) answer exactly as the single forms would, in
///    order, in one round trip where the backend can.
/// 8. Nothing is evicted before `expires_at`; a bounded store refuses new keys with
///    [`Error::Capacity`](crate::Error::Capacity).
/// 9. A record of an abandoned or released claim is kept until its lease plus the claim's
///    [`retention`](ClaimOptions::retention) has passed, so a stale lease holder stays fenced
///    and tokens keep growing; a key whose record expired starts a new record whose token still
///    continues from the old one.
/// 10. [`forget`](Store::forget) refuses a live lease unless forced; otherwise it turns the
///     record (completed or in progress) into a tombstone whose token is past every lease handed
///     out: the key is free again and every earlier lease holder stays fenced.
///
/// # Clone
/// Stores are shared: wrap one in an `Arc` (`Arc<S>` is a `Store` too) or erase it with
/// [`StoreExt::boxed`]. Backends that own a connection pool are cheap to clone themselves.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Atomically claims `key`: acquires it if free, or reports why not.
    fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> impl Future<Output = Result<Claim>> + Send;

    /// Stores `outcome` for the key held by `lease`, to be replayed for `retention`.
    fn complete(
        &self,
        lease: &Lease,
        outcome: &Outcome,
        retention: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Gives the key up without an outcome, so that the next claim runs the handler again.
    fn release(&self, lease: Lease) -> impl Future<Output = Result<()>> + Send;

    /// Extends a held lease to `extend` from now; returns the lease with its new expiry.
    fn renew(&self, lease: &Lease, extend: Duration) -> impl Future<Output = Result<Lease>> + Send;

    /// The live record of `key`, if any (expired records are not returned).
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Record>>> + Send;

    /// Deletes at most `limit` expired records; returns how many were deleted.
    fn purge_expired(&self, limit: usize) -> impl Future<Output = Result<u64>> + Send;

    /// Makes `key` free again, for an operator: a completed record, or an in-progress one whose
    /// lease ran out (with `force`, also a live one), becomes a tombstone that keeps fencing its
    /// lease holders (see [`Forgotten`]); a live lease without `force` is left alone
    /// ([`Forgotten::Held`]). Atomic against concurrent claims, like `claim`.
    fn forget(&self, key: &Key, force: bool) -> impl Future<Output = Result<Forgotten>> + Send;

    /// Claims several keys in one round trip where the backend allows; the answers are those
    /// the single `claim`s would give, in order (a key repeated in the batch is acquired at most
    /// once). `Err` only when the backend fails.
    fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> impl Future<Output = Result<Vec<Claim>>> + Send;

    /// Completes several leases in one round trip where the backend allows; one result per
    /// lease, in order (`Err(LeaseLost)` for a stale one). The outer `Err` is a backend failure.
    fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> impl Future<Output = Result<Vec<Result<()>>>> + Send;
}

impl<S: Store + ?Sized> Store for Arc<S>
where
    Arc<S>: fmt::Debug,
{
    fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> impl Future<Output = Result<Claim>> + Send {
        (**self).claim(key, fp, opts)
    }

    fn complete(
        &self,
        lease: &Lease,
        outcome: &Outcome,
        retention: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        (**self).complete(lease, outcome, retention)
    }

    fn release(&self, lease: Lease) -> impl Future<Output = Result<()>> + Send {
        (**self).release(lease)
    }

    fn renew(&self, lease: &Lease, extend: Duration) -> impl Future<Output = Result<Lease>> + Send {
        (**self).renew(lease, extend)
    }

    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Record>>> + Send {
        (**self).get(key)
    }

    fn purge_expired(&self, limit: usize) -> impl Future<Output = Result<u64>> + Send {
        (**self).purge_expired(limit)
    }

    fn forget(&self, key: &Key, force: bool) -> impl Future<Output = Result<Forgotten>> + Send {
        (**self).forget(key, force)
    }

    fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> impl Future<Output = Result<Vec<Claim>>> + Send {
        (**self).claim_many(claims, opts)
    }

    fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> impl Future<Output = Result<Vec<Result<()>>>> + Send {
        (**self).complete_many(done, retention)
    }
}

/// Conveniences over any [`Store`].
pub trait StoreExt: Store {
    /// Claims with the default options and this lease.
    fn claim_for(&self, key: &Key, lease: Duration) -> impl Future<Output = Result<Claim>> + Send {
        async move {
            self.claim(key, None, &ClaimOptions::with_lease(lease))
                .await
        }
    }

    /// Erases the store's type, for a store chosen at run time.
    fn boxed(self) -> BoxStore
    where
        Self: Sized,
    {
        BoxStore(Arc::new(self))
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// The object-safe mirror of [`Store`], with boxed futures.
trait DynStore: Send + Sync + fmt::Debug + 'static {
    fn claim<'a>(
        &'a self,
        key: &'a Key,
        fp: Option<&'a Fingerprint>,
        opts: &'a ClaimOptions,
    ) -> BoxFuture<'a, Claim>;
    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: &'a Outcome,
        retention: Duration,
    ) -> BoxFuture<'a, ()>;
    fn release(&self, lease: Lease) -> BoxFuture<'_, ()>;
    fn renew<'a>(&'a self, lease: &'a Lease, extend: Duration) -> BoxFuture<'a, Lease>;
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Option<Record>>;
    fn purge_expired(&self, limit: usize) -> BoxFuture<'_, u64>;
    fn forget<'a>(&'a self, key: &'a Key, force: bool) -> BoxFuture<'a, Forgotten>;
    fn claim_many<'a>(
        &'a self,
        claims: &'a [(Key, Option<Fingerprint>)],
        opts: &'a ClaimOptions,
    ) -> BoxFuture<'a, Vec<Claim>>;
    fn complete_many<'a>(
        &'a self,
        done: &'a [(Lease, Outcome)],
        retention: Duration,
    ) -> BoxFuture<'a, Vec<Result<()>>>;
}

impl<S: Store> DynStore for S {
    fn claim<'a>(
        &'a self,
        key: &'a Key,
        fp: Option<&'a Fingerprint>,
        opts: &'a ClaimOptions,
    ) -> BoxFuture<'a, Claim> {
        Box::pin(Store::claim(self, key, fp, opts))
    }
    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: &'a Outcome,
        retention: Duration,
    ) -> BoxFuture<'a, ()> {
        Box::pin(Store::complete(self, lease, outcome, retention))
    }
    fn release(&self, lease: Lease) -> BoxFuture<'_, ()> {
        Box::pin(Store::release(self, lease))
    }
    fn renew<'a>(&'a self, lease: &'a Lease, extend: Duration) -> BoxFuture<'a, Lease> {
        Box::pin(Store::renew(self, lease, extend))
    }
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Option<Record>> {
        Box::pin(Store::get(self, key))
    }
    fn purge_expired(&self, limit: usize) -> BoxFuture<'_, u64> {
        Box::pin(Store::purge_expired(self, limit))
    }
    fn forget<'a>(&'a self, key: &'a Key, force: bool) -> BoxFuture<'a, Forgotten> {
        Box::pin(Store::forget(self, key, force))
    }
    fn claim_many<'a>(
        &'a self,
        claims: &'a [(Key, Option<Fingerprint>)],
        opts: &'a ClaimOptions,
    ) -> BoxFuture<'a, Vec<Claim>> {
        Box::pin(Store::claim_many(self, claims, opts))
    }
    fn complete_many<'a>(
        &'a self,
        done: &'a [(Lease, Outcome)],
        retention: Duration,
    ) -> BoxFuture<'a, Vec<Result<()>>> {
        Box::pin(Store::complete_many(self, done, retention))
    }
}

/// A [`Store`] whose backend is chosen at run time (a CLI flag, a URL).
///
/// Cheap to clone: clones share the same backend.
///
/// ```
/// use idemgate_core::{BoxStore, MemoryStore, StoreExt};
///
/// let store: BoxStore = MemoryStore::new().boxed();
/// let _shared = store.clone();
/// ```
#[derive(Clone)]
pub struct BoxStore(Arc<dyn DynStore>);

impl fmt::Debug for BoxStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BoxStore").field(&self.0).finish()
    }
}

impl Store for BoxStore {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        self.0.claim(key, fp, opts).await
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        self.0.complete(lease, outcome, retention).await
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        self.0.release(lease).await
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        self.0.renew(lease, extend).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        self.0.get(key).await
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        self.0.purge_expired(limit).await
    }

    async fn forget(&self, key: &Key, force: bool) -> Result<Forgotten> {
        self.0.forget(key, force).await
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        self.0.claim_many(claims, opts).await
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        self.0.complete_many(done, retention).await
    }
}

//! A store wrapper that injects failures and latency on chosen calls.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use idemgate_core::{
    Claim, ClaimOptions, Error, Fingerprint, Key, Lease, Outcome, Record, Result, Store,
};

/// A [`Store`] operation, for choosing where a fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// `claim`
    Claim,
    /// `complete`
    Complete,
    /// `release`
    Release,
    /// `renew`
    Renew,
    /// `get`
    Get,
    /// `purge_expired`
    Purge,
    /// `forget`
    Forget,
}

/// What happens to a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Fail with `Error::Unavailable` without reaching the inner store.
    FailBefore,
    /// Run the call on the inner store, then fail with `Error::Unavailable` anyway: the write
    /// happened but its answer was lost.
    FailAfter,
    /// Delay the call, then run it.
    Delay(Duration),
}

#[derive(Debug)]
struct Rule {
    op: Op,
    fault: Fault,
    skip: u32,
    times: Option<u32>,
}

/// Wraps a store and applies [`Fault`]s to chosen calls, in the order they were added.
///
/// ```
/// use idemgate_core::{Error, Key, MemoryStore, StoreExt};
/// use idemgate_testkit::fault::{Fault, FaultStore, Op};
/// use std::time::Duration;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = FaultStore::new(MemoryStore::new()).inject(Op::Claim, Fault::FailBefore, 1);
/// let key = Key::new("t", "k").unwrap();
/// assert!(matches!(store.claim_for(&key, Duration::from_secs(1)).await, Err(Error::Unavailable { .. })));
/// assert!(store.claim_for(&key, Duration::from_secs(1)).await.is_ok());
/// assert_eq!(store.injected(), 1);
/// # });
/// ```
#[derive(Debug)]
pub struct FaultStore<S> {
    inner: S,
    rules: Mutex<VecDeque<Rule>>,
    injected: Mutex<u64>,
}

/// The error source of an injected fault.
#[derive(Debug)]
struct Injected(Op);

impl std::fmt::Display for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "injected fault on {:?}", self.0)
    }
}

impl std::error::Error for Injected {}

impl<S: Store> FaultStore<S> {
    /// Wraps `inner` with no faults.
    pub fn new(inner: S) -> Self {
        FaultStore {
            inner,
            rules: Mutex::default(),
            injected: Mutex::new(0),
        }
    }

    /// Applies `fault` to the next `times` calls of `op`.
    pub fn inject(self, op: Op, fault: Fault, times: u32) -> Self {
        self.add(op, fault, 0, Some(times));
        self
    }

    /// Adds a rule at run time: after `skip` calls of `op` pass untouched, applies `fault` to the
    /// next `times` calls (`None`: every call from then on).
    pub fn add(&self, op: Op, fault: Fault, skip: u32, times: Option<u32>) {
        self.rules.lock().unwrap().push_back(Rule {
            op,
            fault,
            skip,
            times,
        });
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// How many faults struck so far.
    pub fn injected(&self) -> u64 {
        *self.injected.lock().unwrap()
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn next_fault(&self, op: Op) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        let i = rules.iter().position(|r| r.op == op)?;
        let rule = &mut rules[i];
        if rule.skip > 0 {
            rule.skip -= 1;
            return None;
        }
        let fault = rule.fault;
        match &mut rule.times {
            Some(1) => {
                rules.remove(i);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        *self.injected.lock().unwrap() += 1;
        Some(fault)
    }

    async fn call<T>(&self, op: Op, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let fail = || Error::Unavailable {
            backend: "fault",
            source: Box::new(Injected(op)),
        };
        match self.next_fault(op) {
            None => fut.await,
            Some(Fault::FailBefore) => Err(fail()),
            Some(Fault::FailAfter) => {
                fut.await?;
                Err(fail())
            }
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                fut.await
            }
        }
    }
}

impl<S: Store> Store for FaultStore<S> {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        self.call(Op::Claim, self.inner.claim(key, fp, opts)).await
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        self.call(Op::Complete, self.inner.complete(lease, outcome, retention))
            .await
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        self.call(Op::Release, self.inner.release(lease)).await
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        self.call(Op::Renew, self.inner.renew(lease, extend)).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        self.call(Op::Get, self.inner.get(key)).await
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        self.call(Op::Purge, self.inner.purge_expired(limit)).await
    }

    async fn forget(&self, key: &Key, force: bool) -> Result<idemgate_core::Forgotten> {
        self.call(Op::Forget, self.inner.forget(key, force)).await
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        self.call(Op::Claim, self.inner.claim_many(claims, opts))
            .await
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        self.call(Op::Complete, self.inner.complete_many(done, retention))
            .await
    }
}

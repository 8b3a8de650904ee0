//! The Gate: claim, run, complete, with heartbeats, replays and fencing.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::obs;
use crate::outcome::Outcome;
use crate::record::{Claim, ClaimOptions, Lease};
use crate::store::Store;

/// What to do when the handler returns an error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorPolicy {
    /// Release the key: a retry runs the handler again. The default.
    #[default]
    Release,
    /// Store the failure (its `Display` text) and replay it to duplicates as
    /// [`GateError::Failed`].
    Store,
}

/// What to do when another call holds the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InProgressPolicy {
    /// Return [`GateError::InProgress`] at once: for a caller that has its own retry (a broker
    /// that redelivers, an HTTP client told to come back).
    Reject,
    /// Poll the store until the running call completes (and return its result), its lease runs
    /// out (and take over), or `timeout` passes (then [`GateError::InProgress`]). The default,
    /// with a 60 s timeout: long enough for the 30 s lease of a call that crashed to run out and
    /// be taken over.
    Wait {
        /// The longest wait.
        timeout: Duration,
    },
}

impl Default for InProgressPolicy {
    fn default() -> Self {
        InProgressPolicy::Wait {
            timeout: Duration::from_secs(60),
        }
    }
}

/// The value of a successful [`Gate::run`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum Run<T> {
    /// The handler ran now.
    Fresh(T),
    /// A previous run's stored result.
    Replayed(T),
}

impl<T> Run<T> {
    /// The value, fresh or replayed.
    pub fn into_inner(self) -> T {
        match self {
            Run::Fresh(v) | Run::Replayed(v) => v,
        }
    }

    /// Whether this is a replay.
    pub fn is_replayed(&self) -> bool {
        matches!(self, Run::Replayed(_))
    }
}

/// Why [`Gate::run`] did not return a value.
#[derive(Debug)]
#[non_exhaustive]
pub enum GateError<E> {
    /// The handler failed in this run.
    Handler(E),
    /// A previous run failed and its failure was stored ([`ErrorPolicy::Store`]).
    Failed {
        /// The stored failure text.
        message: String,
    },
    /// Another claim holds the key.
    InProgress {
        /// When its lease runs out.
        lease_until: SystemTime,
        /// How many executions were started.
        attempts: u32,
    },
    /// The key is known with another fingerprint.
    Mismatch {
        /// The stored fingerprint.
        stored: Fingerprint,
    },
    /// The store failed, or the lease was lost (the handler's effect may have happened: see
    /// [`Key::derive`]).
    Store(Error),
}

impl<E> From<Error> for GateError<E> {
    fn from(e: Error) -> Self {
        GateError::Store(e)
    }
}

impl<E: fmt::Display> fmt::Display for GateError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GateError::Handler(e) => write!(f, "handler failed: {e}"),
            GateError::Failed { message } => write!(f, "a previous run failed: {message}"),
            GateError::InProgress { .. } => f.write_str("the key is in progress in another call"),
            GateError::Mismatch { .. } => {
                f.write_str("the key was used before with a different request")
            }
            GateError::Store(e) => write!(f, "idempotency store failed: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for GateError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // the store error's own text is in the message: its cause comes next
            GateError::Store(e) => std::error::Error::source(e),
            _ => None,
        }
    }
}

/// Runs handlers at most once at a time per key and replays finished results.
///
/// ```
/// use std::time::Duration;
/// use idemgate_core::{Gate, Key, MemoryStore, Run};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let gate = Gate::new(MemoryStore::new()).with_lease(Duration::from_secs(30));
/// let key = Key::compose("payments", ["pay_123", "capture"])?;
///
/// let charge = |lease: idemgate_core::Lease| async move {
///     // pass lease.key().derive("charge") to the card network as its idempotency key
///     Ok::<_, std::io::Error>(format!("charged with {}", lease.key().derive("charge").id()))
/// };
/// let first = gate.run(&key, None, charge).await.unwrap();
/// let again = gate.run(&key, None, charge).await.unwrap();
/// assert!(matches!(first, Run::Fresh(_)));
/// assert!(again.is_replayed());
/// assert_eq!(first.into_inner(), again.into_inner());
/// # Ok::<(), idemgate_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct Gate<S> {
    store: Arc<S>,
    lease: Duration,
    retention: Duration,
    on_error: ErrorPolicy,
    in_progress: InProgressPolicy,
}

impl<S> Clone for Gate<S> {
    fn clone(&self) -> Self {
        Gate {
            store: Arc::clone(&self.store),
            lease: self.lease,
            retention: self.retention,
            on_error: self.on_error,
            in_progress: self.in_progress,
        }
    }
}

impl<S: Store> Gate<S> {
    /// A gate over `store` with 30 s leases, 24 h retention, `Release` on error, and a duplicate
    /// that arrives while the first call runs waiting for its result (up to 60 s; see
    /// [`InProgressPolicy`]).
    pub fn new(store: S) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A gate over a shared store.
    pub fn from_arc(store: Arc<S>) -> Self {
        Gate {
            store,
            lease: Duration::from_secs(30),
            retention: Duration::from_secs(86_400),
            on_error: ErrorPolicy::Release,
            in_progress: InProgressPolicy::default(),
        }
    }

    /// The lease length; the heartbeat renews it every third of it while the handler runs.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long completed results are replayed: at least the broker's redelivery window.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// What to do with handler errors.
    pub fn with_error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.on_error = policy;
        self
    }

    /// What to do with a duplicate that arrives while the first call runs (default: wait up to
    /// 60 s for its result).
    pub fn with_in_progress_policy(mut self, policy: InProgressPolicy) -> Self {
        self.in_progress = policy;
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs `handler` for `key` unless it already ran (then replays its result). A call for a
    /// key that another call is running waits for that call's result, or returns
    /// [`GateError::InProgress`], as the [`InProgressPolicy`] says.
    ///
    /// The handler receives the [`Lease`]; it should pass `lease.key().derive(..)` to any
    /// downstream system, because a crash between the effect and `complete` runs it again after
    /// the lease expires. While it runs, the lease is renewed every third of its length. If the
    /// handler panics or the returned future is dropped, the key is released. If a renewal finds
    /// the lease lost (another claim took the key over), the result is neither completed nor
    /// released: `run` returns `GateError::Store(Error::LeaseLost)`.
    pub async fn run<T, E, F, Fut>(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        handler: F,
    ) -> Result<Run<T>, GateError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let opts = ClaimOptions {
            lease: self.lease,
            retention: self.retention,
        };
        let deadline = match self.in_progress {
            InProgressPolicy::Wait { timeout } => Some(tokio::time::Instant::now() + timeout),
            InProgressPolicy::Reject => None,
        };
        let mut backoff = Duration::from_millis(5);
        let lease = loop {
            let claim = obs::timed("claim", self.store.claim(key, fp, &opts)).await?;
            match claim {
                Claim::Acquired(lease) => break lease,
                Claim::Completed(record) => {
                    obs::outcome("replayed");
                    let outcome = record.outcome().ok_or_else(|| Error::Corrupt {
                        backend: "gate",
                        reason: "completed record without outcome".into(),
                    })?;
                    return replay(outcome);
                }
                Claim::Mismatch { stored } => {
                    obs::outcome("mismatch");
                    return Err(GateError::Mismatch { stored });
                }
                Claim::InProgress {
                    lease_until,
                    attempts,
                } => {
                    let now = tokio::time::Instant::now();
                    match deadline {
                        Some(deadline) if now < deadline => {
                            tokio::time::sleep(backoff.min(deadline - now)).await;
                            backoff = (backoff * 2).min(Duration::from_millis(250));
                        }
                        _ => {
                            obs::outcome("in_progress");
                            return Err(GateError::InProgress {
                                lease_until,
                                attempts,
                            });
                        }
                    }
                }
            }
        };
        if lease.attempt() > 1 {
            obs::takeover();
        }
        obs::fresh_span(key, &lease, self.execute(lease.clone(), handler)).await
    }

    async fn execute<T, E, F, Fut>(&self, lease: Lease, handler: F) -> Result<Run<T>, GateError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut guard = LeaseGuard::new(&self.store, lease.clone());
        let (result, lost) =
            keep_alive(&*self.store, &lease, self.lease, handler(lease.clone())).await;
        if lost {
            // another claim may hold the key now: completing (or releasing) could overwrite its
            // work if fencing were ever fooled, so neither is tried
            obs::outcome("lease_lost");
            guard.disarm();
            return Err(GateError::Store(Error::LeaseLost));
        }
        let done = match &result {
            Ok(value) => Some(Outcome::new(
                Outcome::OK,
                serde_json::to_vec(value).map_err(|e| Error::Codec { source: e.into() })?,
            )),
            Err(e) if self.on_error == ErrorPolicy::Store => {
                Some(Outcome::new(Outcome::FAILED, e.to_string().into_bytes()))
            }
            Err(_) => None,
        };
        let lease = guard.disarm();
        match done {
            Some(outcome) => {
                if let Err(e) = obs::timed(
                    "complete",
                    self.store.complete(&lease, &outcome, self.retention),
                )
                .await
                {
                    if matches!(e, Error::LeaseLost) {
                        obs::outcome("lease_lost");
                    }
                    return Err(e.into());
                }
            }
            None => match obs::timed("release", self.store.release(lease)).await {
                Ok(()) | Err(Error::LeaseLost) => {}
                Err(e) => return Err(e.into()),
            },
        }
        obs::outcome(if result.is_ok() { "fresh" } else { "failed" });
        result.map(Run::Fresh).map_err(GateError::Handler)
    }
}

fn replay<T: DeserializeOwned, E>(outcome: &Outcome) -> Result<Run<T>, GateError<E>> {
    match outcome.status {
        Outcome::OK => serde_json::from_slice(&outcome.body)
            .map(Run::Replayed)
            .map_err(|e| GateError::Store(Error::Codec { source: e.into() })),
        Outcome::FAILED => Err(GateError::Failed {
            message: String::from_utf8_lossy(&outcome.body).into_owned(),
        }),
        other => Err(GateError::Store(Error::Corrupt {
            backend: "gate",
            reason: format!("outcome status {other} was not written by a Gate"),
        })),
    }
}

/// Drives `fut` while renewing `lease` every third of `length`; returns its output and whether
/// the lease was lost on the way (then the work's result must not be completed).
///
/// A failed renewal (the store is down) is retried at the next tick: the lease still has two
/// thirds of its length.
///
/// The future is `fut` and a few words: the heartbeat (a timer and the renewals) is allocated
/// only for work that is still pending after its first poll.
pub fn keep_alive<'a, S: Store + ?Sized, F: Future>(
    store: &'a S,
    lease: &'a Lease,
    length: Duration,
    fut: F,
) -> KeepAlive<'a, S, F> {
    KeepAlive {
        fut,
        heartbeat: None,
        store,
        lease,
        length,
        lost: false,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`keep_alive`]: `(output, lost)`.
    #[must_use = "futures do nothing unless polled"]
    pub struct KeepAlive<'a, S: ?Sized, F> {
        #[pin]
        fut: F,
        heartbeat: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
        store: &'a S,
        lease: &'a Lease,
        length: Duration,
        lost: bool,
    }
}

impl<S: ?Sized, F> fmt::Debug for KeepAlive<'_, S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeepAlive")
            .field("lease", self.lease)
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl<'a, S: Store + ?Sized, F: Future> Future for KeepAlive<'a, S, F> {
    type Output = (F::Output, bool);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready((out, *this.lost));
        }
        if !*this.lost {
            let (store, lease, length) = (*this.store, *this.lease, *this.length);
            let beat = this
                .heartbeat
                .get_or_insert_with(|| Box::pin(heartbeat(store, lease.clone(), length)));
            // the heartbeat ends only when the lease is lost; the work still runs to its end
            if beat.as_mut().poll(cx).is_ready() {
                *this.lost = true;
                *this.heartbeat = None;
            }
        }
        Poll::Pending
    }
}

/// Renews `lease` every third of `length`; returns when the lease is lost.
async fn heartbeat<S: Store + ?Sized>(store: &S, mut current: Lease, length: Duration) {
    let period = (length / 3).max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match obs::timed("renew", store.renew(&current, length)).await {
            Ok(renewed) => current = renewed,
            Err(Error::LeaseLost) => return,
            Err(_e) => obs::renew_failed(&_e),
        }
    }
}

/// Holds a lease for a piece of work and releases it if the work is abandoned (a panic, or its
/// future dropped, as when an HTTP client disconnects) before [`disarm`](Self::disarm).
#[derive(Debug)]
pub struct LeaseGuard<'a, S: Store> {
    // borrowed: the store is only cloned (to release in the background) if the work is abandoned
    store: &'a Arc<S>,
    lease: Option<Lease>,
}

impl<'a, S: Store> LeaseGuard<'a, S> {
    /// Guards `lease`.
    pub fn new(store: &'a Arc<S>, lease: Lease) -> Self {
        LeaseGuard {
            store,
            lease: Some(lease),
        }
    }

    /// The lease guarded (until [`disarm`](Self::disarm)).
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// The work finished: hands the lease back for `complete` or `release`.
    pub fn disarm(&mut self) -> Lease {
        self.lease.take().expect("a guard is disarmed once")
    }
}

impl<S: Store> Drop for LeaseGuard<'_, S> {
    fn drop(&mut self) {
        if let (Some(lease), Ok(rt)) = (self.lease.take(), tokio::runtime::Handle::try_current()) {
            let store = Arc::clone(self.store);
            // if no runtime is left, the lease simply expires
            rt.spawn(async move {
                let _ = store.release(lease).await;
            });
        }
    }
}

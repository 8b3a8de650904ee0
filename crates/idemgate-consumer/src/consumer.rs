//! The `Consumer` runtime.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use idemgate_core::backend::keep_alive;
use idemgate_core::{Claim, ClaimOptions, Fingerprint, Key, Lease, Outcome, Store};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::window::{Horizon, check_window};
use crate::{Delivery, Error, Message, Result, Source};
use idemgate_core::{Inbox, InboxHandler};

/// Extracts a message's key: the event id by default, or a business key (order id + SKU).
/// An `Err` makes the message poison: it is dead-lettered with that reason.
pub type KeyFn = Arc<dyn Fn(&Message) -> std::result::Result<Key, String> + Send + Sync>;

/// What a consumer did, counted from its start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Deliveries received.
    pub received: u64,
    /// Handler runs that completed (or committed) and were acked.
    pub handled: u64,
    /// Duplicates of completed keys, acked without running the handler.
    pub duplicates: u64,
    /// Waits for a key still being handled elsewhere (the delivery is held meanwhile, not
    /// nacked).
    pub in_progress: u64,
    /// Failed handler runs retried (in place for a message with an ordering key, else through
    /// the broker).
    pub retried: u64,
    /// Store or inbox failures (a claim, a transaction, a completion) waited out with the
    /// delivery held: retries that are not the handler's and use none of its attempts.
    pub store_retries: u64,
    /// Messages dead-lettered (poison, mismatch, out of attempts), counted once the broker
    /// stored the dead letter.
    pub dead_lettered: u64,
    /// Of those, messages with no key (no event id, or the key function refused them).
    pub dead_lettered_poison: u64,
    /// Of those, keys seen before with another payload.
    pub dead_lettered_mismatch: u64,
    /// Of those, messages whose handler failed `max_attempts` times.
    pub dead_lettered_exhausted: u64,
    /// Dead letters the broker could not store (no dead-letter destination, or it refused):
    /// the message was kept and comes back.
    pub dead_letter_failures: u64,
    /// Handler runs cut off at the handler timeout.
    pub timed_out: u64,
    /// Handler runs that outlasted the lease (renewed meanwhile).
    pub slow: u64,
    /// Completions refused because the lease had been taken over (a zombie fenced off).
    pub fenced: u64,
    /// Acks, nacks or dead-letters the broker refused (it will redeliver).
    pub settle_failures: u64,
}

/// How a handler's run ended.
enum Ran<E> {
    Done(std::result::Result<(), E>),
    Panicked,
    TimedOut,
}

impl Runtime {
    /// Runs a handler's future with its panics caught and the handler timeout; counts it slow
    /// when it outlasted the lease.
    async fn run_handler<E>(
        &self,
        key: &Key,
        fut: impl Future<Output = std::result::Result<(), E>>,
    ) -> Ran<E> {
        let started = tokio::time::Instant::now();
        let ran = match tokio::time::timeout(
            self.cfg.handler_timeout,
            AssertUnwindSafe(fut).catch_unwind(),
        )
        .await
        {
            Ok(Ok(done)) => Ran::Done(done),
            Ok(Err(_panic)) => Ran::Panicked,
            Err(_elapsed) => {
                bump(&self.counters.timed_out);
                Ran::TimedOut
            }
        };
        let took = started.elapsed();
        if took > self.cfg.lease {
            bump(&self.counters.slow);
            tracing::warn!(%key, ?took, lease = ?self.cfg.lease, "a handler ran past its lease");
        }
        ran
    }

    /// What a failed run says about itself.
    fn failure<E: fmt::Display>(&self, ran: Ran<E>) -> Option<String> {
        match ran {
            Ran::Done(Ok(())) => None,
            Ran::Done(Err(e)) => Some(e.to_string()),
            Ran::Panicked => Some("the handler panicked".into()),
            Ran::TimedOut => Some(format!(
                "the handler timed out after {:?}",
                self.cfg.handler_timeout
            )),
        }
    }
}

/// Why a message is dead-lettered.
#[derive(Clone, Copy, Debug)]
enum Why {
    Poison,
    Mismatch,
    Exhausted,
}

/// How a delivery ends.
enum Settle {
    Ack,
    /// Back to the broker, to come again after the delay.
    Nack(Duration),
    DeadLetter(Why, String),
    /// The stored position it carries is stale: resume its partition from the stored one.
    Reposition,
}

/// The longest wait between two tries of a held delivery, or before a redelivery.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The longest wait between two tries of a store that failed: short, so that a consumer
/// picks up soon after the store is back.
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(5);

/// `base` doubled `n` times, at most [`MAX_BACKOFF`].
fn backoff(base: Duration, n: u32) -> Duration {
    base.saturating_mul(1 << n.min(16)).min(MAX_BACKOFF)
}

/// A wait between half of `d` and `d`, so that held deliveries do not retry in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// A live view of a running consumer's [`Stats`], from [`Consumer::stats_handle`].
#[derive(Clone, Debug)]
pub struct StatsHandle(Arc<Counters>);

impl StatsHandle {
    /// The counts so far.
    pub fn get(&self) -> Stats {
        self.0.snapshot()
    }
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    handled: AtomicU64,
    duplicates: AtomicU64,
    in_progress: AtomicU64,
    retried: AtomicU64,
    store_retries: AtomicU64,
    dead_lettered: AtomicU64,
    dead_lettered_poison: AtomicU64,
    dead_lettered_mismatch: AtomicU64,
    dead_lettered_exhausted: AtomicU64,
    dead_letter_failures: AtomicU64,
    timed_out: AtomicU64,
    slow: AtomicU64,
    fenced: AtomicU64,
    settle_failures: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            received: get(&self.received),
            handled: get(&self.handled),
            duplicates: get(&self.duplicates),
            in_progress: get(&self.in_progress),
            retried: get(&self.retried),
            store_retries: get(&self.store_retries),
            dead_lettered: get(&self.dead_lettered),
            dead_lettered_poison: get(&self.dead_lettered_poison),
            dead_lettered_mismatch: get(&self.dead_lettered_mismatch),
            dead_lettered_exhausted: get(&self.dead_lettered_exhausted),
            dead_letter_failures: get(&self.dead_letter_failures),
            timed_out: get(&self.timed_out),
            slow: get(&self.slow),
            fenced: get(&self.fenced),
            settle_failures: get(&self.settle_failures),
        }
    }
}

#[derive(Clone)]
struct Config {
    name: String,
    concurrency: usize,
    max_attempts: u32,
    retry_delay: Duration,
    busy_delay: Duration,
    lease: Duration,
    handler_timeout: Duration,
    retention: Duration,
    batch: usize,
    // deliveries per inbox transaction
    tx_batch: usize,
    // how often a held delivery's broker timer is extended
    tick: Duration,
    // the broker redelivers an unsettled delivery after a while (NATS, SQS)
    ack_wait: bool,
    key: Option<KeyFn>,
    horizon: Option<Horizon>,
    strict: bool,
    counters: Arc<Counters>,
}

/// Gate mode: keys claimed in a [`Store`].
#[derive(Debug)]
pub struct GateMode<St>(Arc<St>);

/// Inbox mode: keys recorded in the handler's own transaction.
#[derive(Debug)]
pub struct InboxMode<I>(Arc<I>);

/// An idempotent consumer: receive, extract the key, claim it (or open the inbox transaction),
/// handle, complete (or commit), and only then ack.
///
/// - A duplicate of a completed key is acked without running the handler.
/// - A duplicate of a key being handled elsewhere is held until that run completes (then acked)
///   or its lease runs out (then taken over): it is tried again after the busy delay (default
///   1 s), doubling, at most until the holder's lease ends.
/// - A failing store (a claim, an inbox transaction, a completion) is waited out the same way,
///   after a jittered delay from the retry delay, doubling up to 5 s. Held deliveries, and those
///   waiting for a free lane behind them, are reported in progress to the broker, so neither a
///   busy key nor a store outage uses the broker's delivery budget (NATS `MaxDeliver`, an SQS
///   redrive policy) or the handler's attempts ([`Stats::in_progress`],
///   [`Stats::store_retries`]).
/// - The same key with a different payload (Gate mode), or a message without a key, is
///   dead-lettered with the reason.
/// - A failing (or panicking) handler is retried with a growing delay and dead-lettered after
///   `max_attempts` (default 5) runs, counted by the store (Gate mode) or by the broker's
///   delivery count where it has one (Inbox mode). A message with an ordering key is retried in
///   place, so the later messages of its key wait behind it; others go back to the broker.
/// - Up to `concurrency` handlers run at once; messages with the same ordering key run one at a
///   time, in order. Claims of messages that are ready together are batched (`claim_many`), and
///   so are their completions (`complete_many`). Completions and acks run behind the handlers,
///   and in Gate mode the next claims run ahead of them, so neither holds a handler's slot.
/// - Inbox mode can share one transaction among the deliveries that are ready together
///   (`with_batch` on an Inbox-mode consumer).
/// - While a handler runs, the lease is renewed every third of the lease, and the broker is told
///   the message is in progress ([`Delivery::in_progress`]) every third of the lease or of the
///   broker's ack wait ([`Source::ack_wait`]), whichever is shorter.
/// - A handler gets `handler_timeout` (default 5 min) to finish. At the timeout it is dropped
///   mid-way: in Gate mode its key is released, in Inbox mode its transaction rolls back, and
///   the run counts as a failed attempt (retried, then dead-lettered with the reason). A run
///   that outlasts its lease (renewed all along) is counted in [`Stats::slow`] and logged.
/// - [`run`](Consumer::run)'s `shutdown` future stops receiving; what was received is finished,
///   settled, and then `run` returns the [`Stats`]. Held deliveries (a busy key, a store outage,
///   a retry in place) are given back to the broker at once, and so are the later messages of
///   their ordering key.
pub struct Consumer<M> {
    cfg: Config,
    mode: M,
}

impl<M> fmt::Debug for Consumer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.cfg.name)
            .field("concurrency", &self.cfg.concurrency)
            .field("max_attempts", &self.cfg.max_attempts)
            .finish_non_exhaustive()
    }
}

fn config(name: String) -> Config {
    Config {
        name,
        concurrency: 8,
        max_attempts: 5,
        retry_delay: Duration::from_millis(500),
        busy_delay: Duration::from_secs(1),
        lease: Duration::from_secs(30),
        handler_timeout: Duration::from_secs(300),
        retention: Duration::from_secs(7 * 86_400),
        batch: 64,
        tx_batch: 1,
        tick: Duration::from_secs(10),
        ack_wait: false,
        key: None,
        horizon: None,
        strict: false,
        counters: Arc::default(),
    }
}

impl<St: Store> Consumer<GateMode<St>> {
    /// A consumer named `name` (the scope of its keys) claiming keys in `store`.
    pub fn gate(name: impl Into<String>, store: St) -> Self {
        Consumer {
            cfg: config(name.into()),
            mode: GateMode(Arc::new(store)),
        }
    }

    /// How long completed keys are remembered (default 7 days): at least the broker's
    /// redelivery horizon.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.cfg.retention = retention;
        self
    }

    /// The most claims (or completions) sent to the store in one `claim_many` (`complete_many`)
    /// (default 64).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.cfg.batch = batch.max(1);
        self
    }

    /// Runs `handler` on every message of `source` until `shutdown` resolves or the source
    /// ends.
    ///
    /// # Errors
    /// A broker failure while receiving (after the messages in flight are settled), or the
    /// window check under [`with_strict`](Consumer::with_strict).
    pub async fn run<S, H, Fut, E>(
        self,
        source: S,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<Stats>
    where
        S: Source,
        H: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let mut cfg = self.cfg;
        let retention = cfg.retention;
        check(&mut cfg, retention, &source)?;
        let store = self.mode.0;
        let opts = ClaimOptions {
            lease: cfg.lease,
            retention: cfg.retention,
        };
        let claims = claimer(Arc::clone(&store), cfg.batch, opts);
        let completions = completer(Arc::clone(&store), cfg.batch, cfg.retention);
        let rt = Runtime::new(cfg);
        let concurrency = rt.cfg.concurrency;
        let process = Arc::new(GateProcess {
            rt: Arc::clone(&rt),
            running: Semaphore::new(concurrency),
            store,
            claims,
            completions,
            handler,
        });
        // a message's claim runs while the lanes' handlers still hold every slot
        drive(&rt, source, process, 2 * concurrency, shutdown).await
    }
}

impl<I: Inbox> Consumer<InboxMode<I>> {
    /// A consumer named `name` (the scope of its keys) recording keys in `inbox`, inside the
    /// transaction its handler writes in.
    pub fn inbox(name: impl Into<String>, inbox: I) -> Self {
        Consumer {
            cfg: config(name.into()),
            mode: InboxMode(Arc::new(inbox)),
        }
    }

    /// Up to `n` deliveries that are ready together (on one lane) share one transaction
    /// (default 1): one `first_time_many` for their keys, each new message's handler in turn,
    /// their positions, one commit, then every ack. Fewer round trips and commits per message;
    /// the handlers' locks are held until the batch commits. If any step fails (a handler error
    /// or panic, a fenced position, a failed commit), the batch is rolled back and its messages
    /// run again one per transaction, so one bad message costs the others only a retry.
    pub fn with_batch(mut self, n: usize) -> Self {
        self.cfg.tx_batch = n.max(1);
        self
    }

    /// Runs `handler` on every message of `source`, in a transaction that also records the key,
    /// until `shutdown` resolves or the source ends.
    ///
    /// # Errors
    /// A broker failure while receiving (after the messages in flight are settled), or the
    /// window check under [`with_strict`](Consumer::with_strict).
    pub async fn run<S, H>(
        self,
        source: S,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<Stats>
    where
        S: Source,
        H: InboxHandler<I::Tx, Message>,
    {
        let (inbox, mut cfg) = (self.mode.0, self.cfg);
        check(&mut cfg, inbox.retention(), &source)?;
        let rt = Runtime::new(cfg);
        let process = Arc::new(InboxProcess {
            rt: Arc::clone(&rt),
            inbox,
            handler: Arc::new(handler),
        });
        let lanes = rt.cfg.concurrency;
        drive(&rt, source, process, lanes, shutdown).await
    }
}

impl<M> Consumer<M> {
    /// A live view of this consumer's counts, for monitoring (and tests) while it runs.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(Arc::clone(&self.cfg.counters))
    }

    /// The lease of a running handler (default 30 s), renewed every third of it (Gate mode). The
    /// broker hears that a held message is in progress three times per lease, or per its ack
    /// wait if that is shorter.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.cfg.lease = lease;
        self
    }

    /// How long a handler may run before it is cut off and its run counted as failed (default
    /// 5 min).
    pub fn with_handler_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.handler_timeout = timeout;
        self
    }

    /// How many messages are handled at once (default 8).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.cfg.concurrency = n.max(1);
        self
    }

    /// Handler runs before a failing message is dead-lettered (default 5).
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.cfg.max_attempts = n.max(1);
        self
    }

    /// The first retry delay after a handler failure (default 500 ms), doubled per attempt up to
    /// 30 s.
    pub fn with_retry_delay(mut self, delay: Duration) -> Self {
        self.cfg.retry_delay = delay;
        self
    }

    /// The first wait before a held duplicate of a running key is tried again (default 1 s),
    /// doubled per try, at most until the holder's lease runs out.
    pub fn with_busy_delay(mut self, delay: Duration) -> Self {
        self.cfg.busy_delay = delay;
        self
    }

    /// A business key instead of the event id: `|msg| Key::compose("reservations", [order, sku])`.
    pub fn with_key(
        mut self,
        f: impl Fn(&Message) -> std::result::Result<Key, String> + Send + Sync + 'static,
    ) -> Self {
        self.cfg.key = Some(Arc::new(f));
        self
    }

    /// The broker's redelivery horizon, checked against the retention at start (default: the
    /// source's own, [`Source::horizon`]).
    pub fn with_horizon(mut self, horizon: Horizon) -> Self {
        self.cfg.horizon = Some(horizon);
        self
    }

    /// Refuse to start (with [`Error::Window`]) when the retention is shorter than the horizon,
    /// instead of warning.
    pub fn with_strict(mut self, strict: bool) -> Self {
        self.cfg.strict = strict;
        self
    }
}

/// The window check at start-up: the horizon given, else the one the source read from its
/// broker.
fn check(cfg: &mut Config, retention: Duration, source: &impl Source) -> Result<()> {
    let timer = source
        .ack_wait()
        .map_or(cfg.lease, |wait| wait.min(cfg.lease));
    cfg.tick = (timer / 3).max(Duration::from_millis(1));
    cfg.ack_wait = source.ack_wait().is_some();
    let from_source = source.horizon();
    let Some(horizon) = cfg.horizon.clone().or(from_source) else {
        return Ok(());
    };
    let verdict = check_window(retention, horizon);
    if verdict.is_ok() {
        tracing::debug!(consumer = %cfg.name, "{verdict}");
    } else if cfg.strict {
        return Err(Error::Window(verdict));
    } else {
        tracing::warn!(consumer = %cfg.name, "{verdict}");
    }
    Ok(())
}

/// What both modes share: configuration, counters, local attempt counts, and settling.
struct Runtime {
    cfg: Config,
    counters: Arc<Counters>,
    // attempts of keys that failed here, for brokers that do not count deliveries
    attempts: Mutex<HashMap<Key, u32>>,
    // settlements running behind the lanes: one permit each, `settle_slots` in all; their tasks
    // belong to the running consumer (aborted with it, like its lanes)
    settling: Arc<Semaphore>,
    settle_slots: u32,
    behind: Mutex<JoinSet<()>>,
    // set when `run` stops receiving: held deliveries are given back instead of waited on
    stopping: watch::Sender<bool>,
}

impl Runtime {
    fn new(cfg: Config) -> Arc<Self> {
        // as many settlements behind the lanes as lanes: a slow store or broker holds the lanes
        // back instead of piling up completed work
        let settle_slots = u32::try_from(cfg.concurrency).unwrap_or(u32::MAX);
        Arc::new(Runtime {
            counters: Arc::clone(&cfg.counters),
            cfg,
            attempts: Mutex::default(),
            settling: Arc::new(Semaphore::new(settle_slots as usize)),
            settle_slots,
            behind: Mutex::default(),
            stopping: watch::Sender::new(false),
        })
    }

    fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Waits `delay`, jittered, before a held delivery's next try; `false` once the consumer is
    /// stopping (give the delivery back).
    async fn pause(&self, delay: Duration) -> bool {
        let mut stopping = self.stopping.subscribe();
        tokio::select! {
            () = tokio::time::sleep(jitter(delay)) => !self.stopping(),
            _ = stopping.wait_for(|s| *s) => false,
        }
    }

    /// A store or inbox failure, waited out with the delivery held: `false` once stopping.
    async fn unavailable(&self, what: &str, error: &idemgate_core::Error, tries: &mut u32) -> bool {
        bump(&self.counters.store_retries);
        let delay = backoff(self.cfg.retry_delay, *tries).min(MAX_STORE_BACKOFF);
        *tries = tries.saturating_add(1);
        tracing::warn!(consumer = %self.cfg.name, %error, ?delay, "{what} failed; trying again");
        self.pause(delay).await
    }

    /// Settles `d`; `false` when the message went back to the broker (to come again).
    async fn settle<D: Delivery>(self: &Arc<Self>, d: D, settle: Settle) -> bool {
        match settle {
            Settle::Ack => {
                self.ack_behind(d).await;
                true
            }
            Settle::Nack(delay) => {
                self.nack(d, delay).await;
                false
            }
            Settle::DeadLetter(why, reason) => self.dead_letter(d, why, reason).await,
            Settle::Reposition => {
                if let Err(e) = d.reposition().await {
                    bump(&self.counters.settle_failures);
                    tracing::warn!(error = %e, "repositioning failed; the broker will redeliver");
                }
                false
            }
        }
    }

    /// Runs `settle` (a completion and an ack) behind the lane, so the lane takes its next
    /// delivery while the store and the broker answer. Waits for a free slot first.
    async fn behind(&self, settle: impl Future<Output = ()> + Send + 'static) {
        let Ok(permit) = Arc::clone(&self.settling).acquire_owned().await else {
            // never closed; settle in the lane if it were
            return settle.await;
        };
        let mut tasks = self.behind.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            settle.await;
            drop(permit);
        });
    }

    /// Acks `d` behind the lane.
    async fn ack_behind<D: Delivery>(self: &Arc<Self>, d: D) {
        let rt = Arc::clone(self);
        self.behind(async move { rt.ack(d).await }).await;
    }

    /// Acks `ds` behind the lane, in order, from one task (a committed batch).
    async fn ack_all_behind<D: Delivery>(self: &Arc<Self>, ds: Vec<D>) {
        let rt = Arc::clone(self);
        self.behind(async move {
            for d in ds {
                rt.ack(d).await;
            }
        })
        .await;
    }

    /// Waits until every settlement running behind the lanes has finished.
    async fn settled(&self) {
        let _all = self.settling.acquire_many(self.settle_slots).await;
    }

    fn key(&self, msg: &Message) -> std::result::Result<Key, String> {
        match &self.cfg.key {
            Some(f) => f(msg),
            None => match &msg.event_id {
                Some(id) => Key::new(&self.cfg.name, id).map_err(|e| e.to_string()),
                None => Err("the message has no event id".into()),
            },
        }
    }

    async fn ack<D: Delivery>(&self, d: D) {
        if let Err(e) = d.ack().await {
            bump(&self.counters.settle_failures);
            tracing::warn!(error = %e, "ack failed; the broker will redeliver");
        }
    }

    async fn nack<D: Delivery>(&self, d: D, delay: Duration) {
        if let Err(e) = d.nack(delay).await {
            bump(&self.counters.settle_failures);
            tracing::warn!(error = %e, "nack failed; the broker will redeliver");
        }
    }

    /// Dead-letters `d`; `true` once the broker stored the dead letter.
    async fn dead_letter<D: Delivery>(&self, d: D, why: Why, reason: String) -> bool {
        tracing::warn!(consumer = %self.cfg.name, %reason, "dead-lettering a message");
        match d.dead_letter(&reason).await {
            Ok(()) => {
                bump(&self.counters.dead_lettered);
                bump(match why {
                    Why::Poison => &self.counters.dead_lettered_poison,
                    Why::Mismatch => &self.counters.dead_lettered_mismatch,
                    Why::Exhausted => &self.counters.dead_lettered_exhausted,
                });
                true
            }
            Err(e) => {
                bump(&self.counters.settle_failures);
                bump(&self.counters.dead_letter_failures);
                tracing::warn!(error = %e, "dead-lettering failed; the message is kept and comes back");
                false
            }
        }
    }

    /// This run's attempt number for `key`: the store's count of runs (Gate mode) or the
    /// broker's delivery count (Inbox mode), or our own count, whichever is highest. Store
    /// failures and busy keys are waited out with the delivery held, so they count in neither.
    fn attempt(&self, key: &Key, store: Option<u32>, msg: Option<&Message>) -> u32 {
        let mut map = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 100_000 {
            map.clear();
        }
        let local = map.entry(key.clone()).or_insert(0);
        *local += 1;
        (*local)
            .max(store.unwrap_or(0))
            .max(msg.and_then(|m| m.deliveries).unwrap_or(0))
    }

    fn forget(&self, key: &Key) {
        self.forget_all([key]);
    }

    /// Forgets the attempts of `keys` under one lock.
    fn forget_all<'k>(&self, keys: impl IntoIterator<Item = &'k Key>) {
        let mut map = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            map.remove(key);
        }
    }

    /// What follows a failed run: `Ok(delay)` to retry in place after `delay` (a message with an
    /// ordering key: the ones behind it wait), else how to settle it (nacked with a growing
    /// delay, or dead-lettered when out of attempts).
    fn after_failure(
        &self,
        msg: &Message,
        key: &Key,
        attempt: u32,
        error: String,
    ) -> std::result::Result<Duration, Settle> {
        if attempt >= self.cfg.max_attempts {
            self.forget(key);
            let reason = format!("the handler failed {attempt} times; last error: {error}");
            return Err(Settle::DeadLetter(Why::Exhausted, reason));
        }
        bump(&self.counters.retried);
        tracing::info!(%key, attempt, %error, "handler failed; retrying");
        let delay = backoff(self.cfg.retry_delay, attempt.saturating_sub(1));
        if msg.ordering_key.is_some() {
            Ok(delay)
        } else {
            Err(Settle::Nack(delay))
        }
    }

    /// Tells the broker every third of the lease that `d` is still being worked on.
    async fn broker_tick<D: Delivery>(&self, d: &D) -> Infallible {
        self.broker_ticks(&[d]).await
    }

    /// Tells the broker that `ds` are still being worked on, three times per lease (or per
    /// broker ack wait, if shorter).
    async fn broker_ticks<D: Delivery>(&self, ds: &[&D]) -> Infallible {
        let period = self.cfg.tick;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            ticker.tick().await;
            for d in ds {
                if let Err(e) = d.in_progress().await {
                    tracing::debug!(error = %e, "in-progress signal failed");
                }
            }
        }
    }
}

/// Handles one delivery from start to settlement.
trait Process<D: Delivery>: Send + Sync + 'static {
    /// `false` when the message went back to the broker, to come again.
    fn process(&self, d: D) -> impl Future<Output = bool> + Send;

    /// Handles deliveries that were ready together on one lane, in order: one answer each.
    fn process_many(&self, ds: Vec<D>) -> impl Future<Output = Vec<bool>> + Send {
        async move {
            let mut settled = Vec::with_capacity(ds.len());
            for d in ds {
                settled.push(self.process(d).await);
            }
            settled
        }
    }
}

/// Receives, dispatches to `n` lanes (same ordering key, same lane), and on shutdown or the
/// source's end lets the lanes finish what they hold.
async fn drive<S, P>(
    rt: &Arc<Runtime>,
    mut source: S,
    process: Arc<P>,
    n: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Stats>
where
    S: Source,
    P: Process<S::Delivery>,
{
    let batch = rt.cfg.tx_batch;
    // a consumer dropped mid-run (its process "dies") drops its settlements too
    let _abort = AbortBehind(rt);
    // messages without an ordering key wait in one queue that every idle lane takes from (as
    // many as are ready, up to a batch); keyed ones go to their own lane, in order
    let (queue, shared) = mpsc::channel::<Arc<S::Delivery>>(n * batch);
    let shared = Arc::new(tokio::sync::Mutex::new(shared));
    // deliveries waiting for a lane are reported in progress too, where the broker has an ack
    // wait: a lane held by a store outage must not let the messages queued behind it expire
    let waiting = Arc::new(Waiting::new((n + 1) * (batch + 1)));
    let _ticking = rt.cfg.ack_wait.then(|| {
        let (rt, waiting) = (Arc::clone(rt), Arc::clone(&waiting));
        AbortOnDrop(tokio::spawn(async move { waiting.tick(&rt).await }))
    });
    let mut lanes = Vec::with_capacity(n);
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let (tx, own) = mpsc::channel::<Arc<S::Delivery>>(batch);
        let lane = lane(
            Arc::clone(rt),
            Arc::clone(&process),
            own,
            Arc::clone(&shared),
        );
        tasks.spawn(lane);
        lanes.push(tx);
    }
    drop(shared);
    let hasher = RandomState::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        let received = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            r = source.recv() => r,
        };
        let d = match received {
            Ok(Some(d)) => d,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        bump(&rt.counters.received);
        let d = Arc::new(d);
        if rt.cfg.ack_wait {
            waiting.add(&d);
        }
        let sent = match &d.message().ordering_key {
            Some(k) => {
                let lane = usize::try_from(hasher.hash_one(k) % n as u64).unwrap_or(0);
                lanes[lane].send(d).await.map_err(|e| e.0)
            }
            None => queue.send(d).await.map_err(|e| e.0),
        };
        if let Err(d) = sent {
            // a lane is gone (its task panicked): leave the message to the broker
            drop(d);
            break Err(Error::Config("a consumer lane stopped".into()));
        }
    };
    // deliveries held for a busy key or a store outage go back to the broker now
    rt.stopping.send_replace(true);
    drop(queue);
    drop(lanes);
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::error!(error = %e, "a consumer lane failed");
        }
    }
    rt.settled().await;
    result.map(|()| rt.counters.snapshot())
}

/// Deliveries received and not yet taken by a lane, for the in-progress signal.
struct Waiting<D> {
    list: Mutex<Vec<Weak<D>>>,
    // how many can wait at once (the channels' room), to prune the list by
    room: usize,
}

impl<D: Delivery> Waiting<D> {
    fn new(room: usize) -> Self {
        Waiting {
            list: Mutex::new(Vec::with_capacity(2 * room)),
            room,
        }
    }

    fn add(&self, d: &Arc<D>) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() >= 2 * self.room {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Arc::downgrade(d));
    }

    /// Tells the broker, at the runtime's tick, that every waiting delivery is in progress.
    async fn tick(&self, rt: &Runtime) {
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + rt.cfg.tick, rt.cfg.tick);
        loop {
            ticker.tick().await;
            let live: Vec<Arc<D>> = {
                let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|w| w.strong_count() > 0);
                list.iter().filter_map(Weak::upgrade).collect()
            };
            for d in live {
                if let Err(e) = d.in_progress().await {
                    tracing::debug!(error = %e, "in-progress signal failed");
                }
            }
        }
    }
}

/// Takes a delivery out of its waiting handle (the ticker may hold it for a moment).
async fn take<D: Send + Sync>(mut d: Arc<D>) -> D {
    loop {
        match Arc::try_unwrap(d) {
            Ok(d) => return d,
            Err(shared) => {
                d = shared;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One lane: its own (keyed) deliveries first, else whatever the shared queue has ready, up to
/// a batch at a time; ends when both channels have closed and drained.
///
/// Once a message of an ordering key went back to the broker while the consumer stops, the
/// lane gives back the later messages of that key too, unhandled: none overtakes it.
async fn lane<D: Delivery, P: Process<D>>(
    rt: Arc<Runtime>,
    process: Arc<P>,
    mut own: mpsc::Receiver<Arc<D>>,
    shared: Arc<tokio::sync::Mutex<mpsc::Receiver<Arc<D>>>>,
) {
    let batch = rt.cfg.tx_batch;
    let (mut own_open, mut shared_open) = (true, true);
    let (mut mine, mut taken) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
    // ordering keys (hashed: no copy per message) whose last message went back to the broker
    let hasher = RandomState::new();
    let mut given_back: HashSet<u64> = HashSet::new();
    while own_open || shared_open {
        tokio::select! {
            biased;
            k = own.recv_many(&mut mine, batch), if own_open => own_open = k > 0,
            k = async { shared.lock().await.recv_many(&mut taken, batch).await }, if shared_open => {
                shared_open = k > 0;
            }
        }
        for ready in [&mut mine, &mut taken] {
            if ready.is_empty() {
                continue;
            }
            let mut ds = Vec::with_capacity(ready.len());
            for d in ready.drain(..) {
                let d = take(d).await;
                match &d.message().ordering_key {
                    Some(k) if rt.stopping() && given_back.contains(&hasher.hash_one(k)) => {
                        rt.nack(d, Duration::ZERO).await;
                    }
                    _ => ds.push(d),
                }
            }
            let keys: Vec<Option<u64>> = ds
                .iter()
                .map(|d| {
                    d.message()
                        .ordering_key
                        .as_ref()
                        .map(|k| hasher.hash_one(k))
                })
                .collect();
            let settled = process.process_many(ds).await;
            for (key, settled) in keys.into_iter().zip(settled) {
                match key {
                    Some(k) if !settled => {
                        given_back.insert(k);
                    }
                    Some(k) if !given_back.is_empty() => {
                        given_back.remove(&k);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Aborts the settlements still running behind the lanes when `drive` is dropped.
struct AbortBehind<'a>(&'a Runtime);

impl Drop for AbortBehind<'_> {
    fn drop(&mut self) {
        self.0
            .behind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abort_all();
    }
}

/// Batches requests that are ready at the same time into one call of the store (`claim_many`,
/// `complete_many`): group commit, with no added latency when only one is ready.
struct Batcher<Req, Res> {
    tx: mpsc::Sender<(Req, oneshot::Sender<idemgate_core::Result<Res>>)>,
}

impl<Req, Res> Clone for Batcher<Req, Res> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<Req: Send + 'static, Res: Send + 'static> Batcher<Req, Res> {
    fn spawn<F, Fut>(batch: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = idemgate_core::Result<Vec<idemgate_core::Result<Res>>>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(Req, oneshot::Sender<_>)>(batch * 2);
        tokio::spawn(async move {
            let mut pending = Vec::with_capacity(batch);
            while rx.recv_many(&mut pending, batch).await > 0 {
                let (reqs, waiters): (Vec<_>, Vec<_>) = pending.drain(..).unzip();
                match run(reqs).await {
                    Ok(results) => {
                        for (w, r) in waiters.into_iter().zip(results) {
                            let _ = w.send(r);
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        for w in waiters {
                            let _ = w.send(Err(idemgate_core::Error::Unavailable {
                                backend: "store",
                                source: msg.clone().into(),
                            }));
                        }
                    }
                }
            }
        });
        Batcher { tx }
    }

    async fn call(&self, req: Req) -> idemgate_core::Result<Res> {
        let (tx, rx) = oneshot::channel();
        let gone = || idemgate_core::Error::Unavailable {
            backend: "store",
            source: "the store batcher stopped".into(),
        };
        self.tx.send((req, tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// The claim batcher: `claim_many` (or `claim` for one).
fn claimer<St: Store>(
    store: Arc<St>,
    batch: usize,
    opts: ClaimOptions,
) -> Batcher<(Key, Option<Fingerprint>), Claim> {
    Batcher::spawn(batch, move |claims: Vec<(Key, Option<Fingerprint>)>| {
        let store = Arc::clone(&store);
        async move {
            let claimed = if let [(key, fp)] = &claims[..] {
                vec![store.claim(key, fp.as_ref(), &opts).await?]
            } else {
                store.claim_many(&claims, &opts).await?
            };
            Ok(claimed.into_iter().map(Ok).collect())
        }
    })
}

/// The completion batcher: `complete_many` (or `complete` for one), each result its own.
fn completer<St: Store>(
    store: Arc<St>,
    batch: usize,
    retention: Duration,
) -> Batcher<(Lease, Outcome), ()> {
    Batcher::spawn(batch, move |done: Vec<(Lease, Outcome)>| {
        let store = Arc::clone(&store);
        async move {
            if let [(lease, outcome)] = &done[..] {
                return match store.complete(lease, outcome, retention).await {
                    Err(e @ idemgate_core::Error::LeaseLost) => Ok(vec![Err(e)]),
                    other => other.map(|()| vec![Ok(())]),
                };
            }
            store.complete_many(&done, retention).await
        }
    })
}

struct GateProcess<St, H> {
    rt: Arc<Runtime>,
    // handlers running at once (`concurrency`); twice as many lanes claim ahead of them
    running: Semaphore,
    store: Arc<St>,
    claims: Batcher<(Key, Option<Fingerprint>), Claim>,
    completions: Batcher<(Lease, Outcome), ()>,
    handler: H,
}

/// Where a Gate-mode delivery's claim and run ended.
enum Resolved {
    Settle(Settle),
    /// The handler ran to its end under `Lease`: complete the key, then ack.
    Ran(Key, Lease),
    /// Out of attempts under `Lease`: dead-letter, then record the key as failed.
    Exhausted(Lease, String),
}

impl<St, H, Fut, E, D> Process<D> for GateProcess<St, H>
where
    St: Store,
    H: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
    D: Delivery,
{
    async fn process(&self, d: D) -> bool {
        let rt = &self.rt;
        // one ticker for the whole claim and run: the broker hears from a held delivery
        let resolved = tokio::select! {
            r = self.resolve(&d) => r,
            never = rt.broker_tick(&d) => match never {},
        };
        let (key, lease) = match resolved {
            Resolved::Settle(settle) => return rt.settle(d, settle).await,
            Resolved::Ran(key, lease) => (key, lease),
            Resolved::Exhausted(lease, reason) => {
                // the key is recorded as a stored failure once the dead letter is stored, so a
                // copy of the event (a producer's re-publish) is acked, not dead-lettered again
                let failed = Outcome::new(Outcome::FAILED, Bytes::from(reason.clone()));
                let stored = rt.dead_letter(d, Why::Exhausted, reason).await;
                let recorded = if stored {
                    self.store.complete(&lease, &failed, rt.cfg.retention).await
                } else {
                    self.store.release(lease).await
                };
                if let Err(e) = recorded {
                    tracing::warn!(error = %e, "recording a dead-lettered key failed");
                }
                return stored;
            }
        };
        // the completion and the ack run behind the lane; the lease is renewed while the run
        // waits for a settle slot and for its completion batch
        let (rt2, completions) = (Arc::clone(rt), self.completions.clone());
        let (store, held, length) = (Arc::clone(&self.store), lease.clone(), rt.cfg.lease);
        let settle = async move {
            let completing = complete(rt2, completions, d, key, held.clone());
            let _ = keep_alive(&*store, &held, length, completing).await;
        };
        let _ = keep_alive(&*self.store, &lease, length, rt.behind(settle)).await;
        true
    }
}

impl<St, H, Fut, E> GateProcess<St, H>
where
    St: Store,
    H: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
{
    /// Claims the key and runs the handler, holding the delivery while the store is down, the
    /// key is busy elsewhere, or a failed run of an ordered message waits for its retry.
    async fn resolve<D: Delivery>(&self, d: &D) -> Resolved {
        let rt = &*self.rt;
        let msg = d.message();
        let key = match rt.key(msg) {
            Ok(key) => key,
            Err(reason) => {
                let reason = format!("poison message: {reason}");
                return Resolved::Settle(Settle::DeadLetter(Why::Poison, reason));
            }
        };
        let fp = Fingerprint::of(&msg.payload);
        let mut waits = 0;
        loop {
            let lease = match self.claim(&key, fp, &mut waits).await {
                Ok(lease) => lease,
                Err(settle) => return Resolved::Settle(settle),
            };
            // a slot for the handler; the lease is kept while the claim waits for one
            let (slot, lost) =
                keep_alive(&*self.store, &lease, rt.cfg.lease, self.running.acquire()).await;
            if lost {
                // taken over while it waited: wait for the new holder instead
                bump(&rt.counters.fenced);
                continue;
            }
            let attempt = rt.attempt(&key, Some(lease.attempt()), None);
            // a panic or a timeout of the handler is caught here: a failed attempt, not a dead
            // lane
            let run = rt.run_handler(&key, (self.handler)(msg.clone()));
            let (ran, lost) = keep_alive(&*self.store, &lease, rt.cfg.lease, run).await;
            drop(slot);
            match rt.failure(ran) {
                None if !lost => return Resolved::Ran(key, lease),
                None => {
                    // another consumer took the key over while this one ran: wait for it to
                    // complete, then ack this delivery as a duplicate
                    bump(&rt.counters.fenced);
                    tracing::warn!(%key, "lease lost while the handler ran");
                }
                Some(error) => {
                    let next = rt.after_failure(msg, &key, attempt, error);
                    if let Err(Settle::DeadLetter(Why::Exhausted, reason)) = next {
                        return Resolved::Exhausted(lease, reason);
                    }
                    let _ = self.store.release(lease).await;
                    match next {
                        Ok(delay) if rt.pause(delay).await => {}
                        Ok(_) => return Resolved::Settle(Settle::Nack(Duration::ZERO)),
                        Err(settle) => return Resolved::Settle(settle),
                    }
                }
            }
        }
    }

    /// Claims `key`: a lease, or how the delivery ends. A busy key is waited for (up to its
    /// holder's lease, so a dead holder's key is taken over when its lease runs out), and a
    /// failing store is retried with a growing delay; neither is nacked into the broker's
    /// delivery count.
    async fn claim(
        &self,
        key: &Key,
        fp: Fingerprint,
        waits: &mut u32,
    ) -> std::result::Result<Lease, Settle> {
        let rt = &*self.rt;
        let mut failures = 0;
        loop {
            let delay = match self.claims.call((key.clone(), Some(fp))).await {
                Ok(Claim::Acquired(lease)) => return Ok(lease),
                Ok(Claim::Completed(_)) => {
                    bump(&rt.counters.duplicates);
                    return Err(Settle::Ack);
                }
                Ok(Claim::InProgress { lease_until, .. }) => {
                    bump(&rt.counters.in_progress);
                    let left = lease_until
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let wait = backoff(rt.cfg.busy_delay, *waits);
                    *waits = waits.saturating_add(1);
                    wait.min(left + Duration::from_millis(20))
                }
                Ok(Claim::Mismatch { .. }) => {
                    let reason = format!(
                        "fingerprint mismatch: key {key} was first handled with a different payload"
                    );
                    return Err(Settle::DeadLetter(Why::Mismatch, reason));
                }
                Err(e) => {
                    if rt.unavailable("the claim", &e, &mut failures).await {
                        continue;
                    }
                    return Err(Settle::Nack(Duration::ZERO));
                }
            };
            if !rt.pause(delay).await {
                return Err(Settle::Nack(Duration::ZERO));
            }
        }
    }
}

/// Records a run's completion, then acks. A failing store is retried with the delivery held
/// (and the lease renewed by the caller); a lost lease nacks.
async fn complete<D: Delivery>(
    rt: Arc<Runtime>,
    completions: Batcher<(Lease, Outcome), ()>,
    d: D,
    key: Key,
    lease: Lease,
) {
    let done = Outcome::new(Outcome::OK, Bytes::new());
    let recorded = tokio::select! {
        r = async {
            let mut failures = 0;
            loop {
                match completions.call((lease.clone(), done.clone())).await {
                    Err(idemgate_core::Error::LeaseLost) => break Err(()),
                    Err(e) => {
                        // until it is recorded a redelivery would run the effect again: keep
                        // trying while the lease is renewed
                        if !rt.unavailable("recording the completion", &e, &mut failures).await {
                            break Ok(false);
                        }
                    }
                    Ok(()) => break Ok(true),
                }
            }
        } => r,
        never = rt.broker_tick(&d) => match never {},
    };
    match recorded {
        Ok(true) => {
            rt.forget(&key);
            bump(&rt.counters.handled);
            rt.ack(d).await;
        }
        Ok(false) => {
            // stopping with the completion unrecorded: a redelivery runs the effect again (the
            // Gate window; pass `Key::derive` downstream to close it)
            tracing::warn!(%key, "stopping before the completion was recorded");
            rt.nack(d, Duration::ZERO).await;
        }
        Err(()) => {
            bump(&rt.counters.fenced);
            tracing::warn!(%key, "completion fenced: another consumer took the key over");
            rt.nack(d, rt.cfg.busy_delay).await;
        }
    }
}

struct InboxProcess<I: Inbox, H> {
    rt: Arc<Runtime>,
    inbox: Arc<I>,
    handler: Arc<H>,
}

/// Where one try of an Inbox-mode delivery ended.
enum Tried {
    Settle(Settle),
    /// The store or the database failed at `what`: nothing committed, try again.
    Unavailable(&'static str, idemgate_core::Error),
    /// The handler failed (attempt number, error): rolled back.
    Failed(u32, String),
}

impl<I, H, D> Process<D> for InboxProcess<I, H>
where
    I: Inbox,
    H: InboxHandler<I::Tx, Message>,
    D: Delivery,
{
    async fn process_many(&self, ds: Vec<D>) -> Vec<bool> {
        if ds.len() < 2 {
            let mut settled = Vec::with_capacity(1);
            for d in ds {
                settled.push(self.process(d).await);
            }
            return settled;
        }
        let rt = &*self.rt;
        let mut settled = vec![true; ds.len()];
        let (mut batch, mut keys) = (Vec::with_capacity(ds.len()), Vec::with_capacity(ds.len()));
        for (i, d) in ds.into_iter().enumerate() {
            match rt.key(d.message()) {
                Ok(key) => {
                    keys.push(key);
                    batch.push((i, d));
                }
                Err(reason) => {
                    let reason = format!("poison message: {reason}");
                    settled[i] = self.dead_letter(d, None, Why::Poison, reason).await;
                }
            }
        }
        let ds: Vec<&D> = batch.iter().map(|(_, d)| d).collect();
        let committed = tokio::select! {
            r = self.run_batch(&ds, &keys) => r,
            never = rt.broker_ticks(&ds) => match never {},
        };
        drop(ds);
        match committed {
            Ok(firsts) => {
                let new = keys.iter().zip(&firsts).filter(|(_, first)| **first);
                rt.forget_all(new.map(|(key, _)| key));
                let handled = firsts.iter().filter(|first| **first).count() as u64;
                let counters = &rt.counters;
                counters.handled.fetch_add(handled, Ordering::Relaxed);
                counters
                    .duplicates
                    .fetch_add(firsts.len() as u64 - handled, Ordering::Relaxed);
                // one settlement for the batch: its acks go in order, from one task
                self.rt
                    .ack_all_behind(batch.into_iter().map(|(_, d)| d).collect())
                    .await;
            }
            Err(why) => {
                tracing::debug!(%why, n = batch.len(), "batch rolled back; one transaction each");
                for (i, d) in batch {
                    settled[i] = self.process(d).await;
                }
            }
        }
        settled
    }

    async fn process(&self, d: D) -> bool {
        let rt = &self.rt;
        let key = match rt.key(d.message()) {
            Ok(key) => key,
            Err(reason) => {
                let reason = format!("poison message: {reason}");
                return self.dead_letter(d, None, Why::Poison, reason).await;
            }
        };
        // one ticker for every try: the broker hears from a held delivery
        let settle = tokio::select! {
            s = self.resolve(d.message(), &key) => s,
            never = rt.broker_tick(&d) => match never {},
        };
        match settle {
            Settle::DeadLetter(why @ Why::Exhausted, reason) => {
                self.dead_letter(d, Some(&key), why, reason).await
            }
            Settle::DeadLetter(why, reason) => self.dead_letter(d, None, why, reason).await,
            settle => rt.settle(d, settle).await,
        }
    }
}

impl<I: Inbox, H: InboxHandler<I::Tx, Message>> InboxProcess<I, H> {
    /// Tries `msg` until it settles: a failing database is retried with a growing delay, and so
    /// is a failed run of an ordered message, with the delivery held.
    async fn resolve(&self, msg: &Message, key: &Key) -> Settle {
        let rt = &*self.rt;
        let mut failures = 0;
        loop {
            let go_on = match self.try_once(msg, key).await {
                Tried::Settle(settle) => return settle,
                Tried::Unavailable(what, e) => rt.unavailable(what, &e, &mut failures).await,
                Tried::Failed(attempt, error) => match rt.after_failure(msg, key, attempt, error) {
                    Ok(delay) => rt.pause(delay).await,
                    Err(settle) => return settle,
                },
            };
            if !go_on {
                return Settle::Nack(Duration::ZERO);
            }
        }
    }

    /// One transaction: the key, the position, the handler (for a new key), the commit.
    async fn try_once(&self, msg: &Message, key: &Key) -> Tried {
        let rt = &*self.rt;
        let mut tx = match self.inbox.begin().await {
            Ok(tx) => tx,
            Err(e) => return Tried::Unavailable("opening the inbox transaction", e),
        };
        // a concurrent duplicate waits here for the first transaction, then sees `false`
        let first = match self.inbox.first_time(&mut tx, key).await {
            Ok(first) => first,
            Err(e) => return Tried::Unavailable("the inbox insert", e),
        };
        // a partitioned log's position moves in the same transaction, duplicate or not
        if let Some(position) = &msg.position {
            match self.inbox.advance(&mut tx, position).await {
                Ok(()) => {}
                Err(e @ idemgate_core::Error::Fenced { .. }) => {
                    bump(&rt.counters.fenced);
                    tracing::warn!(error = %e, "position fenced; resuming from the stored one");
                    return Tried::Settle(Settle::Reposition);
                }
                Err(e) => return Tried::Unavailable("the position update", e),
            }
        }
        if !first {
            if msg.position.is_some()
                && let Err(e) = self.inbox.commit(tx).await
            {
                return Tried::Unavailable("the commit of the position", e);
            }
            bump(&rt.counters.duplicates);
            return Tried::Settle(Settle::Ack);
        }
        let attempt = rt.attempt(key, None, Some(msg));
        // a panic or a timeout of the handler is caught here: the transaction rolls back, the
        // lane lives on
        let ran = rt.run_handler(key, self.handler.handle(&mut tx, msg)).await;
        if let Some(error) = rt.failure(ran) {
            drop(tx);
            return Tried::Failed(attempt, error);
        }
        match self.inbox.commit(tx).await {
            Ok(()) => {
                rt.forget(key);
                bump(&rt.counters.handled);
                Tried::Settle(Settle::Ack)
            }
            // nothing committed (the next try runs the handler again), or it did and the
            // error came after (the next try sees a duplicate)
            Err(e) => Tried::Unavailable("the commit", e),
        }
    }

    /// Dead-letters `d`, in a transaction that commits once the dead letter is stored: it
    /// records `key` (a copy of the event is then acked as a duplicate, not dead-lettered again)
    /// and moves a message's stored position past it (the partition goes on, and a restart does
    /// not dead-letter it again).
    async fn dead_letter<D: Delivery>(
        &self,
        d: D,
        key: Option<&Key>,
        why: Why,
        reason: String,
    ) -> bool {
        let rt = &self.rt;
        let position = d.message().position.clone();
        if key.is_none() && position.is_none() {
            return rt.dead_letter(d, why, reason).await;
        }
        let mut failures = 0;
        let tx = loop {
            let moved = async {
                let mut tx = self.inbox.begin().await?;
                let fresh = match key {
                    Some(key) => self.inbox.first_time(&mut tx, key).await?,
                    None => true,
                };
                if let Some(position) = &position {
                    self.inbox.advance(&mut tx, position).await?;
                }
                Ok::<_, idemgate_core::Error>((tx, fresh))
            };
            match moved.await {
                Ok((tx, true)) => break tx,
                Ok((tx, false)) => {
                    // another copy of the event was dead-lettered (or handled) first
                    if let Err(e) = self.inbox.commit(tx).await {
                        tracing::warn!(error = %e, "the commit of the position failed");
                        return rt.settle(d, Settle::Nack(rt.cfg.retry_delay)).await;
                    }
                    bump(&rt.counters.duplicates);
                    return rt.settle(d, Settle::Ack).await;
                }
                Err(e @ idemgate_core::Error::Fenced { .. }) => {
                    bump(&rt.counters.fenced);
                    tracing::warn!(error = %e, "position fenced; resuming from the stored one");
                    return rt.settle(d, Settle::Reposition).await;
                }
                Err(e) => {
                    if !rt
                        .unavailable("the position update", &e, &mut failures)
                        .await
                    {
                        return rt.settle(d, Settle::Nack(Duration::ZERO)).await;
                    }
                }
            }
        };
        if !rt.dead_letter(d, why, reason).await {
            return false;
        }
        if let Err(e) = self.inbox.commit(tx).await {
            // the partition resumes from the stored position (its next message is fenced) and
            // dead-letters this one again: a second copy, with the same event id
            tracing::warn!(error = %e, "the dead letter is stored, its key and position are not");
        }
        true
    }

    /// One transaction for `batch`: its keys, its positions, the handler for each new message in
    /// order, one commit. `Ok` holds which messages were new; `Err` says why nothing committed.
    async fn run_batch<D: Delivery>(
        &self,
        batch: &[&D],
        keys: &[Key],
    ) -> std::result::Result<Vec<bool>, String> {
        let mut tx = self.inbox.begin().await.map_err(|e| e.to_string())?;
        let firsts = self
            .inbox
            .first_time_many(&mut tx, keys)
            .await
            .map_err(|e| e.to_string())?;
        for d in batch {
            if let Some(position) = &d.message().position {
                self.inbox
                    .advance(&mut tx, position)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        // the new messages' handlers, in order; a panic or a timeout is caught here and rolls
        // the batch back
        for (d, key) in batch
            .iter()
            .zip(keys)
            .zip(&firsts)
            .filter(|(_, first)| **first)
            .map(|(dk, _)| dk)
        {
            let ran = self
                .rt
                .run_handler(key, self.handler.handle(&mut tx, d.message()))
                .await;
            if let Some(error) = self.rt.failure(ran) {
                return Err(error);
            }
        }
        self.inbox.commit(tx).await.map_err(|e| e.to_string())?;
        Ok(firsts)
    }
}

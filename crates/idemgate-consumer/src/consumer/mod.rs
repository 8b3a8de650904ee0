//! The `Consumer`: its builder and its two modes; the runtime lives in the submodules.

mod batcher;
mod gate;
mod inbox;
mod runtime;
mod stats;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use idemgate_core::backend::keep_alive;
use idemgate_core::{Claim, ClaimOptions, Fingerprint, Key, Lease, Outcome, Store, Warning};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::window::{Horizon, WindowCheck, check_window};
use crate::{Delivery, Error, Message, Result, Source};
use idemgate_core::{Inbox, InboxHandler};

/// Extracts a message's key: the event id by default, or a business key (order id + SKU).
/// An `Err` makes the message poison: it is dead-lettered with that reason.
pub type KeyFn = Arc<dyn Fn(&Message) -> std::result::Result<Key, String> + Send + Sync>;

/// Computes a message's fingerprint: the whole payload's by default, or chosen fields' (see
/// [`JsonFields`](idemgate_core::JsonFields)). An `Err` makes the message poison.
pub type FingerprintFn =
    Arc<dyn Fn(&Message) -> std::result::Result<Fingerprint, String> + Send + Sync>;

use self::stats::*;
pub use self::stats::{Stats, StatsHandle};
use self::{batcher::*, gate::*, inbox::*, runtime::*};

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) name: String,
    // the broker, from the source's horizon: a field of the delivery span
    pub(crate) broker: &'static str,
    pub(crate) concurrency: usize,
    // settlements behind the lanes (default: `concurrency`)
    pub(crate) settle_slots: Option<usize>,
    pub(crate) max_attempts: u32,
    pub(crate) retry_delay: Duration,
    pub(crate) busy_delay: Duration,
    pub(crate) lease: Duration,
    pub(crate) handler_timeout: Duration,
    pub(crate) retention: Duration,
    pub(crate) batch: usize,
    // deliveries per inbox transaction
    pub(crate) tx_batch: usize,
    // how often a held delivery's broker timer is extended
    pub(crate) tick: Duration,
    // the broker redelivers an unsettled delivery after a while (NATS, SQS)
    pub(crate) ack_wait: bool,
    // the broker's own delivery budget (SQS maxReceiveCount, NATS MaxDeliver)
    pub(crate) delivery_limit: Option<u32>,
    pub(crate) key: Option<KeyFn>,
    pub(crate) fingerprint: Option<FingerprintFn>,
    pub(crate) horizon: Option<Horizon>,
    pub(crate) strict: bool,
    pub(crate) counters: Arc<Counters>,
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
///   delivery count where it has one (Inbox mode), or earlier, on the last delivery the
///   broker's own budget allows ([`Source::delivery_limit`]): the broker's dead-letter route
///   would carry no reason. A message with an ordering key is retried in
///   place, so the later messages of its key wait behind it; others go back to the broker.
/// - Up to `concurrency` handlers run at once; messages with the same ordering key run one at a
///   time, in order. Claims of messages that are ready together are batched (`claim_many`), and
///   so are their completions (`complete_many`). Completions and acks run behind the handlers,
///   and in Gate mode the next claims run ahead of them, so neither holds a handler's slot.
/// - Inbox mode shares one transaction among the deliveries that are ready together (up to
///   16, `with_batch` on an Inbox-mode consumer), each message's effect under a savepoint of
///   its own: a failing handler costs only its own message.
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
///   their ordering key. When the source fails instead (a lost connection), `run` returns its
///   error once the running handlers finish; the deliveries not yet started are left to the
///   broker, which may have handed them to another consumer already.
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

pub(crate) fn config(name: String) -> Config {
    Config {
        name,
        broker: "unknown",
        concurrency: 8,
        settle_slots: None,
        max_attempts: 5,
        retry_delay: Duration::from_millis(500),
        busy_delay: Duration::from_secs(1),
        lease: Duration::from_secs(30),
        handler_timeout: Duration::from_secs(300),
        retention: Duration::from_secs(7 * 86_400),
        batch: 64,
        // Gate mode takes one delivery at a time: a delivery a lane holds unstarted is not
        // reported in progress to the broker
        tx_batch: 1,
        tick: Duration::from_secs(10),
        ack_wait: false,
        delivery_limit: None,
        key: None,
        fingerprint: None,
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

    /// What [`run`](Self::run) would warn about on `source` (and log at `warn`), to print
    /// before running: a retention shorter than the broker's redelivery window
    /// (`"retention-window"`), a broker's delivery budget not above `max_attempts`
    /// (`"delivery-limit"`).
    pub fn warnings(&self, source: &impl Source) -> Vec<Warning> {
        warnings(&self.cfg, self.cfg.retention, source)
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
            cfg: Config {
                tx_batch: 16,
                ..config(name.into())
            },
            mode: InboxMode(Arc::new(inbox)),
        }
    }

    /// What [`run`](Self::run) would warn about on `source` (and log at `warn`), to print
    /// before running: an inbox retention shorter than the broker's redelivery window
    /// (`"retention-window"`), a broker's delivery budget not above `max_attempts`
    /// (`"delivery-limit"`).
    pub fn warnings(&self, source: &impl Source) -> Vec<Warning> {
        warnings(&self.cfg, self.mode.0.retention(), source)
    }

    /// Up to `n` deliveries that are ready together (on one lane) share one transaction
    /// (default 16; 1 for one transaction per message). Nothing waits for a batch to fill: a
    /// lane takes what has arrived, so a lone message commits at once. One `first_time_many`
    /// for their keys, then in order each message's position and, for a new one, its handler
    /// under a savepoint of its own, one commit, then every ack. Fewer round trips and commits
    /// per message; the handlers' locks are held until the batch commits.
    ///
    /// A failing handler (an error, a panic, the timeout) rolls back to its savepoint only:
    /// the batch commits the rest, and that message alone is retried or dead-lettered, with
    /// the later messages of its ordering key behind it. A failure of the transaction itself
    /// (a lost connection, a fenced position, a failed commit, a savepoint that cannot be
    /// rolled back to: a MySQL deadlock rolls the whole transaction back) rolls the batch back
    /// and its messages run again one per transaction, which is safe: nothing committed. An
    /// inbox without savepoints treats a failing handler that way too.
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

    /// How many settlements run behind the handlers at once (default: `concurrency`): a
    /// completion and its ack in Gate mode, a commit's acks in Inbox mode. In Gate mode this and
    /// `concurrency` bound the crash window: at most `concurrency + n` effects are done and not
    /// yet recorded as complete, so a kill re-runs at most that many where the downstream
    /// system does not honour the derived key. A smaller `n` narrows the window and makes the
    /// handlers wait for the store sooner.
    pub fn with_settle_slots(mut self, n: usize) -> Self {
        self.cfg.settle_slots = Some(n.max(1));
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

    /// The fingerprint from chosen fields instead of the whole payload, so a re-publish that
    /// changes only a timestamp is a duplicate, not a mismatch. With
    /// [`JsonFields`](idemgate_core::JsonFields):
    ///
    /// ```
    /// use idemgate_consumer::Consumer;
    /// use idemgate_core::{JsonFields, MemoryStore};
    ///
    /// let fields = JsonFields::new(["/amount", "/currency"]).unwrap();
    /// let consumer = Consumer::gate("payments", MemoryStore::new())
    ///     .with_fingerprint(move |m| fields.fingerprint(&m.payload).map_err(|e| e.to_string()));
    /// ```
    ///
    /// The key the same way: `.with_key(move |m| order_id.key("orders", &m.payload).map_err(..))`.
    /// A payload the function refuses is dead-lettered as poison.
    pub fn with_fingerprint(
        mut self,
        f: impl Fn(&Message) -> std::result::Result<Fingerprint, String> + Send + Sync + 'static,
    ) -> Self {
        self.cfg.fingerprint = Some(Arc::new(f));
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

/// What `run` warns about on `source`: a retention shorter than the broker's redelivery
/// window, a delivery budget not above `max_attempts`.
fn warnings(cfg: &Config, retention: Duration, source: &impl Source) -> Vec<Warning> {
    window(cfg, retention, source)
        .and_then(|w| w.warning())
        .into_iter()
        .chain(limit_warning(cfg, source))
        .collect()
}

/// `"delivery-limit"`: the broker's own budget leaves no delivery beyond the handler's attempts.
fn limit_warning(cfg: &Config, source: &impl Source) -> Option<Warning> {
    let limit = source.delivery_limit().filter(|l| *l <= cfg.max_attempts)?;
    let message = format!(
        "the broker gives a message at most {limit} deliveries and max_attempts is {}: a \
         consumer that dies during a message's last delivery leaves it to the broker, which \
         dead-letters it without the reason (SQS) or stops delivering it (NATS); set the \
         broker's limit above max_attempts",
        cfg.max_attempts
    );
    Some(Warning::new("delivery-limit", message))
}

/// The window check: the horizon given, else the one the source read from its broker.
fn window(cfg: &Config, retention: Duration, source: &impl Source) -> Option<WindowCheck> {
    let horizon = cfg.horizon.clone().or_else(|| source.horizon())?;
    Some(check_window(retention, horizon))
}

/// The checks at start-up: the window, and the broker's timer.
pub(crate) fn check(cfg: &mut Config, retention: Duration, source: &impl Source) -> Result<()> {
    let timer = source
        .ack_wait()
        .map_or(cfg.lease, |wait| wait.min(cfg.lease));
    cfg.tick = (timer / 3).max(Duration::from_millis(1));
    cfg.ack_wait = source.ack_wait().is_some();
    cfg.delivery_limit = source.delivery_limit();
    if let Some(w) = limit_warning(cfg, source) {
        tracing::warn!(consumer = %cfg.name, code = w.code, "{w}");
    }
    let Some(verdict) = window(cfg, retention, source) else {
        return Ok(());
    };
    cfg.broker = verdict.horizon.broker;
    // 1 when the retention covers the broker's redelivery horizon
    metrics::gauge!("idemgate_consumer_window_ok", "consumer" => cfg.name.clone())
        .set(if verdict.is_ok() { 1.0 } else { 0.0 });
    if verdict.is_ok() {
        tracing::debug!(consumer = %cfg.name, "{verdict}");
    } else if cfg.strict {
        return Err(Error::Window(verdict));
    } else {
        tracing::warn!(consumer = %cfg.name, "{verdict}");
    }
    Ok(())
}

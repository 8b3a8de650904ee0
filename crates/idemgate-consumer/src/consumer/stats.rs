//! What a consumer counts: [`Stats`] and its live view.

use super::*;
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
    /// Keys claimed after another consumer's lease on them ran out (Gate mode): that consumer
    /// stopped or stalled mid-run, and this one runs the handler again.
    pub takeovers: u64,
}

/// A live view of a running consumer's [`Stats`], from [`Consumer::stats_handle`].
#[derive(Clone, Debug)]
pub struct StatsHandle(pub(crate) Arc<Counters>);

impl StatsHandle {
    /// The counts so far.
    pub fn get(&self) -> Stats {
        self.0.snapshot()
    }

    /// Resolves once `done` holds for the counts, checked every 20 ms: a shutdown for
    /// [`Consumer::run`] that stops after a known amount of work.
    ///
    /// ```
    /// # use idemgate_consumer::{Consumer, Message, memory::MemoryBroker};
    /// # use idemgate_core::MemoryStore;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let broker = MemoryBroker::new();
    /// for id in ["evt-1", "evt-2", "evt-1"] {
    ///     broker.send(Message::new("signups", "user-7").with_event_id(id));
    /// }
    /// let consumer = Consumer::gate("emails", MemoryStore::new());
    /// let stats = consumer.stats_handle();
    /// let stats = consumer
    ///     .run(broker.source(), |_msg: Message| async { Ok::<_, String>(()) },
    ///          stats.until(|s| s.handled + s.duplicates == 3))
    ///     .await?;
    /// assert_eq!((stats.handled, stats.duplicates), (2, 1));
    /// # Ok::<(), idemgate_consumer::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn until(
        &self,
        done: impl Fn(&Stats) -> bool + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let counters = Arc::clone(&self.0);
        async move {
            while !done(&counters.snapshot()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Resolves once the consumer has been idle for `quiet` (counted from the first poll): no
    /// delivery received and none being handled. A shutdown for [`Consumer::run`] that drains
    /// a queue and stops. A message the broker redelivers later than `quiet` after it was let
    /// go (a retry delay, an ack wait, a visibility timeout) is left to the next run.
    pub fn idle(&self, quiet: Duration) -> impl Future<Output = ()> + Send + 'static {
        let counters = Arc::clone(&self.0);
        async move {
            let step = (quiet / 4).clamp(Duration::from_millis(1), Duration::from_millis(100));
            let busy = || {
                let received = counters.received.load(Ordering::Relaxed);
                (
                    received,
                    counters.finished.load(Ordering::Relaxed) < received,
                )
            };
            let (mut seen, _) = busy();
            let mut since = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(step).await;
                let (received, handling) = busy();
                if received != seen || handling {
                    (seen, since) = (received, tokio::time::Instant::now());
                } else if since.elapsed() >= quiet {
                    return;
                }
            }
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) in_progress: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) store_retries: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) dead_lettered_poison: AtomicU64,
    pub(crate) dead_lettered_mismatch: AtomicU64,
    pub(crate) dead_lettered_exhausted: AtomicU64,
    pub(crate) dead_letter_failures: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) slow: AtomicU64,
    pub(crate) fenced: AtomicU64,
    pub(crate) settle_failures: AtomicU64,
    pub(crate) takeovers: AtomicU64,
    // the consumer's name, the label of its metrics (set when it runs)
    pub(crate) name: std::sync::OnceLock<Arc<str>>,
    // deliveries a lane is done with (settled, or handed to the settlement behind it)
    pub(crate) finished: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Counts one event of a consumer in its [`Stats`] field and in the metric
/// `idemgate_consumer_total{consumer, event}`, the event named as the field.
macro_rules! count {
    ($owner:expr, $field:ident) => {
        $owner
            .counters
            .add(stringify!($field), &$owner.counters.$field)
    };
}
pub(crate) use count;

impl Counters {
    pub(crate) fn add(&self, event: &'static str, c: &AtomicU64) {
        bump(c);
        metrics::counter!("idemgate_consumer_total", "consumer" => self.label(), "event" => event)
            .increment(1);
    }

    pub(crate) fn label(&self) -> Arc<str> {
        self.name.get().map_or_else(|| Arc::from(""), Arc::clone)
    }

    pub(crate) fn snapshot(&self) -> Stats {
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
            takeovers: get(&self.takeovers),
        }
    }
}

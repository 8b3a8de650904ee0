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
}

/// A live view of a running consumer's [`Stats`], from [`Consumer::stats_handle`].
#[derive(Clone, Debug)]
pub struct StatsHandle(pub(crate) Arc<Counters>);

impl StatsHandle {
    /// The counts so far.
    pub fn get(&self) -> Stats {
        self.0.snapshot()
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
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
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
        }
    }
}

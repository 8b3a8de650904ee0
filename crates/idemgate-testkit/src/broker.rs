//! The scenarios every broker adapter must pass against its real broker: the same event
//! published twice, a redelivery forced by a consumer that dies before its ack, and a handler
//! slower than its lease. Each takes the adapter's sink and sources, so one body of test code
//! serves RabbitMQ, NATS, MQTT, Kafka and SQS.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use idemgate_consumer::{
    Consumer, Delivery, Message, Outgoing, Result, Sink, Source, Stats, StatsHandle,
};
use idemgate_core::{EventId, MemoryStore};

/// Waits until `done(stats)` holds, checking every 20 ms, for at most `limit`.
pub async fn until(
    stats: StatsHandle,
    limit: Duration,
    done: impl Fn(&Stats) -> bool + Send + 'static,
) {
    let _ = tokio::time::timeout(limit, stats.until(done)).await;
}

fn counting(
    effects: &Arc<AtomicUsize>,
) -> impl Fn(Message) -> std::future::Ready<Result<(), String>> + Send + Sync + 'static {
    let effects = Arc::clone(effects);
    move |_m: Message| {
        effects.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(()))
    }
}

/// Publishes 10 events, one of them twice (same event id, `gap` apart: past the broker's own
/// duplicate window where it has one), and consumes them: 10 effects and one duplicate acked
/// without running the handler.
pub async fn published_twice_runs_once<K: Sink, S: Source>(
    sink: &K,
    destination: &str,
    source: S,
    gap: Duration,
) {
    let twice = Outgoing::new(destination, "twice");
    sink.publish(&twice).await.expect("publish");
    for i in 0..9 {
        sink.publish(&Outgoing::new(destination, format!("event {i}")))
            .await
            .expect("publish");
    }
    tokio::time::sleep(gap).await;
    sink.publish(&twice)
        .await
        .expect("re-publish of the same event");
    let effects = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::gate("adapter-suite", MemoryStore::new()).with_concurrency(4);
    let stats = consumer.stats_handle();
    let stats = consumer
        .run(
            source,
            counting(&effects),
            until(stats, Duration::from_secs(20), |s| {
                s.handled + s.duplicates >= 11
            }),
        )
        .await
        .expect("consumer");
    assert_eq!(effects.load(Ordering::SeqCst), 10, "{stats:?}");
    assert_eq!(stats.handled, 10, "{stats:?}");
    assert_eq!(stats.duplicates, 1, "{stats:?}");
}

/// A source whose deliveries never finish their ack: a consumer that dies between completing a
/// key and acking its message.
#[derive(Debug)]
pub struct DiesBeforeAck<S> {
    inner: S,
    acking: Arc<AtomicBool>,
}

impl<S> DiesBeforeAck<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        DiesBeforeAck {
            inner,
            acking: Arc::default(),
        }
    }

    /// Resolves once a delivery has reached its (never finishing) ack: the moment to "kill"
    /// the consumer.
    pub fn reached_ack(&self) -> impl Future<Output = ()> + Send + 'static {
        let acking = Arc::clone(&self.acking);
        async move {
            while !acking.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// A delivery of [`DiesBeforeAck`].
#[derive(Debug)]
pub struct HangingAck<D> {
    inner: D,
    acking: Arc<AtomicBool>,
}

impl<D: Delivery> Delivery for HangingAck<D> {
    fn message(&self) -> &Message {
        self.inner.message()
    }
    async fn ack(self) -> Result<()> {
        self.acking.store(true, Ordering::SeqCst);
        // the process "dies" here: the delivery is held, never acked
        std::future::pending::<()>().await;
        self.inner.ack().await
    }
    async fn nack(self, delay: Duration) -> Result<()> {
        self.inner.nack(delay).await
    }
    async fn dead_letter(self, reason: &str) -> Result<()> {
        self.inner.dead_letter(reason).await
    }
    async fn in_progress(&self) -> Result<()> {
        self.inner.in_progress().await
    }
    async fn reposition(self) -> Result<()> {
        self.inner.reposition().await
    }
}

impl<S: Source> Source for DiesBeforeAck<S> {
    type Delivery = HangingAck<S::Delivery>;
    fn horizon(&self) -> Option<idemgate_consumer::Horizon> {
        self.inner.horizon()
    }
    fn ack_wait(&self) -> Option<Duration> {
        self.inner.ack_wait()
    }

    fn delivery_limit(&self) -> Option<u32> {
        self.inner.delivery_limit()
    }
    async fn recv(&mut self) -> Result<Option<Self::Delivery>> {
        Ok(self.inner.recv().await?.map(|inner| HangingAck {
            inner,
            acking: Arc::clone(&self.acking),
        }))
    }
}

/// The first consumer handles an event and dies before its ack (`kill` closes its connection);
/// the broker redelivers to `second`, which acks it as a duplicate without running the handler.
pub async fn dropped_before_ack_is_redelivered_not_rerun<K, S1, S2, Kill, Next>(
    sink: &K,
    destination: &str,
    first: S1,
    kill: Kill,
    second: Next,
) where
    K: Sink,
    S1: Source,
    S2: Source,
    Kill: Future<Output = ()>,
    Next: Future<Output = S2>,
{
    let store = Arc::new(MemoryStore::new());
    let effects = Arc::new(AtomicUsize::new(0));
    sink.publish(&Outgoing::with_event_id(
        destination,
        "once",
        EventId::new(),
    ))
    .await
    .expect("publish");
    let first = DiesBeforeAck::new(first);
    let wait = first.reached_ack();
    let consumer = Consumer::gate("adapter-suite", Arc::clone(&store));
    let run = consumer.run(first, counting(&effects), std::future::pending());
    tokio::select! {
        _ = run => panic!("the first consumer stopped on its own"),
        () = wait => {}
        () = tokio::time::sleep(Duration::from_secs(20)) => panic!("the first consumer never got to its ack"),
    }
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    // the consumer is dropped with its unacked delivery; its connection goes
    kill.await;
    let consumer = Consumer::gate("adapter-suite", store);
    let handle = consumer.stats_handle();
    let stats = consumer
        .run(
            second.await,
            counting(&effects),
            until(handle, Duration::from_secs(30), |s| s.duplicates >= 1),
        )
        .await
        .expect("second consumer");
    assert_eq!(
        stats.duplicates, 1,
        "the redelivery was recognised: {stats:?}"
    );
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "and not run again: {stats:?}"
    );
}

/// A handler that runs 4× longer than its lease (and longer than the broker's ack wait, where
/// the caller set a short one) while a duplicate arrives (`gap` after the first): the lease is
/// renewed and the broker told the message is in progress, the duplicate is held until the
/// first completes and then acked, and the effect happens once.
pub async fn slower_than_lease_runs_once<K: Sink, S: Source>(
    sink: &K,
    destination: &str,
    source: S,
    gap: Duration,
) {
    let run_for = Duration::from_millis(1200) + gap;
    let lease = Duration::from_millis(300);
    slow_run_with_a_duplicate(sink, destination, source, gap, run_for, lease).await;
}

/// Publishes one event and its copy `gap` later, handled for `run_for` under `lease`: one
/// effect, one duplicate.
async fn slow_run_with_a_duplicate<K: Sink, S: Source>(
    sink: &K,
    destination: &str,
    source: S,
    gap: Duration,
    run_for: Duration,
    lease: Duration,
) -> Stats {
    let effects = Arc::new(AtomicUsize::new(0));
    let e = Arc::clone(&effects);
    let handler = move |_m: Message| {
        let e = Arc::clone(&e);
        async move {
            tokio::time::sleep(run_for).await;
            e.fetch_add(1, Ordering::SeqCst);
            Ok::<(), String>(())
        }
    };
    let slow = Outgoing::new(destination, "slow");
    sink.publish(&slow).await.expect("publish");
    let consumer = Consumer::gate("adapter-suite", MemoryStore::new())
        .with_concurrency(2)
        .with_lease(lease)
        .with_busy_delay(Duration::from_millis(100));
    let handle = consumer.stats_handle();
    let republish = async {
        tokio::time::sleep(gap).await;
        sink.publish(&slow).await.expect("publish the duplicate");
    };
    let run = consumer.run(
        source,
        handler,
        until(handle, Duration::from_secs(30), |s| {
            s.handled + s.duplicates >= 2
        }),
    );
    let (stats, ()) = tokio::join!(run, republish);
    let stats = stats.expect("consumer");
    assert_eq!(effects.load(Ordering::SeqCst), 1, "{stats:?}");
    assert_eq!((stats.handled, stats.duplicates), (1, 1), "{stats:?}");
    stats
}

/// The next delivery of `source` within `limit`; panics saying `what` was expected if none comes.
pub async fn next<S: Source>(source: &mut S, limit: Duration, what: &str) -> S::Delivery {
    match tokio::time::timeout(limit, source.recv()).await {
        Ok(Ok(Some(d))) => d,
        Ok(Ok(None)) => panic!("{what}: the source ended"),
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: nothing within {limit:?}"),
    }
}

/// A dead letter the broker could not store fails, and the original is not acked: `source`
/// delivers it again. Publish one message with `payload` first, to a source whose dead-letter
/// destination takes nothing.
pub async fn refused_dead_letter_keeps_the_original<S: Source>(mut source: S, payload: &[u8]) {
    let d = next(&mut source, Duration::from_secs(10), "the message").await;
    let dead = d.dead_letter("always fails").await;
    assert!(dead.is_err(), "a dead letter that went nowhere succeeded");
    let again = next(&mut source, Duration::from_secs(10), "the original back").await;
    assert_eq!(&again.message().payload[..], payload);
    again.ack().await.expect("ack");
}

/// A message without an event id is dead-lettered, with the reason, and not handled.
pub async fn poison_is_dead_lettered<S: Source>(source: S) {
    let effects = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::gate("adapter-suite", MemoryStore::new());
    let handle = consumer.stats_handle();
    let stats = consumer
        .run(
            source,
            counting(&effects),
            until(handle, Duration::from_secs(20), |s| s.dead_lettered >= 1),
        )
        .await
        .expect("consumer");
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(effects.load(Ordering::SeqCst), 0);
}

/// A handler that always fails, on a source whose broker gives a message `limit` deliveries,
/// fewer than the consumer's `max_attempts` (5): the consumer dead-letters it itself, with its
/// reason, on the last delivery, after `limit` runs, rather than leave it to the broker's own
/// dead-letter route (which carries no reason) or to sit undelivered.
pub async fn failing_past_the_delivery_limit_is_dead_lettered<K: Sink, S: Source>(
    sink: &K,
    destination: &str,
    source: S,
    limit: u32,
) {
    assert_eq!(source.delivery_limit(), Some(limit), "the broker's limit");
    sink.publish(&Outgoing::new(destination, "always fails"))
        .await
        .expect("publish");
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        move |_m: Message| {
            runs.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err::<(), _>("always fails"))
        }
    };
    let consumer = Consumer::gate("adapter-suite", MemoryStore::new())
        .with_retry_delay(Duration::from_millis(100));
    let warned = consumer.warnings(&source);
    assert!(
        warned.iter().any(|w| w.code == "delivery-limit"),
        "{warned:?}"
    );
    let handle = consumer.stats_handle();
    let stats = consumer
        .run(
            source,
            handler,
            until(handle, Duration::from_secs(30), |s| s.dead_lettered >= 1),
        )
        .await
        .expect("consumer");
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), limit as usize, "{stats:?}");
}

/// The store fails every claim for `outage`, several times the broker's delivery budget (its
/// `MaxDeliver` or `maxReceiveCount` × the consumer's retry delay of 100 ms): the deliveries are
/// held and the broker told they are in progress, none is redelivered or dead-lettered, and
/// every event is handled once the store is back. Give `source` a delivery budget of about 5
/// and an ack wait (visibility timeout) of a few seconds.
pub async fn store_outage_loses_nothing<K: Sink, S: Source>(
    sink: &K,
    destination: &str,
    source: S,
    outage: Duration,
) {
    use crate::fault::{Fault, FaultStore, Op};
    let store = Arc::new(FaultStore::new(MemoryStore::new()));
    store.add(Op::Claim, Fault::FailBefore, 0, None);
    for i in 0..3 {
        sink.publish(&Outgoing::new(destination, format!("event {i}")))
            .await
            .expect("publish");
    }
    let effects = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::gate("adapter-suite", Arc::clone(&store))
        .with_concurrency(4)
        .with_retry_delay(Duration::from_millis(100));
    let handle = consumer.stats_handle();
    let restore = {
        let store = Arc::clone(&store);
        async move {
            tokio::time::sleep(outage).await;
            store.clear();
        }
    };
    let run = consumer.run(
        source,
        counting(&effects),
        until(handle, outage + Duration::from_secs(30), |s| s.handled >= 3),
    );
    let (stats, ()) = tokio::join!(run, restore);
    let stats = stats.expect("consumer");
    assert!(store.injected() >= 3, "the outage struck: {stats:?}");
    assert!(stats.store_retries >= 3, "{stats:?}");
    assert_eq!(stats.handled, 3, "{stats:?}");
    assert_eq!(effects.load(Ordering::SeqCst), 3, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    // held, not nacked: the broker never handed a message out again
    assert_eq!(stats.received, 3, "{stats:?}");
}

/// A duplicate arrives (`gap` after the first) while its key's handler runs for 3 s: it is held
/// until the first completes and then acked, never nacked into the broker's delivery budget
/// (give `source` a budget of about 5) and never dead-lettered.
pub async fn busy_key_waits_without_using_the_delivery_budget<K: Sink, S: Source>(
    sink: &K,
    destination: &str,
    source: S,
    gap: Duration,
) {
    let (run_for, lease) = (Duration::from_secs(3), Duration::from_secs(1));
    let stats = slow_run_with_a_duplicate(sink, destination, source, gap, run_for, lease).await;
    assert!(
        stats.in_progress >= 1,
        "the duplicate found its key busy: {stats:?}"
    );
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(stats.received, 2, "held, not redelivered: {stats:?}");
}

/// Ten messages of one ordering key, and ten of another; the first run of the third message of
/// each key fails. Each key's effects are applied exactly once each, in publish order: the
/// messages behind a failing one wait for its retry.
pub async fn order_per_key_survives_a_retry<K: Sink, S: Source>(
    sink: &K,
    destination: &str,
    source: S,
) {
    for i in 0..10 {
        for key in ["a", "b"] {
            let out = Outgoing::new(destination, format!("{key}{i}")).with_ordering_key(key);
            sink.publish(&out).await.expect("publish");
        }
    }
    let applied = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let failed = Arc::new(std::sync::Mutex::new(
        std::collections::HashSet::<String>::new(),
    ));
    let handler = {
        let (applied, failed) = (Arc::clone(&applied), Arc::clone(&failed));
        move |m: Message| {
            let payload = String::from_utf8_lossy(&m.payload).into_owned();
            let fail = payload.ends_with('2') && failed.lock().unwrap().insert(payload.clone());
            if !fail {
                applied.lock().unwrap().push(payload);
            }
            std::future::ready(if fail { Err("first run fails") } else { Ok(()) })
        }
    };
    let consumer = Consumer::gate("adapter-suite", MemoryStore::new())
        .with_concurrency(4)
        .with_retry_delay(Duration::from_millis(100));
    let handle = consumer.stats_handle();
    let stats = consumer
        .run(
            source,
            handler,
            until(handle, Duration::from_secs(30), |s| s.handled >= 20),
        )
        .await
        .expect("consumer");
    assert_eq!(stats.handled, 20, "{stats:?}");
    assert_eq!(stats.retried, 2, "{stats:?}");
    let applied = applied.lock().unwrap().clone();
    for key in ["a", "b"] {
        let order: Vec<&String> = applied.iter().filter(|p| p.starts_with(key)).collect();
        let expected: Vec<String> = (0..10).map(|i| format!("{key}{i}")).collect();
        assert_eq!(
            order,
            expected.iter().collect::<Vec<_>>(),
            "key {key} out of order"
        );
    }
}

/// A handler that never finishes is cut off at the handler timeout: each run counts as a failed
/// attempt, and after `max_attempts` (2) the message is dead-lettered with the reason, so its
/// lease and the broker's timer are not renewed for ever.
pub async fn stuck_handler_times_out<K: Sink, S: Source>(sink: &K, destination: &str, source: S) {
    sink.publish(&Outgoing::new(destination, "stuck"))
        .await
        .expect("publish");
    let consumer = Consumer::gate("adapter-suite", MemoryStore::new())
        .with_handler_timeout(Duration::from_millis(300))
        .with_max_attempts(2)
        .with_retry_delay(Duration::from_millis(50));
    let handle = consumer.stats_handle();
    let stats = consumer
        .run(
            source,
            |_m: Message| std::future::pending::<Result<(), String>>(),
            until(handle, Duration::from_secs(20), |s| s.dead_lettered >= 1),
        )
        .await
        .expect("consumer");
    assert_eq!(stats.timed_out, 2, "{stats:?}");
    assert_eq!(stats.dead_lettered_exhausted, 1, "{stats:?}");
}

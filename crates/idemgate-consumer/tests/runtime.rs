//! The runtime's semantics on the in-process broker: duplicates, redeliveries, slow handlers,
//! poison, mismatches, retries, ordering and shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemgate_consumer::memory::MemoryBroker;
use idemgate_consumer::{Consumer, Message, Stats};
use idemgate_core::{MemoryStore, Store};
use idemgate_testkit::broker::DiesBeforeAck;
use idemgate_testkit::fault::{Fault, FaultStore, Op};

fn event(id: &str, payload: &str) -> Message {
    Message::new("orders", payload.to_owned()).with_event_id(id)
}

/// Runs a gate consumer over `broker` until the broker is closed and drained.
async fn run_gate<St, F, Fut>(broker: &MemoryBroker, store: St, handler: F) -> Stats
where
    St: Store,
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
{
    Consumer::gate("orders", store)
        .with_retry_delay(Duration::from_millis(5))
        .with_busy_delay(Duration::from_millis(20))
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap()
}

type Ready = std::future::Ready<std::result::Result<(), String>>;

/// A handler that counts its runs.
fn counting() -> (
    Arc<AtomicUsize>,
    impl Fn(Message) -> Ready + Clone + Send + Sync + 'static,
) {
    let n = Arc::new(AtomicUsize::new(0));
    let m = Arc::clone(&n);
    (n, move |_msg: Message| {
        m.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(()))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_twice_runs_once() {
    let broker = MemoryBroker::new();
    for _ in 0..2 {
        for i in 0..50 {
            broker.send(event(&format!("e-{i}"), "{}"));
        }
    }
    broker.close();
    let (effects, handler) = counting();
    let stats = run_gate(&broker, MemoryStore::new(), handler).await;
    assert_eq!(effects.load(Ordering::SeqCst), 50);
    assert_eq!(stats.handled, 50);
    assert_eq!(stats.duplicates, 50, "{stats:?}");
    assert!(broker.dead_letters().is_empty());
}

/// The Gate's window: while the store holds a completion, at most `concurrency` finished
/// effects wait for a settle slot and `settle_slots` are being completed; no handler runs past
/// that, so a kill re-runs at most `concurrency + settle_slots` effects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_effects_waiting_for_their_completion_are_bounded() {
    let broker = MemoryBroker::new();
    for i in 0..20 {
        broker.send(event(&format!("e-{i}"), "{}"));
    }
    broker.close();
    // the first completion takes 3 s, the others none
    let store = FaultStore::new(MemoryStore::new()).inject(
        Op::Complete,
        Fault::Delay(Duration::from_secs(3)),
        1,
    );
    let (effects, handler) = counting();
    let consumer = Consumer::gate("orders", store)
        .with_concurrency(2)
        .with_settle_slots(1);
    let stats = consumer.stats_handle();
    let run = tokio::spawn(consumer.run(broker.source(), handler, std::future::pending()));
    let window = async {
        while effects.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), window)
        .await
        .expect("three effects ran while the first completion was held");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        (effects.load(Ordering::SeqCst), stats.get().handled),
        (3, 0),
        "2 finished effects wait for the settle slot, 1 is being completed, none ran past them"
    );
    let stats = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the consumer drained the broker")
        .unwrap()
        .unwrap();
    assert_eq!((stats.handled, effects.load(Ordering::SeqCst)), (20, 20));
}

/// A source that fails (its connection lost) after handing out `left` deliveries.
struct LosesItsConnection {
    inner: idemgate_consumer::memory::MemorySource,
    left: usize,
}

impl idemgate_consumer::Source for LosesItsConnection {
    type Delivery = idemgate_consumer::memory::MemoryDelivery;

    async fn recv(&mut self) -> idemgate_consumer::Result<Option<Self::Delivery>> {
        if self.left == 0 {
            // the connection goes while the lane runs a message
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(idemgate_consumer::Error::Broker {
                broker: "test",
                message: "the connection was lost".into(),
                source: None,
            });
        }
        self.left -= 1;
        self.inner.recv().await
    }
}

/// When the source fails, the deliveries a lane has not started are not handled: the broker
/// has them again (and may have handed them to another consumer, where handling them here
/// would put an ordering key's later message first). The one running finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_leaves_queued_deliveries_to_the_broker() {
    let broker = MemoryBroker::new();
    for i in 0..5 {
        broker.send(event(&format!("e-{i}"), "{}").with_ordering_key("account-1"));
    }
    let effects = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&effects);
    let handler = move |msg: Message| {
        let seen = Arc::clone(&seen);
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            seen.lock()
                .unwrap()
                .push(msg.event_id.clone().unwrap_or_default());
            Ok::<(), String>(())
        }
    };
    let source = LosesItsConnection {
        inner: broker.source(),
        left: 5,
    };
    let consumer = Consumer::gate("orders", MemoryStore::new()).with_concurrency(1);
    let ran = tokio::time::timeout(
        Duration::from_secs(10),
        consumer.run(source, handler, std::future::pending()),
    )
    .await
    .expect("run returned");
    assert!(ran.is_err(), "the source's failure is run's error");
    // the source hands out e-4 when the lane takes e-3 (a lane holds one delivery), then fails
    // while e-3 runs: e-4 waits in the lane, unstarted
    let effects = effects.lock().unwrap().clone();
    assert_eq!(effects, ["e-0", "e-1", "e-2", "e-3"], "e-4 had not started");
    assert_eq!(broker.queued(), 1, "e-4 is the broker's again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_dropped_before_its_ack_is_redelivered_and_not_rerun() {
    let broker = MemoryBroker::new();
    broker.send(event("e-1", "{}"));
    let store = Arc::new(MemoryStore::new());
    let (effects, handler) = counting();
    let source = DiesBeforeAck::new(broker.source());
    let first = Consumer::gate("orders", Arc::clone(&store)).run(
        source,
        handler.clone(),
        std::future::pending(),
    );
    // the first consumer completes the key and hangs in its ack; then it dies
    let _ = tokio::time::timeout(Duration::from_millis(300), first).await;
    // its lanes are aborted on their worker threads: wait until they have let go of the delivery
    for _ in 0..500 {
        if broker.in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(
        broker.queued(),
        1,
        "the dropped delivery went back to the broker"
    );
    broker.close();
    let stats = run_gate(&broker, store, handler).await;
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the redelivery did not run again"
    );
    assert_eq!(stats.duplicates, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_its_lease_keeps_it_and_runs_once() {
    let broker = MemoryBroker::new();
    let effects = Arc::new(AtomicUsize::new(0));
    let e = Arc::clone(&effects);
    let handler = move |_m: Message| {
        let e = Arc::clone(&e);
        async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            e.fetch_add(1, Ordering::SeqCst);
            Ok::<(), String>(())
        }
    };
    // the duplicate arrives while the first copy runs, long after the lease's first expiry
    broker.send(event("slow", "{}"));
    let b = broker.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        b.send(event("slow", "{}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.close();
    });
    let stats = Consumer::gate("orders", MemoryStore::new())
        .with_lease(Duration::from_millis(150))
        .with_busy_delay(Duration::from_millis(50))
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    assert_eq!(effects.load(Ordering::SeqCst), 1, "{stats:?}");
    assert!(
        stats.in_progress >= 1,
        "the duplicate found the key held: {stats:?}"
    );
    assert_eq!(
        stats.duplicates, 1,
        "and was acked once the first completed: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_mismatched_messages_are_dead_lettered_with_their_reason() {
    let broker = MemoryBroker::new();
    broker.send(Message::new("orders", "no id"));
    broker.send(event("e-1", "amount=10"));
    broker.close();
    let store = Arc::new(MemoryStore::new());
    let (effects, handler) = counting();
    let first = run_gate(&broker, Arc::clone(&store), handler.clone()).await;
    assert_eq!((first.dead_lettered, first.dead_lettered_poison), (1, 1));
    // the same id with another payload, after the first was handled
    let broker2 = MemoryBroker::new();
    broker2.send(event("e-1", "amount=99"));
    broker2.close();
    let stats = run_gate(&broker2, store, handler).await;
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.dead_lettered_mismatch, 1);
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.contains("no event id"), "{}", dead[0].1);
    let dead2 = broker2.dead_letters();
    assert!(dead2[0].1.contains("mismatch"), "{}", dead2[0].1);
    assert_eq!(dead2[0].0.payload, "amount=99");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_is_retried_then_dead_lettered_and_a_panic_counts_as_a_failure() {
    let broker = MemoryBroker::new();
    broker.send(event("flaky", "{}"));
    broker.send(event("broken", "{}"));
    broker.send(event("panics", "{}"));
    broker.close();
    let runs = Arc::new(Mutex::new(Vec::new()));
    let r = Arc::clone(&runs);
    let handler = move |m: Message| {
        let r = Arc::clone(&r);
        async move {
            let id = m.event_id.clone().unwrap_or_default();
            let n = {
                let mut runs = r.lock().unwrap();
                runs.push(id.clone());
                runs.iter().filter(|x| **x == id).count()
            };
            match id.as_str() {
                "flaky" if n < 3 => Err(format!("flaky failure {n}")),
                "broken" => Err("always broken".to_owned()),
                "panics" => panic!("handler bug"),
                _ => Ok(()),
            }
        }
    };
    let stats = Consumer::gate("orders", MemoryStore::new())
        .with_max_attempts(4)
        .with_retry_delay(Duration::from_millis(5))
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    let runs = runs.lock().unwrap().clone();
    let count = |id: &str| runs.iter().filter(|x| *x == id).count();
    assert_eq!(count("flaky"), 3, "succeeds on its third run");
    assert_eq!(count("broken"), 4, "max_attempts runs");
    assert_eq!(count("panics"), 4);
    assert_eq!(stats.handled, 1);
    assert_eq!(stats.dead_lettered, 2);
    assert_eq!(stats.dead_lettered_exhausted, 2);
    let dead = broker.dead_letters();
    let reason = |id: &str| {
        dead.iter()
            .find(|(m, _)| m.event_id.as_deref() == Some(id))
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    assert!(reason("broken").contains("failed 4 times; last error: always broken"));
    assert!(reason("panics").contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_with_one_ordering_key_run_one_at_a_time_in_order() {
    let broker = MemoryBroker::new();
    for i in 0..40 {
        let account = if i % 2 == 0 { "acct-a" } else { "acct-b" };
        broker.send(event(&format!("e-{i}"), &i.to_string()).with_ordering_key(account));
    }
    broker.close();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let handler = move |m: Message| {
        let s = Arc::clone(&s);
        async move {
            // a little work, so that concurrent lanes interleave
            tokio::time::sleep(Duration::from_millis(2)).await;
            let n: u32 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            s.lock().unwrap().push((m.ordering_key.clone().unwrap(), n));
            Ok::<(), String>(())
        }
    };
    Consumer::gate("orders", MemoryStore::new())
        .with_concurrency(8)
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    for account in ["acct-a", "acct-b"] {
        let order: Vec<u32> = seen
            .iter()
            .filter(|(a, _)| a == account)
            .map(|(_, n)| *n)
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "{account} in order");
        assert_eq!(order.len(), 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_and_acks_what_is_in_flight() {
    let broker = MemoryBroker::new();
    for i in 0..4 {
        broker.send(event(&format!("e-{i}"), "{}"));
    }
    let effects = Arc::new(AtomicUsize::new(0));
    let e = Arc::clone(&effects);
    let handler = move |_m: Message| {
        let e = Arc::clone(&e);
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            e.fetch_add(1, Ordering::SeqCst);
            Ok::<(), String>(())
        }
    };
    let stats = Consumer::gate("orders", MemoryStore::new())
        .with_concurrency(4)
        .run(
            broker.source(),
            handler,
            tokio::time::sleep(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    // received before the shutdown: finished and acked, nothing left in flight
    assert_eq!(stats.handled, stats.received);
    assert_eq!(effects.load(Ordering::SeqCst) as u64, stats.handled);
    assert_eq!(broker.in_flight(), 0);
    assert_eq!(broker.queued() as u64, 4 - stats.received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_key_dedups_different_events_of_the_same_fact() {
    let broker = MemoryBroker::new();
    // two producers published the same reservation under different event ids
    broker.send(event("e-1", "order-7:sku-1"));
    broker.send(event("e-2", "order-7:sku-1"));
    broker.send(event("e-3", "order-7:sku-2"));
    broker.close();
    let (effects, handler) = counting();
    let stats = Consumer::gate("reservations", MemoryStore::new())
        .with_key(|m: &Message| {
            let body = std::str::from_utf8(&m.payload).map_err(|e| e.to_string())?;
            let (order, sku) = body.split_once(':').ok_or("no order:sku")?;
            idemgate_core::Key::compose("reservations", [order, sku]).map_err(|e| e.to_string())
        })
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    assert_eq!(effects.load(Ordering::SeqCst), 2);
    assert_eq!(stats.duplicates, 1);
}

/// A fingerprint of chosen JSON fields: a re-publish that changes only its timestamp is a
/// duplicate (acked, not run), one that changes the amount is a mismatch, and a payload without
/// the key's field is poison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_fields_pick_the_key_and_the_fingerprint() {
    use idemgate_core::JsonFields;
    let broker = MemoryBroker::new();
    let msg = |p: &str| Message::new("payments", p.to_owned());
    broker.send(msg(r#"{"payment":"p-1","amount":10,"sent_at":"10:00"}"#));
    broker.send(msg(r#"{"sent_at":"10:05","amount":10,"payment":"p-1"}"#));
    broker.send(msg(r#"{"payment":"p-1","amount":99,"sent_at":"10:06"}"#));
    broker.send(msg(r#"{"amount":5}"#));
    broker.close();
    let (effects, handler) = counting();
    let (key, fp) = (
        JsonFields::new(["/payment"]).unwrap(),
        JsonFields::new(["/amount"]).unwrap(),
    );
    let stats = Consumer::gate("payments", MemoryStore::new())
        .with_key(move |m: &Message| key.key("payments", &m.payload).map_err(|e| e.to_string()))
        .with_fingerprint(move |m: &Message| fp.fingerprint(&m.payload).map_err(|e| e.to_string()))
        .with_concurrency(1)
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    assert_eq!(effects.load(Ordering::SeqCst), 1, "{stats:?}");
    assert_eq!(stats.duplicates, 1, "{stats:?}");
    assert_eq!(
        (stats.dead_lettered_mismatch, stats.dead_lettered_poison),
        (1, 1),
        "{stats:?}"
    );
    let dead = broker.dead_letters();
    assert!(dead.iter().any(|d| d.1.contains("no /payment")), "{dead:?}");
}

/// A source whose broker has nowhere to put a dead letter.
struct NoDeadLetters<S>(S);

struct Kept<D>(D);

impl<D: idemgate_consumer::Delivery> idemgate_consumer::Delivery for Kept<D> {
    fn message(&self) -> &Message {
        self.0.message()
    }
    async fn ack(self) -> idemgate_consumer::Result<()> {
        self.0.ack().await
    }
    async fn nack(self, delay: Duration) -> idemgate_consumer::Result<()> {
        self.0.nack(delay).await
    }
    async fn dead_letter(self, _reason: &str) -> idemgate_consumer::Result<()> {
        // kept: back to the queue, as the adapters do when the dead letter went nowhere
        self.0.nack(Duration::from_millis(5)).await?;
        Err(idemgate_consumer::Error::Broker {
            broker: "test",
            message: "no dead-letter destination".into(),
            source: None,
        })
    }
    async fn in_progress(&self) -> idemgate_consumer::Result<()> {
        self.0.in_progress().await
    }
}

impl<S: idemgate_consumer::Source> idemgate_consumer::Source for NoDeadLetters<S> {
    type Delivery = Kept<S::Delivery>;
    fn horizon(&self) -> Option<idemgate_consumer::Horizon> {
        self.0.horizon()
    }
    async fn recv(&mut self) -> idemgate_consumer::Result<Option<Self::Delivery>> {
        Ok(self.0.recv().await?.map(Kept))
    }
}

/// A dead letter the broker could not store is not counted as dead-lettered: it is a failure,
/// and the message is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_went_nowhere_is_counted_as_a_failure() {
    let broker = MemoryBroker::new();
    broker.send(Message::new("orders", "no id"));
    let consumer = Consumer::gate("orders", MemoryStore::new());
    let stats = consumer.stats_handle();
    let run = tokio::spawn(consumer.run(
        NoDeadLetters(broker.source()),
        |_m: Message| async { Ok::<_, String>(()) },
        std::future::pending(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stats.get().dead_letter_failures < 3 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", stats.get());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    run.abort();
    let s = stats.get();
    assert_eq!(
        s.dead_lettered, 0,
        "a dead letter that went nowhere was counted: {s:?}"
    );
    assert!(broker.dead_letters().is_empty());
}

/// A handler that never returns is cut off at the handler timeout: the run counts as a failed
/// attempt, is retried, and is dead-lettered with the reason; the other messages go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_handler_times_out_and_is_dead_lettered() {
    let broker = MemoryBroker::new();
    broker.send(event("stuck", "{}"));
    broker.send(event("fine", "{}"));
    broker.close();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&runs);
    let handler = move |m: Message| {
        let r = Arc::clone(&r);
        async move {
            if m.event_id.as_deref() == Some("stuck") {
                r.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            Ok::<_, String>(())
        }
    };
    let stats = tokio::time::timeout(
        Duration::from_secs(20),
        Consumer::gate("orders", MemoryStore::new())
            .with_handler_timeout(Duration::from_millis(100))
            .with_max_attempts(3)
            .with_retry_delay(Duration::from_millis(5))
            .run(broker.source(), handler, std::future::pending()),
    )
    .await
    .expect("a stuck handler held the consumer")
    .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 3, "max_attempts runs");
    assert_eq!(stats.timed_out, 3);
    assert_eq!(stats.handled, 1);
    assert_eq!(stats.dead_lettered_exhausted, 1);
    let dead = broker.dead_letters();
    assert!(dead[0].1.contains("timed out"), "{}", dead[0].1);
}

/// A finished run whose completion is slow (its batch, a slow store) keeps its lease renewed
/// until the completion lands: no other claim takes the key over meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_completion_keeps_its_lease() {
    use idemgate_core::{Claim, ClaimOptions, Key};
    use idemgate_testkit::fault::{Fault, FaultStore, Op};

    let store = Arc::new(FaultStore::new(MemoryStore::new()));
    // the first completion takes three leases
    store.add(
        Op::Complete,
        Fault::Delay(Duration::from_millis(900)),
        0,
        Some(1),
    );
    let broker = MemoryBroker::new();
    broker.send(event("slow-complete", "{}"));
    broker.close();
    let consumer =
        Consumer::gate("orders", Arc::clone(&store)).with_lease(Duration::from_millis(300));
    let run = tokio::spawn(consumer.run(
        broker.source(),
        |_m: Message| async { Ok::<_, String>(()) },
        std::future::pending(),
    ));
    tokio::time::sleep(Duration::from_millis(650)).await;
    let key = Key::new("orders", "slow-complete").unwrap();
    let claim = store
        .inner()
        .claim(
            &key,
            None,
            &ClaimOptions::with_lease(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert!(
        matches!(claim, Claim::InProgress { .. }),
        "the lease ran out while the completion waited: {claim:?}"
    );
    let stats = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the consumer ended")
        .unwrap()
        .unwrap();
    assert_eq!((stats.handled, stats.fenced), (1, 0), "{stats:?}");
}

#[tokio::test]
async fn an_ordering_key_keeps_its_order_across_a_retry() {
    let broker = MemoryBroker::new();
    idemgate_testkit::broker::order_per_key_survives_a_retry(&broker, "orders", broker.source())
        .await;
}

/// A dead-lettered key is remembered as a stored failure: a producer's re-publish of the same
/// event is acked as a duplicate, and the dead-letter destination holds the event once.
#[tokio::test]
async fn a_copy_of_a_dead_lettered_event_is_not_dead_lettered_again() {
    let broker = MemoryBroker::new();
    broker.send(event("broken", "{}"));
    let runs = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&runs);
    let handler = move |_m: Message| {
        r.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err::<(), _>("always broken"))
    };
    let consumer = Consumer::gate("orders", MemoryStore::new())
        .with_max_attempts(2)
        .with_retry_delay(Duration::from_millis(5));
    let handle = consumer.stats_handle();
    let copy = {
        let broker = broker.clone();
        let handle = handle.clone();
        async move {
            idemgate_testkit::broker::until(handle.clone(), Duration::from_secs(10), |s| {
                s.dead_lettered >= 1
            })
            .await;
            broker.send(event("broken", "{}"));
            idemgate_testkit::broker::until(handle, Duration::from_secs(10), |s| s.duplicates >= 1)
                .await;
            broker.close();
        }
    };
    let (stats, ()) = tokio::join!(
        consumer.run(broker.source(), handler, std::future::pending()),
        copy
    );
    let stats = stats.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2, "{stats:?}");
    assert_eq!((stats.dead_lettered, stats.duplicates), (1, 1), "{stats:?}");
    assert_eq!(broker.dead_letters().len(), 1);
}

/// A retention shorter than the broker's horizon is returned as a warning (not only logged),
/// and refused under `with_strict`.
#[tokio::test]
async fn a_short_retention_is_a_returned_warning() {
    use idemgate_consumer::Horizon;
    let horizon = Horizon {
        broker: "memory",
        redelivery: Duration::from_secs(86_400),
        basis: "a day".into(),
    };
    let broker = MemoryBroker::new();
    let short = Consumer::gate("orders", MemoryStore::new())
        .with_retention(Duration::from_secs(3600))
        .with_horizon(horizon.clone());
    let warnings = short.warnings(&broker.source());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].code, "retention-window");
    assert!(
        warnings[0].to_string().contains("SHORTER"),
        "{}",
        warnings[0]
    );
    let long = Consumer::gate("orders", MemoryStore::new())
        .with_retention(Duration::from_secs(2 * 86_400))
        .with_horizon(horizon.clone());
    assert!(long.warnings(&broker.source()).is_empty());
    broker.close();
    let refused = short
        .with_strict(true)
        .run(broker.source(), counting().1, std::future::pending())
        .await;
    assert!(matches!(refused, Err(idemgate_consumer::Error::Window(_))));
}

/// `StatsHandle::idle` stops a consumer that has drained its queue, after every message was
/// handled: the broker is never closed, so only the idle shutdown can end the run.
#[tokio::test]
async fn idle_stops_a_drained_consumer() {
    let broker = MemoryBroker::new();
    for i in 0..20 {
        broker.send(event(&format!("evt-{i}"), "x"));
    }
    let (runs, handler) = counting();
    let slow = move |m: Message| {
        let handler = handler.clone();
        async move {
            // slower than the idle period's step: a running handler is not idle
            tokio::time::sleep(Duration::from_millis(60)).await;
            handler(m).await
        }
    };
    let consumer = Consumer::gate("orders", MemoryStore::new()).with_concurrency(2);
    let idle = consumer.stats_handle().idle(Duration::from_millis(50));
    let stats = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(broker.source(), slow, idle),
    )
    .await
    .expect("the idle shutdown fired")
    .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 20);
    assert_eq!(stats.handled, 20, "{stats:?}");
}

/// `StatsHandle::until` stops a consumer once the counts say so.
#[tokio::test]
async fn until_stops_on_the_counts() {
    let broker = MemoryBroker::new();
    for id in ["a", "b", "a", "c"] {
        broker.send(event(id, "x"));
    }
    let (runs, handler) = counting();
    let consumer = Consumer::gate("orders", MemoryStore::new());
    let done = consumer
        .stats_handle()
        .until(|s| s.handled + s.duplicates == 4);
    let stats = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(broker.source(), handler, done),
    )
    .await
    .expect("the shutdown fired")
    .unwrap();
    assert_eq!((stats.handled, stats.duplicates), (3, 1));
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// `shutdown::signal` resolves on SIGTERM: a consumer stops and returns its stats.
#[cfg(unix)]
#[tokio::test]
async fn sigterm_stops_a_consumer() {
    let broker = MemoryBroker::new();
    broker.send(event("evt-1", "x"));
    let (runs, handler) = counting();
    let consumer = Consumer::gate("orders", MemoryStore::new());
    let handle = consumer.stats_handle();
    let run = tokio::spawn(consumer.run(
        broker.source(),
        handler,
        idemgate_consumer::shutdown::signal(),
    ));
    // the signal handler is installed on the run's first poll; wait for the first message
    tokio::time::timeout(Duration::from_secs(10), handle.until(|s| s.handled == 1))
        .await
        .unwrap();
    let pid = std::process::id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let stats = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("SIGTERM stopped the consumer")
        .unwrap()
        .unwrap();
    assert_eq!((stats.handled, runs.load(Ordering::SeqCst)), (1, 1));
}

/// A handler that says no retry can help (`Permanent`) runs once: its message is dead-lettered
/// at once with the reason (Inbox mode: `tests/dead_letter.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_dead_lettered_without_retries() {
    let broker = MemoryBroker::new();
    broker.send(event("refused", "{}"));
    broker.send(event("fine", "{}"));
    broker.close();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&runs);
    let handler = move |m: Message| {
        let r = Arc::clone(&r);
        async move {
            if m.event_id.as_deref() == Some("refused") {
                r.fetch_add(1, Ordering::SeqCst);
                return Err(idemgate_consumer::BoxError::from(
                    idemgate_consumer::Permanent::new("422 from the service"),
                ));
            }
            Ok(())
        }
    };
    let stats = Consumer::gate("orders", MemoryStore::new())
        .with_max_attempts(5)
        .with_retry_delay(Duration::from_millis(5))
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "no retry of a permanent failure"
    );
    assert_eq!(stats.handled, 1);
    assert_eq!(stats.retried, 0, "{stats:?}");
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.contains("422 from the service"), "{}", dead[0].1);
}

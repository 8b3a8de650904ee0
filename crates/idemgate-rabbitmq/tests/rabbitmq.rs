//! The adapter suite against the local RabbitMQ (`RABBITMQ_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`); each test declares its own queues.

use std::time::Duration;

use idemgate_consumer::{DEAD_LETTER_REASON, Outgoing, Sink, Source};
use idemgate_rabbitmq::{RabbitMq, dead_queue};
use idemgate_testkit::{broker, service};

fn url() -> String {
    service::url("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

async fn connect() -> Option<RabbitMq> {
    service::connect("RabbitMQ", RabbitMq::connect(&url())).await
}

/// A fresh queue (and dead-letter queue) for one test.
async fn queue(rabbit: &RabbitMq, test: &str) -> String {
    let name = format!(
        "idemgate-test-{test}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    rabbit.declare(&name).await.unwrap();
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_published_twice_runs_once() {
    let Some(rabbit) = connect().await else {
        return;
    };
    let q = queue(&rabbit, "twice").await;
    let sink = rabbit.sink().await.unwrap();
    broker::published_twice_runs_once(
        &sink,
        &q,
        rabbit.source(&q, 16).await.unwrap(),
        Duration::ZERO,
    )
    .await;
    rabbit.delete(&q).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_dropped_before_its_ack_is_redelivered_and_not_rerun() {
    let Some(rabbit) = connect().await else {
        return;
    };
    let q = queue(&rabbit, "redeliver").await;
    let sink = rabbit.sink().await.unwrap();
    // the first consumer on its own connection, closed under it
    let doomed = RabbitMq::connect(&url()).await.unwrap();
    let first = doomed.source(&q, 16).await.unwrap();
    let second = async { rabbit.source(&q, 16).await.unwrap() };
    broker::dropped_before_ack_is_redelivered_not_rerun(
        &sink,
        &q,
        first,
        async { doomed.close().await.unwrap() },
        second,
    )
    .await;
    rabbit.delete(&q).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_its_lease_runs_once() {
    let Some(rabbit) = connect().await else {
        return;
    };
    let q = queue(&rabbit, "slow").await;
    let sink = rabbit.sink().await.unwrap();
    broker::slower_than_lease_runs_once(
        &sink,
        &q,
        rabbit.source(&q, 16).await.unwrap(),
        Duration::ZERO,
    )
    .await;
    rabbit.delete(&q).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dead_letter_queue_with_its_reason() {
    let Some(rabbit) = connect().await else {
        return;
    };
    let q = queue(&rabbit, "poison").await;
    // published by a foreign producer: no message id, no event-id header
    let raw = rabbit.sink().await.unwrap();
    let mut out = Outgoing::new(&q, "no id");
    out.event_id = String::new();
    raw.publish(&out).await.unwrap();
    broker::poison_is_dead_lettered(rabbit.source(&q, 16).await.unwrap()).await;
    let mut dead = rabbit.source(&dead_queue(&q), 1).await.unwrap();
    let d = tokio::time::timeout(std::time::Duration::from_secs(10), dead.recv())
        .await
        .expect("a dead letter")
        .unwrap()
        .unwrap();
    let m = idemgate_consumer::Delivery::message(&d);
    assert_eq!(m.payload, "no id");
    let reason = std::str::from_utf8(m.header(DEAD_LETTER_REASON).unwrap()).unwrap();
    assert!(reason.contains("no event id"), "{reason}");
    rabbit.delete(&q).await.unwrap();
}

/// A message for a queue that does not exist is an error, not a silent confirm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_no_queue_takes_is_an_error() {
    let Some(rabbit) = connect().await else {
        return;
    };
    let sink = rabbit.sink().await.unwrap();
    let nowhere = format!("idemgate-test-nowhere-{}", std::process::id());
    let sent = sink.publish(&Outgoing::new(&nowhere, "lost?")).await;
    assert!(
        matches!(&sent, Err(idemgate_consumer::Error::Broker { message, .. }) if message.contains("no queue took")),
        "an unroutable message was confirmed: {sent:?}"
    );
}

/// A dead letter no queue takes fails, and the original is not acked: it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_goes_nowhere_keeps_the_original() {
    let Some(rabbit) = connect().await else {
        return;
    };
    let q = queue(&rabbit, "dead-nowhere").await;
    // the dead-letter queue is gone (deleting `<q>.dead` deletes it and its own `.dead`)
    rabbit.delete(&dead_queue(&q)).await.unwrap();
    let sink = rabbit.sink().await.unwrap();
    sink.publish(&Outgoing::new(&q, "poison")).await.unwrap();
    let source = rabbit.source(&q, 1).await.unwrap();
    broker::refused_dead_letter_keeps_the_original(source, b"poison").await;
    rabbit.delete(&q).await.unwrap();
}

/// A delivery dropped unsettled goes back to its queue at once, and frees its prefetch slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_unsettled_is_requeued_at_once() {
    let Some(rabbit) = connect().await else {
        return;
    };
    let q = queue(&rabbit, "dropped").await;
    let sink = rabbit.sink().await.unwrap();
    sink.publish(&Outgoing::new(&q, "held")).await.unwrap();
    // one message in flight at a time: a held one would block the next receive
    let mut source = rabbit.source(&q, 1).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), source.recv())
        .await
        .expect("a delivery")
        .unwrap()
        .unwrap();
    drop(d);
    let again = tokio::time::timeout(Duration::from_secs(5), source.recv())
        .await
        .expect("the dropped delivery stayed unacked, holding the prefetch slot")
        .unwrap()
        .unwrap();
    assert_eq!(idemgate_consumer::Delivery::message(&again).payload, "held");
    idemgate_consumer::Delivery::ack(again).await.unwrap();
    rabbit.delete(&q).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordering_key_keeps_its_order_across_a_retry() {
    let Some(rabbit) = connect().await else {
        return;
    };
    let q = queue(&rabbit, "order").await;
    let sink = rabbit.sink().await.unwrap();
    let source = rabbit.source(&q, 16).await.unwrap();
    broker::order_per_key_survives_a_retry(&sink, &q, source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_handler_times_out_and_is_dead_lettered() {
    let Some(rabbit) = connect().await else {
        return;
    };
    let q = queue(&rabbit, "stuck").await;
    let sink = rabbit.sink().await.unwrap();
    let source = rabbit.source(&q, 16).await.unwrap();
    broker::stuck_handler_times_out(&sink, &q, source).await;
    assert_eq!(rabbit.purge(&dead_queue(&q)).await.unwrap(), 1);
}

/// A retry waits in a retry queue, not in the consumer's prefetch: with a prefetch of one, the
/// messages behind a failing one run at once, and the failing one comes back after its delay
/// with its deliveries counted, until it is dead-lettered when out of attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_retry_holds_no_prefetch_slot() {
    use idemgate_consumer::{Consumer, Message};
    use std::sync::{Arc, Mutex};
    let Some(rabbit) = connect().await else {
        return;
    };
    let q = queue(&rabbit, "retry-slot").await;
    rabbit.delete(&q).await.unwrap();
    rabbit.declare_quorum(&q, 20).await.unwrap();
    let sink = rabbit.sink().await.unwrap();
    for p in ["a", "b", "c", "d"] {
        sink.publish(&Outgoing::new(&q, p)).await.unwrap();
    }
    let runs = Arc::new(Mutex::new(Vec::<(String, Option<u32>)>::new()));
    let handler = {
        let runs = Arc::clone(&runs);
        move |m: Message| {
            let p = String::from_utf8_lossy(&m.payload).into_owned();
            let fail = p == "a";
            runs.lock().unwrap().push((p, m.deliveries));
            std::future::ready(if fail { Err("a always fails") } else { Ok(()) })
        }
    };
    let consumer = Consumer::gate("adapter-suite", idemgate_core::MemoryStore::new())
        .with_max_attempts(3)
        .with_retry_delay(Duration::from_millis(500));
    let handle = consumer.stats_handle();
    let stats = consumer
        .run(
            rabbit.source(&q, 1).await.unwrap(),
            handler,
            broker::until(handle, Duration::from_secs(20), |s| s.dead_lettered >= 1),
        )
        .await
        .unwrap();
    let runs = runs.lock().unwrap().clone();
    let order: Vec<&str> = runs.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(order, ["a", "b", "c", "d", "a", "a"], "{runs:?}");
    let counted: Vec<Option<u32>> = runs[4..].iter().map(|(_, n)| *n).collect();
    assert_eq!(
        counted,
        [Some(2), Some(3)],
        "deliveries carried through the retry queue"
    );
    assert_eq!(stats.handled, 3, "{stats:?}");
    assert_eq!(stats.dead_lettered_exhausted, 1, "{stats:?}");
    assert_eq!(rabbit.purge(&dead_queue(&q)).await.unwrap(), 1);
    rabbit.delete(&q).await.unwrap();
}

/// A queue from `declare_ordered` has one consumer at a time: the standby receives nothing
/// while the first consumer lives, and when it dies, takes over its unacked messages and the
/// rest in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_queue_hands_over_in_order_when_its_consumer_dies() {
    use idemgate_consumer::Delivery;
    let Some(rabbit) = connect().await else {
        return;
    };
    let q = queue(&rabbit, "ordered").await;
    rabbit.delete(&q).await.unwrap();
    rabbit.declare_ordered(&q, 20).await.unwrap();
    let sink = rabbit.sink().await.unwrap();
    for i in 0..10 {
        let out = Outgoing::new(&q, format!("a{i}")).with_ordering_key("a");
        sink.publish(&out).await.unwrap();
    }
    let doomed = RabbitMq::connect(&url()).await.unwrap();
    let mut first = doomed.source(&q, 4).await.unwrap();
    let standby_conn = RabbitMq::connect(&url()).await.unwrap();
    let mut standby = standby_conn.source(&q, 4).await.unwrap();
    let payload = |d: &idemgate_rabbitmq::RabbitDelivery| {
        String::from_utf8_lossy(&d.message().payload).into_owned()
    };
    let mut held = Vec::new();
    for i in 0..4 {
        let d = broker::next(&mut first, Duration::from_secs(5), "the active consumer").await;
        assert_eq!(payload(&d), format!("a{i}"));
        if i < 2 {
            d.ack().await.unwrap();
        } else {
            held.push(d);
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), standby.recv())
            .await
            .is_err(),
        "the standby received while the active consumer lived"
    );
    std::mem::forget(held);
    doomed.close().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 8 {
        let d = broker::next(&mut standby, Duration::from_secs(10), "the standby").await;
        got.push(payload(&d));
        d.ack().await.unwrap();
    }
    let expected: Vec<String> = (2..10).map(|i| format!("a{i}")).collect();
    assert_eq!(got, expected);
    standby_conn.close().await.unwrap();
    rabbit.delete(&q).await.unwrap();
}

/// Closing right after a consumer's run returned, twice, and while another close runs: every
/// close succeeds (a channel or connection that is already closing is closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_after_a_run_always_succeeds() {
    let Some(admin) = connect().await else {
        return;
    };
    let q = queue(&admin, "close").await;
    for round in 0..20 {
        let rabbit = RabbitMq::connect(&url()).await.unwrap();
        rabbit
            .sink()
            .await
            .unwrap()
            .publish(&Outgoing::new(&q, format!("{round}")))
            .await
            .unwrap();
        let consumer =
            idemgate_consumer::Consumer::gate("close", idemgate_core::MemoryStore::new());
        let stats = consumer.stats_handle();
        consumer
            .run(
                rabbit.source(&q, 16).await.unwrap(),
                |_m: idemgate_consumer::Message| async { Ok::<_, String>(()) },
                stats.until(|s| s.handled == 1),
            )
            .await
            .unwrap();
        let (a, b) = tokio::join!(rabbit.close(), rabbit.close());
        a.unwrap_or_else(|e| panic!("round {round}: {e}"));
        b.unwrap_or_else(|e| panic!("round {round}: {e}"));
        rabbit.close().await.unwrap();
    }
    admin.delete(&q).await.unwrap();
}

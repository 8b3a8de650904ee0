//! The bridge: a Gate-mode consumer that POSTs each event to a Python service, directly and
//! through the proxy.

mod common;

use std::time::Duration;

use idemgate::MemoryStore;
use idemgate::consumer::memory::MemoryBroker;
use idemgate::consumer::{Consumer, Message, Stats};
use idemgate_sidecar::{Bridge, BridgeOptions};

use common::{calls, proxy, python_upstream};

/// Runs a bridge to `target` over `broker` until it is drained.
async fn bridge(broker: &MemoryBroker, target: String) -> Stats {
    let bridge = Bridge::new(
        BridgeOptions::new(target.parse().unwrap())
            .with_header("x-user".parse().unwrap(), "bridge".parse().unwrap())
            .with_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    let handler = move |m: Message| {
        let b = bridge.clone();
        async move { b.deliver(m).await }
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        Consumer::gate("bridge", MemoryStore::new())
            .with_retry_delay(Duration::from_millis(100))
            .with_max_attempts(10)
            .run(broker.source(), handler, std::future::pending()),
    )
    .await
    .expect("the bridge drains the broker")
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_reach_the_service_once_each() {
    let up = python_upstream(None).await;
    let broker = MemoryBroker::new();
    for _ in 0..2 {
        for i in 0..50 {
            broker.send(
                Message::new("orders", format!("{{\"n\": {i}}}")).with_event_id(format!("e-{i}")),
            );
        }
    }
    broker.close();
    let stats = bridge(&broker, format!("http://127.0.0.1:{}/orders", up.port)).await;
    assert_eq!(stats.handled, 50);
    assert_eq!(stats.duplicates, 50);
    let counted = calls(&up).await;
    for i in 0..50 {
        assert_eq!(counted[format!("bridge|e-{i}")], 1, "e-{i}: {counted}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_is_retried_and_a_4xx_dead_lettered_at_once() {
    let up = python_upstream(None).await;
    let broker = MemoryBroker::new();
    broker.send(Message::new("orders", "{}").with_event_id("flaky-1"));
    broker.close();
    let stats = bridge(&broker, format!("http://127.0.0.1:{}/flaky", up.port)).await;
    assert_eq!((stats.handled, stats.retried), (1, 1), "{stats:?}");
    assert!(broker.dead_letters().is_empty());
    assert_eq!(calls(&up).await["bridge|flaky-1"], 2);

    let broker = MemoryBroker::new();
    broker.send(Message::new("orders", "{}").with_event_id("refused-1"));
    broker.close();
    let stats = bridge(&broker, format!("http://127.0.0.1:{}/refuse", up.port)).await;
    assert_eq!(stats.retried, 0, "{stats:?}");
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.contains("422"), "{}", dead[0].1);
    assert_eq!(calls(&up).await["bridge|refused-1"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_is_down_is_waited_for() {
    // nobody listens on the port until the service starts there
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker = MemoryBroker::new();
    broker.send(Message::new("orders", "{}").with_event_id("late-1"));
    broker.close();
    let run = tokio::spawn({
        let broker = broker.clone();
        async move { bridge(&broker, format!("http://127.0.0.1:{port}/orders")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let up = python_upstream(Some(port)).await;
    let stats = run.await.unwrap();
    assert!(stats.retried >= 1, "{stats:?}");
    assert_eq!(stats.handled, 1);
    assert_eq!(calls(&up).await["bridge|late-1"], 1);
}

/// The bridge in front of the proxy: a bridge that forgot it delivered (its Gate store lost,
/// as after a crash between the service's answer and the completion) delivers again, and the
/// proxy replays the first answer instead of a second call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_proxy_a_forgetful_bridge_still_makes_one_call() {
    let up = python_upstream(None).await;
    let p = proxy(up.port, "", |o| o).await;
    for _ in 0..2 {
        let broker = MemoryBroker::new();
        broker.send(Message::new("orders", "{}").with_event_id("once-1"));
        broker.close();
        let stats = bridge(&broker, p.url("/orders")).await;
        assert_eq!(stats.handled, 1, "each bridge delivers with a fresh store");
    }
    assert_eq!(calls(&up).await["bridge|once-1"], 1);
}

//! The adapter suite against the local Mosquitto (`MQTT_HOST`/`MQTT_PORT`, default
//! `127.0.0.1:1883`), MQTT 5 at QoS 1; each test uses its own topic and client ids.

use std::time::Duration;

use idemgate_consumer::{DEAD_LETTER_REASON, Delivery, Outgoing, Sink, Source};
use idemgate_mqtt::{Mqtt, Session};
use idemgate_testkit::service::unique;
use idemgate_testkit::{broker, service};

async fn connect(client_id: &str, session: Session) -> Option<Mqtt> {
    let host = service::url("MQTT_HOST", "127.0.0.1");
    let port = service::url("MQTT_PORT", "1883").parse().unwrap();
    service::connect("MQTT", Mqtt::connect(&host, port, client_id, session)).await
}

fn persistent() -> Session {
    Session::persistent(Duration::from_secs(600))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_published_twice_runs_once() {
    let topic = unique("twice");
    let Some(consumer) = connect(&unique("c"), persistent()).await else {
        return;
    };
    let producer = connect(&unique("p"), Session::clean()).await.unwrap();
    let source = consumer.source(&topic).await.unwrap();
    broker::published_twice_runs_once(&producer.sink(), &topic, source, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_dropped_before_its_ack_is_redelivered_and_not_rerun() {
    let topic = unique("redeliver");
    let id = unique("c");
    let Some(first) = connect(&id, persistent()).await else {
        return;
    };
    let producer = connect(&unique("p"), Session::clean()).await.unwrap();
    let source = first.source(&topic).await.unwrap();
    // dropping the connection closes it with no DISCONNECT; the same client id reconnects to
    // its session and the broker redelivers the unacknowledged message
    let second = async {
        connect(&id, persistent())
            .await
            .unwrap()
            .source(&topic)
            .await
            .unwrap()
    };
    broker::dropped_before_ack_is_redelivered_not_rerun(
        &producer.sink(),
        &topic,
        source,
        async { drop(first) },
        second,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_its_lease_runs_once() {
    let topic = unique("slow");
    let Some(consumer) = connect(&unique("c"), persistent()).await else {
        return;
    };
    let producer = connect(&unique("p"), Session::clean()).await.unwrap();
    let source = consumer.source(&topic).await.unwrap();
    broker::slower_than_lease_runs_once(
        &producer.sink(),
        &topic,
        source,
        Duration::from_millis(300),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dead_letter_topic_with_its_reason() {
    let topic = unique("poison");
    let Some(consumer) = connect(&unique("c"), persistent()).await else {
        return;
    };
    let watcher = connect(&unique("w"), Session::clean()).await.unwrap();
    let mut dead = watcher
        .source(&format!("idemgate-dead/{topic}"))
        .await
        .unwrap();
    let source = consumer.source(&topic).await.unwrap();
    // an empty event id gives no key: poison
    let producer = connect(&unique("p"), Session::clean()).await.unwrap();
    let mut out = Outgoing::new(&topic, "no id");
    out.event_id = String::new();
    producer.sink().publish(&out).await.unwrap();
    broker::poison_is_dead_lettered(source).await;
    let d = broker::next(&mut dead, Duration::from_secs(10), "a dead letter").await;
    assert_eq!(&d.message().payload[..], b"no id");
    let reason = String::from_utf8_lossy(d.message().header(DEAD_LETTER_REASON).unwrap());
    assert!(reason.contains("poison"), "{reason}");
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_horizon_is_the_session_expiry() {
    let Some(consumer) = connect(&unique("c"), persistent()).await else {
        return;
    };
    let source = consumer.source(&unique("h")).await.unwrap();
    assert_eq!(
        source.horizon().unwrap().redelivery,
        Duration::from_secs(600)
    );
}

/// Publishes `n` events to `topic`, receives them on a fresh persistent session, acks every
/// one but the first (last to first), disconnects, and returns the payloads the broker
/// redelivers when the session connects again.
async fn redelivered_after_acking_all_but_the_first(session: Session, n: usize) -> Vec<String> {
    let topic = unique("order");
    let id = unique("c");
    let first = connect(&id, session.clone()).await.unwrap();
    let mut source = first.source(&topic).await.unwrap();
    let producer = connect(&unique("p"), Session::clean()).await.unwrap();
    for i in 0..n {
        producer
            .sink()
            .publish(&Outgoing::new(&topic, i.to_string()))
            .await
            .unwrap();
    }
    let mut ds = Vec::new();
    for _ in 0..n {
        ds.push(broker::next(&mut source, Duration::from_secs(10), "a message").await);
    }
    let payloads: Vec<_> = ds
        .iter()
        .map(|d| String::from_utf8_lossy(&d.message().payload).into_owned())
        .collect();
    assert_eq!(payloads, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
    let unsettled = ds.remove(0);
    for d in ds.into_iter().rev() {
        d.ack().await.unwrap();
    }
    // dropped unsettled, the message goes back to its source, not to the broker
    drop(unsettled);
    first.disconnect().await.unwrap();
    let second = connect(&id, session).await.unwrap();
    let mut again = second.source(&topic).await.unwrap();
    let mut redelivered = Vec::new();
    while let Ok(Ok(Some(d))) = tokio::time::timeout(Duration::from_secs(2), again.recv()).await {
        redelivered.push(String::from_utf8_lossy(&d.message().payload).into_owned());
        d.ack().await.unwrap();
    }
    redelivered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_go_out_in_arrival_order() {
    if connect(&unique("probe"), Session::clean()).await.is_none() {
        return;
    }
    // the acks behind the unsettled first message were held, so the broker sends all again
    let redelivered = redelivered_after_acking_all_but_the_first(persistent(), 10).await;
    assert_eq!(
        redelivered,
        (0..10).map(|i| i.to_string()).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_any_order_go_out_as_messages_are_settled() {
    if connect(&unique("probe"), Session::clean()).await.is_none() {
        return;
    }
    let session = persistent().with_acks_in_any_order();
    let redelivered = redelivered_after_acking_all_but_the_first(session, 10).await;
    assert_eq!(redelivered, ["0"]);
}

/// A dead letter no subscriber takes (Mosquitto answers `NoMatchingSubscribers` and drops it)
/// fails, and the original is not acked: it comes back to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_no_subscriber_takes_keeps_the_original() {
    let topic = unique("dead-nowhere");
    let Some(consumer) = connect(&unique("c"), persistent()).await else {
        return;
    };
    let source = consumer
        .source(&topic)
        .await
        .unwrap()
        .with_dead_letter_topic(unique("nobody-listens"));
    let producer = connect(&unique("p"), Session::clean()).await.unwrap();
    producer
        .sink()
        .publish(&Outgoing::new(&topic, "poison"))
        .await
        .unwrap();
    broker::refused_dead_letter_keeps_the_original(source, b"poison").await;
}

/// The broker loses the session (here: a client with the same id connects with a clean start
/// and takes it over): the source reconnects without it, subscribes again, and messages arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_is_subscribed_again() {
    let topic = unique("lost-session");
    let id = unique("c");
    let Some(consumer) = connect(&id, persistent()).await else {
        return;
    };
    let mut source = consumer.source(&topic).await.unwrap();
    let intruder = connect(&id, Session::clean()).await.unwrap();
    let _ = intruder.disconnect().await;
    let producer = connect(&unique("p"), Session::clean()).await.unwrap();
    let sink = producer.sink();
    // publish until one arrives: until the source subscribed again, the broker drops them
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let got = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing arrived after the session was lost"
        );
        sink.publish(&Outgoing::new(&topic, "after")).await.unwrap();
        if let Ok(Ok(Some(d))) =
            tokio::time::timeout(Duration::from_millis(300), source.recv()).await
        {
            break d;
        }
    };
    assert_eq!(&got.message().payload[..], b"after");
    got.ack().await.unwrap();
}

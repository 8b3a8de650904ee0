//! The adapter suite against the local NATS server with JetStream (`NATS_URL`, default
//! `nats://127.0.0.1:4222`); each test makes its own stream.

use std::time::Duration;

use idemgate_consumer::{DEAD_LETTER_REASON, Delivery, Outgoing, Sink, Source};
use idemgate_nats::{ConsumerOptions, Nats};
use idemgate_testkit::{broker, service};

/// The stream's duplicate window: the suite re-publishes past it, so the copy reaches the
/// consumer and idemgate (not the server) recognises it.
const WINDOW: Duration = Duration::from_secs(1);
const PAST_WINDOW: Duration = Duration::from_millis(1300);

fn url() -> String {
    service::url("NATS_URL", "nats://127.0.0.1:4222")
}

async fn connect() -> Option<Nats> {
    service::connect("NATS", Nats::connect(&url())).await
}

/// A fresh stream for one test: its name and its subject prefix.
async fn stream(nats: &Nats, test: &str) -> (String, String) {
    let id = format!(
        "{test}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let (name, prefix) = (format!("IDEMGATE_{id}"), format!("idemgate.{id}"));
    nats.stream(
        &name,
        vec![format!("{prefix}.events"), format!("{prefix}.dead")],
        WINDOW,
    )
    .await
    .unwrap();
    (name, prefix)
}

/// The next dead letter on `<prefix>.dead`: its payload and its reason.
async fn dead_letter(nats: &Nats, stream: &str, prefix: &str) -> (String, String) {
    let mut dead = nats
        .source(
            stream,
            "dead",
            &format!("{prefix}.dead"),
            ConsumerOptions::default(),
        )
        .await
        .unwrap();
    let d = broker::next(&mut dead, Duration::from_secs(10), "a dead letter").await;
    let m = d.message();
    let reason = m.header(DEAD_LETTER_REASON).expect("the reason header");
    (
        String::from_utf8_lossy(&m.payload).into_owned(),
        String::from_utf8_lossy(reason).into_owned(),
    )
}

fn opts(prefix: &str) -> ConsumerOptions {
    ConsumerOptions::default().with_dead_letter_subject(format!("{prefix}.dead"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_published_twice_runs_once() {
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "twice").await;
    let events = format!("{prefix}.events");
    let source = nats
        .source(&name, "c", &events, opts(&prefix))
        .await
        .unwrap();
    broker::published_twice_runs_once(&nats.sink(), &events, source, PAST_WINDOW).await;
    nats.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_the_duplicate_window_the_server_drops_the_republish() {
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "window").await;
    let events = format!("{prefix}.events");
    let sink = nats.sink();
    let out = Outgoing::new(&events, "once");
    sink.publish(&out).await.unwrap();
    sink.publish(&out).await.unwrap();
    let mut source = nats
        .source(&name, "c", &events, opts(&prefix))
        .await
        .unwrap();
    let d = source.recv().await.unwrap().unwrap();
    assert_eq!(d.message().event_id.as_deref(), Some(out.event_id.as_str()));
    d.ack().await.unwrap();
    let next = tokio::time::timeout(Duration::from_millis(500), source.recv()).await;
    assert!(next.is_err(), "the re-publish within the window was stored");
    nats.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_dropped_before_its_ack_is_redelivered_and_not_rerun() {
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "redeliver").await;
    let events = format!("{prefix}.events");
    // the server redelivers an unacked message after the ack wait
    let short = opts(&prefix).with_ack_wait(Duration::from_secs(1));
    let doomed = Nats::connect(&url()).await.unwrap();
    let first = doomed
        .source(&name, "c", &events, short.clone())
        .await
        .unwrap();
    let second = async {
        nats.source(&name, "c", &events, short.clone())
            .await
            .unwrap()
    };
    broker::dropped_before_ack_is_redelivered_not_rerun(
        &nats.sink(),
        &events,
        first,
        async { drop(doomed) },
        second,
    )
    .await;
    nats.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_its_lease_and_the_ack_wait_runs_once() {
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "slow").await;
    let events = format!("{prefix}.events");
    // without the in-progress acks the server would redeliver after 1 s
    let short = opts(&prefix).with_ack_wait(Duration::from_secs(1));
    let source = nats.source(&name, "c", &events, short).await.unwrap();
    broker::slower_than_lease_runs_once(&nats.sink(), &events, source, PAST_WINDOW).await;
    nats.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dead_letter_subject_with_its_reason() {
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "poison").await;
    let events = format!("{prefix}.events");
    let mut out = Outgoing::new(&events, "no id");
    out.event_id = String::new();
    nats.sink().publish(&out).await.unwrap();
    let source = nats
        .source(&name, "c", &events, opts(&prefix))
        .await
        .unwrap();
    broker::poison_is_dead_lettered(source).await;
    let (payload, reason) = dead_letter(&nats, &name, &prefix).await;
    assert_eq!(payload, "no id");
    assert!(reason.contains("no event id"), "{reason}");
    nats.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_horizon_is_ack_wait_times_max_deliver() {
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "horizon").await;
    let events = format!("{prefix}.events");
    let source = nats
        .source(&name, "c", &events, opts(&prefix))
        .await
        .unwrap();
    let h = source.horizon().unwrap();
    assert_eq!(h.redelivery, Duration::from_secs(30 * 20));
    let short = idemgate_consumer::check_window(Duration::from_secs(60), h.clone());
    assert!(!short.is_ok());
    assert!(short.to_string().contains("AckWait"), "{short}");
    assert!(idemgate_consumer::check_window(Duration::from_secs(3600), h).is_ok());
    // at start-up the consumer reads the horizon from its source and, strict, refuses to run
    let refused = idemgate_consumer::Consumer::gate("c", idemgate_core::MemoryStore::new())
        .with_retention(Duration::from_secs(60))
        .with_strict(true)
        .run(
            source,
            |_m| async { Ok::<(), String>(()) },
            std::future::pending(),
        )
        .await;
    assert!(
        matches!(refused, Err(idemgate_consumer::Error::Window(_))),
        "{refused:?}"
    );
    nats.delete_stream(&name).await.unwrap();
}

/// With no dead-letter subject the message is not terminated into nowhere: `dead_letter` fails
/// and the server delivers the original again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_with_nowhere_to_go_keeps_the_original() {
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "dead_nowhere").await;
    let events = format!("{prefix}.events");
    let source = nats
        .source(&name, "c", &events, ConsumerOptions::default())
        .await
        .unwrap();
    nats.sink()
        .publish(&Outgoing::new(&events, "poison"))
        .await
        .unwrap();
    broker::refused_dead_letter_keeps_the_original(source, b"poison").await;
    nats.delete_stream(&name).await.unwrap();
}

/// A consumer with a delivery budget of 5 and a 3 s ack wait.
fn budget_of_five(prefix: &str) -> ConsumerOptions {
    let mut o = opts(prefix).with_ack_wait(Duration::from_secs(3));
    o.max_deliver = 5;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_past_max_deliver_loses_nothing() {
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "outage").await;
    let events = format!("{prefix}.events");
    let source = nats
        .source(&name, "c", &events, budget_of_five(&prefix))
        .await
        .unwrap();
    broker::store_outage_loses_nothing(&nats.sink(), &events, source, Duration::from_secs(5)).await;
    nats.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_key_waits_without_using_max_deliver() {
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "busy").await;
    let events = format!("{prefix}.events");
    let source = nats
        .source(&name, "c", &events, budget_of_five(&prefix))
        .await
        .unwrap();
    broker::busy_key_waits_without_using_the_delivery_budget(
        &nats.sink(),
        &events,
        source,
        PAST_WINDOW,
    )
    .await;
    nats.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_failing_on_its_last_delivery_is_dead_lettered_with_its_reason() {
    // past MaxDeliver the server would stop delivering it, and nothing would dead-letter it
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "last").await;
    let events = format!("{prefix}.events");
    let mut o = opts(&prefix);
    o.max_deliver = 3;
    let source = nats.source(&name, "c", &events, o).await.unwrap();
    broker::failing_past_the_delivery_limit_is_dead_lettered(&nats.sink(), &events, source, 3)
        .await;
    let (_, reason) = dead_letter(&nats, &name, &prefix).await;
    assert!(reason.contains("last delivery (3)"), "{reason}");
    nats.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_handler_times_out_and_is_dead_lettered() {
    let Some(nats) = connect().await else { return };
    let (name, prefix) = stream(&nats, "stuck").await;
    let events = format!("{prefix}.events");
    let source = nats
        .source(&name, "c", &events, opts(&prefix))
        .await
        .unwrap();
    broker::stuck_handler_times_out(&nats.sink(), &events, source).await;
    let (_, reason) = dead_letter(&nats, &name, &prefix).await;
    assert!(reason.contains("timed out"), "{reason}");
    nats.delete_stream(&name).await.unwrap();
}

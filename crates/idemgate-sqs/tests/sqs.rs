//! The adapter suite against a local SQS-compatible endpoint (`SQS_ENDPOINT`, default
//! `http://127.0.0.1:4566`; `scripts/brokers sqs` starts moto there). Each test makes its own
//! queues, so tests run in parallel without resetting the server.

use std::time::Duration;

use idemgate_consumer::{DEAD_LETTER_REASON, Delivery, Outgoing, Sink, Source};
use idemgate_sqs::{QueueOptions, Sqs};
use idemgate_testkit::service::unique;
use idemgate_testkit::{broker, service};

/// A fresh queue (with its `-dead` queue): the endpoint and the queue URL.
async fn queue(name: &str, options: QueueOptions) -> Option<(Sqs, String)> {
    let sqs = Sqs::local(&service::url("SQS_ENDPOINT", "http://127.0.0.1:4566"));
    let url = service::connect("SQS", sqs.create_queue(name, options)).await?;
    Some((sqs, url))
}

fn short() -> QueueOptions {
    QueueOptions::default().with_visibility_timeout(Duration::from_secs(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_published_twice_runs_once() {
    let Some((sqs, url)) = queue(&unique("twice"), QueueOptions::default()).await else {
        return;
    };
    let source = sqs.source(&url).await.unwrap();
    broker::published_twice_runs_once(&sqs.sink(), &url, source, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_queue_drops_a_resend_within_its_window() {
    let name = format!("{}.fifo", unique("fifo"));
    let Some((sqs, url)) = queue(&name, QueueOptions::default()).await else {
        return;
    };
    let sink = sqs.sink();
    let out = Outgoing::new(&url, "once").with_ordering_key("order-7");
    sink.publish(&out).await.unwrap();
    sink.publish(&out).await.unwrap();
    let mut source = sqs.source(&url).await.unwrap();
    let d = source.recv().await.unwrap().unwrap();
    assert_eq!(d.message().event_id.as_deref(), Some(out.event_id.as_str()));
    assert_eq!(d.message().ordering_key.as_deref(), Some("order-7"));
    d.ack().await.unwrap();
    let next = tokio::time::timeout(Duration::from_millis(1500), source.recv()).await;
    assert!(next.is_err(), "the re-send within the window was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_dropped_before_its_ack_is_redelivered_and_not_rerun() {
    // the message becomes visible again one second after the consumer died
    let Some((sqs, url)) = queue(&unique("redeliver"), short()).await else {
        return;
    };
    let first = sqs.source(&url).await.unwrap();
    let second = async { sqs.source(&url).await.unwrap() };
    broker::dropped_before_ack_is_redelivered_not_rerun(&sqs.sink(), &url, first, async {}, second)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_its_lease_and_the_visibility_timeout_runs_once() {
    let Some((sqs, url)) = queue(&unique("slow"), short()).await else {
        return;
    };
    let source = sqs.source(&url).await.unwrap();
    broker::slower_than_lease_runs_once(&sqs.sink(), &url, source, Duration::from_millis(300))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_keeps_a_message_invisible_past_its_visibility_timeout() {
    let Some((sqs, url)) = queue(&unique("visible"), short()).await else {
        return;
    };
    sqs.sink()
        .publish(&Outgoing::new(&url, "long"))
        .await
        .unwrap();
    let mut working = sqs.source(&url).await.unwrap();
    let d = working.recv().await.unwrap().unwrap();
    let mut other = sqs.source(&url).await.unwrap();
    let watch = async {
        tokio::time::timeout(Duration::from_millis(2500), other.recv())
            .await
            .is_ok()
    };
    let extend = async {
        for _ in 0..8 {
            d.in_progress().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let (seen, ()) = tokio::join!(watch, extend);
    assert!(!seen, "the message was handed out while in progress");
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dead_letter_queue_with_its_reason() {
    let name = unique("poison");
    let Some((sqs, url)) = queue(&name, QueueOptions::default()).await else {
        return;
    };
    let mut out = Outgoing::new(&url, "no id");
    out.event_id = String::new();
    sqs.sink().publish(&out).await.unwrap();
    let source = sqs.source(&url).await.unwrap();
    let horizon = source.horizon().unwrap();
    assert_eq!(
        horizon.redelivery,
        Duration::from_secs(30 * 10),
        "{horizon:?}"
    );
    broker::poison_is_dead_lettered(source).await;
    let dead_url = url.replace(&name, &format!("{name}-dead"));
    let mut dead = sqs.source(&dead_url).await.unwrap();
    let d = broker::next(&mut dead, Duration::from_secs(10), "a dead letter").await;
    assert_eq!(&d.message().payload[..], b"no id");
    let reason = String::from_utf8_lossy(d.message().header(DEAD_LETTER_REASON).unwrap());
    assert!(reason.contains("poison"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_dead_letter_counts_though_the_original_cannot_be_deleted() {
    // the dead letter is stored, then deleting the original fails (here: its queue is gone):
    // reporting the dead letter failed would make the consumer roll its key back, and the
    // original, back from the broker, would be dead-lettered a second time
    let name = unique("gone");
    let Some((sqs, url)) = queue(&name, QueueOptions::default()).await else {
        return;
    };
    sqs.sink()
        .publish(&Outgoing::new(&url, "undeletable"))
        .await
        .unwrap();
    let mut source = sqs.source(&url).await.unwrap();
    let d = broker::next(&mut source, Duration::from_secs(10), "the message").await;
    sqs.delete_queue(&url).await.unwrap();
    d.dead_letter("its queue is gone").await.unwrap();
    let dead_url = url.replace(&name, &format!("{name}-dead"));
    let mut dead = sqs.source(&dead_url).await.unwrap();
    let d = broker::next(&mut dead, Duration::from_secs(10), "the dead letter").await;
    assert_eq!(&d.message().payload[..], b"undeletable");
}

/// A redrive policy of 5 receives and a 3 s visibility.
fn budget_of_five() -> QueueOptions {
    QueueOptions::default()
        .with_visibility_timeout(Duration::from_secs(3))
        .with_max_receive_count(Some(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_failing_on_its_last_receive_is_dead_lettered_with_its_reason() {
    // SQS would move it to the dead-letter queue on a 4th receive, without the reason
    let name = unique("last");
    let options = short().with_max_receive_count(Some(3));
    let Some((sqs, url)) = queue(&name, options).await else {
        return;
    };
    let source = sqs.source(&url).await.unwrap();
    broker::failing_past_the_delivery_limit_is_dead_lettered(&sqs.sink(), &url, source, 3).await;
    let dead_url = url.replace(&name, &format!("{name}-dead"));
    let mut dead = sqs.source(&dead_url).await.unwrap();
    let d = broker::next(&mut dead, Duration::from_secs(10), "the dead letter").await;
    let reason = String::from_utf8_lossy(d.message().header(DEAD_LETTER_REASON).unwrap());
    assert!(reason.contains("last delivery (3)"), "{reason}");
    d.ack().await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(3), dead.recv()).await;
    assert!(again.is_err(), "a second dead letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_past_the_redrive_limit_loses_nothing() {
    let Some((sqs, url)) = queue(&unique("outage"), budget_of_five()).await else {
        return;
    };
    let source = sqs.source(&url).await.unwrap();
    broker::store_outage_loses_nothing(&sqs.sink(), &url, source, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_key_waits_without_reaching_the_redrive_limit() {
    let Some((sqs, url)) = queue(&unique("busy"), budget_of_five()).await else {
        return;
    };
    let source = sqs.source(&url).await.unwrap();
    broker::busy_key_waits_without_using_the_delivery_budget(
        &sqs.sink(),
        &url,
        source,
        Duration::from_millis(300),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_group_keeps_its_order_across_a_retry() {
    let name = format!("{}.fifo", unique("order"));
    let Some((sqs, url)) = queue(&name, QueueOptions::default()).await else {
        return;
    };
    let source = sqs.source(&url).await.unwrap();
    broker::order_per_key_survives_a_retry(&sqs.sink(), &url, source).await;
}

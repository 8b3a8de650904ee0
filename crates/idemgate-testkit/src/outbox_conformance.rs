//! The [`Outbox`] contract and the [`Relay`] over it, one `pub async fn` per rule, for every
//! outbox backend: stamped into one `#[tokio::test]` each by
//! [`outbox_conformance_tests!`](crate::outbox_conformance_tests).
//!
//! A backend's test file implements [`OutboxCase`] on top of its [`InboxCase`] (the outbox
//! enqueues in the inbox's transactions) and calls the macro:
//!
//! ```ignore
//! idemgate_testkit::outbox_conformance_tests!(PgCase);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use idemgate_consumer::memory::MemoryBroker;
use idemgate_consumer::{BoxError, Consumer, Message, Relay, Sink};
use idemgate_core::{Inbox, InboxHandler, MemoryStore, Outbox, Outgoing};

use crate::inbox_conformance::InboxCase;

/// One backend under the outbox conformance suite.
pub trait OutboxCase: InboxCase {
    /// The outbox under test: it enqueues in the inbox's transactions.
    type Outbox: Outbox<Tx = <Self::Inbox as Inbox>::Tx> + Clone;

    /// A fresh, migrated outbox with tables of its own, on the inbox's database.
    fn outbox(&self) -> impl Future<Output = Self::Outbox> + Send;
}

const LONG: Duration = Duration::from_secs(60);

/// Commits `msgs`, each in a transaction of its own.
async fn commit_each<C: OutboxCase>(case: &C, outbox: &C::Outbox, msgs: &[Outgoing]) {
    for msg in msgs {
        let mut tx = case.inbox().begin().await.unwrap();
        outbox.enqueue(&mut tx, msg).await.unwrap();
        case.inbox().commit(tx).await.unwrap();
    }
}

fn keyed(key: &str, n: u32) -> Outgoing {
    Outgoing::new("orders", format!("{key}:{n}")).with_ordering_key(key)
}

fn payloads(rows: &[idemgate_core::OutboxRow]) -> Vec<String> {
    rows.iter()
        .map(|r| String::from_utf8_lossy(&r.message.payload).into_owned())
        .collect()
}

async fn open<C: OutboxCase>() -> Option<(C, C::Outbox)> {
    let case = C::open(Duration::from_secs(600)).await?;
    let outbox = case.outbox().await;
    Some((case, outbox))
}

/// An enqueue whose transaction rolls back publishes nothing; a committed one comes back
/// whole: event id, destination, ordering key, headers and payload.
pub async fn only_committed_messages_are_taken<C: OutboxCase>() {
    let Some((case, outbox)) = open::<C>().await else {
        return;
    };
    let kept = Outgoing::new("invoices", Bytes::from_static(b"\x00invoice 1\xff"))
        .with_ordering_key("customer-7")
        .with_header("content-type", "application/octet-stream")
        .with_header("trace", "");
    let mut tx = case.inbox().begin().await.unwrap();
    outbox.enqueue(&mut tx, &kept).await.unwrap();
    case.inbox().commit(tx).await.unwrap();
    let mut tx = case.inbox().begin().await.unwrap();
    outbox
        .enqueue(&mut tx, &Outgoing::new("invoices", "rolled back"))
        .await
        .unwrap();
    drop(tx);
    let rows = outbox.take("r1", 10, LONG).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].message, kept);
    assert_eq!(rows[0].attempts, 1);
    assert!(outbox.take("r2", 10, LONG).await.unwrap().is_empty());
    let backlog = outbox.backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.dead), (1, 0));
    outbox.sent(&[rows[0].id]).await.unwrap();
    assert_eq!(outbox.backlog().await.unwrap().pending, 0);
}

/// A row its relay took and never marked (the relay died between publish and mark) is taken
/// again once the lease ran out, with the same event id; the old owner can no longer move it.
pub async fn an_unmarked_row_comes_back_after_its_lease<C: OutboxCase>() {
    let Some((case, outbox)) = open::<C>().await else {
        return;
    };
    let msg = Outgoing::new("invoices", "1");
    commit_each(&case, &outbox, std::slice::from_ref(&msg)).await;
    let first = outbox
        .take("r1", 10, Duration::from_millis(400))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert!(outbox.take("r2", 10, LONG).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = outbox.take("r2", 10, LONG).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message.event_id, msg.event_id);
    assert_eq!(again[0].attempts, 2);
    let id = again[0].id;
    assert!(
        !outbox
            .retry("r1", id, Duration::ZERO, "late")
            .await
            .unwrap()
    );
    assert!(!outbox.dead_letter("r1", id, "late").await.unwrap());
    outbox.release("r1", &[id]).await.unwrap();
    assert!(outbox.take("r3", 10, LONG).await.unwrap().is_empty());
    assert_eq!(outbox.backlog().await.unwrap().dead, 0);
}

/// A key's rows leave in order: a held row and a backing-off row keep their key's later rows
/// waiting, other keys go on, and a dead-lettered row stops holding them.
pub async fn rows_of_one_key_leave_in_order<C: OutboxCase>() {
    let Some((case, outbox)) = open::<C>().await else {
        return;
    };
    let msgs = [keyed("k", 1), keyed("k", 2), keyed("k", 3), keyed("j", 1)];
    commit_each(&case, &outbox, &msgs).await;
    let head = outbox.take("r1", 1, LONG).await.unwrap();
    assert_eq!(payloads(&head), ["k:1"]);
    // k:1 is held: k's later rows wait, j goes on
    let other = outbox.take("r2", 10, LONG).await.unwrap();
    assert_eq!(payloads(&other), ["j:1"]);
    // k:1 backs off: still nothing of k
    assert!(
        outbox
            .retry("r1", head[0].id, Duration::from_millis(400), "broker away")
            .await
            .unwrap()
    );
    assert!(outbox.take("r2", 10, LONG).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let k = outbox.take("r2", 10, LONG).await.unwrap();
    assert_eq!(payloads(&k), ["k:1", "k:2", "k:3"]);
    assert_eq!(k[0].attempts, 2);
    // k:1 dead-lettered and k:2 given back: k:2 and k:3 leave next
    assert!(outbox.dead_letter("r2", k[0].id, "refused").await.unwrap());
    outbox.release("r2", &[k[1].id, k[2].id]).await.unwrap();
    let rest = outbox.take("r3", 10, LONG).await.unwrap();
    assert_eq!(payloads(&rest), ["k:2", "k:3"]);
}

/// A sink that records what it published, in order, after a short pause per message.
#[derive(Clone, Default)]
struct Recorder {
    published: Arc<Mutex<Vec<Outgoing>>>,
    /// Destinations the broker refuses for good.
    refuse: Option<&'static str>,
    /// Destinations whose first `n` publishes fail.
    flaky: Option<(&'static str, Arc<AtomicU32>)>,
    /// Every publish fails.
    down: bool,
}

impl Recorder {
    fn published(&self) -> Vec<Outgoing> {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Sink for Recorder {
    async fn publish(&self, msg: &Outgoing) -> idemgate_consumer::Result<()> {
        tokio::time::sleep(Duration::from_micros(200)).await;
        if self.down {
            return Err(idemgate_consumer::Error::broker(
                "test",
                "publishing",
                "connection refused",
            ));
        }
        if self.refuse == Some(msg.destination.as_str()) {
            return Err(idemgate_consumer::Error::Refused {
                broker: "test",
                message: format!("no such destination {}", msg.destination),
            });
        }
        if let Some((dest, left)) = &self.flaky
            && *dest == msg.destination
            && left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(idemgate_consumer::Error::broker(
                "test",
                "publishing",
                "timeout",
            ));
        }
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(msg.clone());
        Ok(())
    }
}

/// Checks that every message was published once and each key's in order.
fn check_order(published: &[Outgoing], keys: usize, per_key: u32) {
    let ids: BTreeSet<_> = published.iter().map(|m| &m.event_id).collect();
    assert_eq!(ids.len(), published.len(), "a row published twice");
    assert_eq!(published.len(), keys * per_key as usize);
    let mut last: BTreeMap<String, u32> = BTreeMap::new();
    for m in published {
        let text = String::from_utf8_lossy(&m.payload).into_owned();
        let (key, n) = text.split_once(':').expect("key:n");
        let n: u32 = n.parse().unwrap();
        let prev = last.insert(key.to_owned(), n).unwrap_or(0);
        assert_eq!(n, prev + 1, "key {key} out of order: {n} after {prev}");
    }
}

/// Four relays at once, running with three rounds in flight each, over 240 rows of 12 keys:
/// each row published once, each key's rows in order.
pub async fn concurrent_relays_publish_each_row_once_in_order<C: OutboxCase>() {
    let Some((case, outbox)) = open::<C>().await else {
        return;
    };
    let (keys, per_key) = (12, 20);
    let mut msgs = Vec::new();
    for n in 1..=per_key {
        for k in 0..keys {
            msgs.push(keyed(&format!("key{k}"), n));
        }
    }
    commit_each(&case, &outbox, &msgs).await;
    let sink = Recorder::default();
    let relays: Vec<_> = (0..4)
        .map(|i| {
            let relay = Relay::new(outbox.clone(), sink.clone())
                .with_batch(7)
                .with_rounds(3)
                .with_poll(Duration::from_millis(10))
                .with_name(format!("relay{i}"));
            let outbox = outbox.clone();
            tokio::spawn(async move {
                relay
                    .run(async move {
                        while outbox.backlog().await.unwrap().pending > 0 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    })
                    .await
            })
        })
        .collect();
    let mut taken = 0;
    for r in relays {
        let stats = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("the relays drain the outbox within a minute")
            .unwrap()
            .unwrap();
        taken += stats.taken;
    }
    check_order(&sink.published(), keys, per_key);
    assert_eq!(taken, u64::from(per_key) * keys as u64, "a row taken twice");
}

/// A refused destination is dead-lettered with its reason and stops holding its key; a flaky
/// publish is retried with its key's next row behind it; `with_max_attempts` dead-letters a
/// row that keeps failing.
pub async fn the_relay_retries_and_dead_letters<C: OutboxCase>() {
    let Some((case, outbox)) = open::<C>().await else {
        return;
    };
    let msgs = [
        Outgoing::new("nowhere", "k:0").with_ordering_key("k"),
        Outgoing::new("flaky", "k:1").with_ordering_key("k"),
        Outgoing::new("orders", "k:2").with_ordering_key("k"),
    ];
    commit_each(&case, &outbox, &msgs).await;
    let sink = Recorder {
        refuse: Some("nowhere"),
        flaky: Some(("flaky", Arc::new(AtomicU32::new(1)))),
        ..Recorder::default()
    };
    let relay = Relay::new(outbox.clone(), sink.clone());
    let first = relay.round().await.unwrap();
    assert_eq!(
        (first.dead_lettered, first.retried, first.released),
        (1, 1, 1)
    );
    assert!(sink.published().is_empty());
    let dead = outbox.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.event_id, msgs[0].event_id);
    assert!(dead[0].reason.contains("no such destination"), "{dead:?}");
    // k:1 backs off 100 ms, and k:2 waits behind it
    assert_eq!(relay.round().await.unwrap().taken, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.round().await.unwrap().published, 2);
    let order: Vec<_> = sink.published().into_iter().map(|m| m.event_id).collect();
    assert_eq!(order, [msgs[1].event_id.clone(), msgs[2].event_id.clone()]);

    // a row that keeps failing is dead-lettered after its attempts
    commit_each(&case, &outbox, &[Outgoing::new("flaky", "again")]).await;
    let failing = Recorder {
        down: true,
        ..Recorder::default()
    };
    let relay = Relay::new(outbox.clone(), failing).with_max_attempts(2);
    assert_eq!(relay.round().await.unwrap().retried, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.round().await.unwrap().dead_lettered, 1);
    let backlog = outbox.backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.dead), (0, 2));
}

/// Sent rows are kept for the retention, then purged; pending and dead rows are not.
pub async fn sent_rows_are_purged_after_their_retention<C: OutboxCase>() {
    let Some((case, outbox)) = open::<C>().await else {
        return;
    };
    commit_each(
        &case,
        &outbox,
        &[Outgoing::new("a", "1"), Outgoing::new("a", "2")],
    )
    .await;
    let rows = outbox.take("r1", 1, LONG).await.unwrap();
    outbox.sent(&[rows[0].id]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(outbox.purge_sent(LONG, 100).await.unwrap(), 0);
    assert_eq!(outbox.purge_sent(Duration::ZERO, 100).await.unwrap(), 1);
    assert_eq!(outbox.purge_sent(Duration::ZERO, 100).await.unwrap(), 0);
    assert_eq!(outbox.backlog().await.unwrap().pending, 1);
}

/// A relay whose every publish fails gives up after its patience with the broker's error, and
/// leaves every row pending, none dead.
pub async fn a_relay_gives_up_on_a_lost_broker<C: OutboxCase>() {
    let Some((case, outbox)) = open::<C>().await else {
        return;
    };
    commit_each(
        &case,
        &outbox,
        &[Outgoing::new("a", "1"), Outgoing::new("a", "2")],
    )
    .await;
    let sink = Recorder {
        down: true,
        ..Recorder::default()
    };
    let relay = Relay::new(outbox.clone(), sink)
        .with_patience(Duration::from_millis(500))
        .with_poll(Duration::from_millis(20));
    let ran = tokio::time::timeout(Duration::from_secs(30), relay.run(std::future::pending()))
        .await
        .expect("the relay gives up within its patience");
    assert!(
        matches!(ran, Err(idemgate_consumer::Error::Broker { .. })),
        "{ran:?}"
    );
    let backlog = outbox.backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.dead), (2, 0));
}

/// A handler that applies its effect and enqueues an event, and fails its first attempt of
/// order 3 after both.
struct Billing<C: OutboxCase> {
    case: Arc<C>,
    outbox: C::Outbox,
    runs: Arc<AtomicU32>,
}

impl<C: OutboxCase> InboxHandler<<C::Inbox as Inbox>::Tx, Message> for Billing<C> {
    async fn handle(
        &self,
        tx: &mut <C::Inbox as Inbox>::Tx,
        msg: &Message,
    ) -> Result<(), BoxError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let order = std::str::from_utf8(&msg.payload)?.to_owned();
        self.case.apply(tx, &order).await?;
        let event = Outgoing::new("invoices", format!("invoice for {order}"));
        self.outbox.enqueue(tx, &event).await?;
        if order == "3" && msg.deliveries == Some(1) {
            return Err("failed after the effect and the enqueue".into());
        }
        Ok(())
    }
}

/// Consume, transform, produce: an Inbox-mode handler's effect and its outgoing event commit
/// together (a failed attempt leaks neither; a duplicate adds neither). A relay killed after
/// publishing and before marking re-publishes with the same event ids after its lease, and the
/// downstream consumer applies each event once.
pub async fn consume_transform_produce_is_exactly_once<C: OutboxCase>() {
    let Some((case, outbox)) = open::<C>().await else {
        return;
    };
    let case = Arc::new(case);
    let upstream = MemoryBroker::new();
    for order in 1..=6 {
        for _ in 0..2 {
            upstream
                .send(Message::new("orders", order.to_string()).with_event_id(format!("o{order}")));
        }
    }
    upstream.close();
    let runs = Arc::new(AtomicU32::new(0));
    let handler = Billing {
        case: Arc::clone(&case),
        outbox: outbox.clone(),
        runs: Arc::clone(&runs),
    };
    let stats = Consumer::inbox("billing", case.inbox().clone())
        .with_retry_delay(Duration::from_millis(5))
        .run(upstream.source(), handler, std::future::pending())
        .await
        .unwrap();
    assert_eq!((stats.handled, stats.duplicates), (6, 6), "{stats:?}");
    assert!(runs.load(Ordering::SeqCst) >= 7, "order 3 ran twice");
    let effects = case.applied().await;
    assert_eq!(effects.len(), 6);
    assert!(effects.values().all(|(n, _)| *n == 1), "{effects:?}");
    let backlog = outbox.backlog().await.unwrap();
    assert_eq!(
        backlog.pending, 6,
        "one event per order, none from the failed attempt"
    );

    // a relay publishes three and dies before it marks them
    let downstream = MemoryBroker::new();
    let doomed = outbox
        .take("doomed", 3, Duration::from_millis(400))
        .await
        .unwrap();
    for row in &doomed {
        downstream.publish(&row.message).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let relay = Relay::new(outbox.clone(), downstream.clone());
    let round = relay.round().await.unwrap();
    assert_eq!(round.published, 6);
    downstream.close();
    assert_eq!(downstream.queued(), 9, "three re-published");
    let ledger = Consumer::gate("ledger", MemoryStore::new())
        .run(
            downstream.source(),
            |_msg: Message| async { Ok::<_, std::io::Error>(()) },
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!((ledger.handled, ledger.duplicates), (6, 3), "{ledger:?}");
}

/// Stamps one `#[tokio::test]` per outbox rule for `$case` (an [`OutboxCase`]).
#[macro_export]
macro_rules! outbox_conformance_tests {
    ($case:ty) => {
        mod outbox_conformance {
            #[allow(unused_imports)]
            use super::*;
            use $crate::outbox_conformance as c;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn only_committed_messages_are_taken() {
                c::only_committed_messages_are_taken::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_unmarked_row_comes_back_after_its_lease() {
                c::an_unmarked_row_comes_back_after_its_lease::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rows_of_one_key_leave_in_order() {
                c::rows_of_one_key_leave_in_order::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_relays_publish_each_row_once_in_order() {
                c::concurrent_relays_publish_each_row_once_in_order::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_relay_retries_and_dead_letters() {
                c::the_relay_retries_and_dead_letters::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sent_rows_are_purged_after_their_retention() {
                c::sent_rows_are_purged_after_their_retention::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_relay_gives_up_on_a_lost_broker() {
                c::a_relay_gives_up_on_a_lost_broker::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn consume_transform_produce_is_exactly_once() {
                c::consume_transform_produce_is_exactly_once::<$case>().await;
            }
        }
    };
}

//! The [`Inbox`] contract, one `pub async fn` per rule, for every inbox backend: stamped into
//! one `#[tokio::test]` each by [`inbox_conformance_tests!`](crate::inbox_conformance_tests).
//!
//! A backend's test file implements [`InboxCase`] (a fresh, migrated inbox with tables of its
//! own, and a deliberately non-idempotent effect written in the inbox's transaction) and calls
//! the macro:
//!
//! ```ignore
//! idemgate_testkit::inbox_conformance_tests!(PgCase);
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idemgate_consumer::memory::MemoryBroker;
use idemgate_consumer::{BoxError, Consumer, Delivery, Message, Source};
use idemgate_core::{Error, Inbox, InboxHandler, Key, Position};

/// One backend under the inbox conformance suite.
pub trait InboxCase: Sized + Send + Sync + 'static {
    /// The inbox under test.
    type Inbox: Inbox + Clone;

    /// A fresh, migrated inbox with tables of its own (and an effect table beside it),
    /// remembering keys for `retention`; `None` where the backend's service is not required
    /// and not running.
    fn open(retention: Duration) -> impl Future<Output = Option<Self>>;

    /// The inbox.
    fn inbox(&self) -> &Self::Inbox;

    /// The inbox in another table, as its `with_table` gives it.
    fn with_table(&self, table: &str) -> Self::Inbox;

    /// The inbox without an offsets table, as its constructor gives it.
    fn without_offsets(&self) -> Self::Inbox;

    /// The inbox's `migrate`.
    fn migrate(inbox: &Self::Inbox) -> impl Future<Output = Result<(), Error>> + Send;

    /// Drops `table` (as a user resetting it would).
    fn drop_table(&self, table: &str) -> impl Future<Output = ()> + Send;

    /// Applies the effect of `event` in `tx`, deliberately not idempotent (`applied + 1`).
    fn apply<'a>(
        &'a self,
        tx: &'a mut <Self::Inbox as Inbox>::Tx,
        event: &'a str,
    ) -> impl Future<Output = Result<(), BoxError>> + Send + 'a;

    /// How many times each event's effect was applied (committed effects only), and, where the
    /// database has a cheap transaction id, the id each effect was written under.
    fn applied(&self) -> impl Future<Output = BTreeMap<String, (u64, Option<i64>)>> + Send;
}

fn key(id: &str) -> Key {
    Key::new("ledger", id).expect("a valid key")
}

/// A second transaction recording the same key waits for the first, then sees a duplicate; a
/// rolled-back first sighting leaves the key free.
pub async fn duplicate_waits_then_sees_a_duplicate<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let inbox = case.inbox().clone();
    let mut first = inbox.begin().await.unwrap();
    assert!(inbox.first_time(&mut first, &key("evt-1")).await.unwrap());
    let second = {
        let inbox = inbox.clone();
        tokio::spawn(async move {
            let mut tx = inbox.begin().await.unwrap();
            let seen = inbox.first_time(&mut tx, &key("evt-1")).await.unwrap();
            inbox.commit(tx).await.unwrap();
            seen
        })
    };
    // the second transaction waits on the first until it commits
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished(), "the second transaction did not wait");
    inbox.commit(first).await.unwrap();
    assert!(
        !second.await.unwrap(),
        "both transactions saw the key for the first time"
    );

    let mut tx = inbox.begin().await.unwrap();
    assert!(inbox.first_time(&mut tx, &key("evt-2")).await.unwrap());
    drop(tx);
    let mut tx = inbox.begin().await.unwrap();
    assert!(
        inbox.first_time(&mut tx, &key("evt-2")).await.unwrap(),
        "a rolled-back sighting kept the key"
    );
    inbox.commit(tx).await.unwrap();
}

/// Eight tasks process the same 100 keys concurrently, each key's effect in the inbox's
/// transaction: every effect is applied exactly once.
pub async fn concurrent_transactions_apply_each_effect_once<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let case = Arc::new(case);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let case = Arc::clone(&case);
            tokio::spawn(async move {
                let inbox = case.inbox();
                let mut applied = 0;
                for i in 0..100 {
                    let event = format!("e{i}");
                    loop {
                        let mut tx = inbox.begin().await.unwrap();
                        match inbox.first_time(&mut tx, &key(&event)).await {
                            Ok(true) => {
                                case.apply(&mut tx, &event).await.unwrap();
                                match inbox.commit(tx).await {
                                    Ok(()) => applied += 1,
                                    Err(e) if e.is_retryable() => continue,
                                    Err(e) => panic!("{e}"),
                                }
                            }
                            Ok(false) => inbox.commit(tx).await.unwrap(),
                            // a deadlock or serialization failure: retry, never a duplicate
                            Err(e) if e.is_retryable() => continue,
                            Err(e) => panic!("{e}"),
                        }
                        break;
                    }
                }
                applied
            })
        })
        .collect();
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap();
    }
    assert_eq!(applied, 100);
    let effects = case.applied().await;
    assert_eq!(effects.len(), 100);
    assert!(effects.values().all(|(n, _)| *n == 1), "{effects:?}");
}

/// A batch answers per key, in order: new keys `true`, a repeat within the batch and a key
/// recorded before `false`.
pub async fn batches_answer_per_key<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let inbox = case.inbox();
    let mut tx = inbox.begin().await.unwrap();
    assert!(inbox.first_time(&mut tx, &key("known")).await.unwrap());
    inbox.commit(tx).await.unwrap();
    let keys: Vec<Key> = ["a", "b", "a", "known", "c"].map(key).to_vec();
    let mut tx = inbox.begin().await.unwrap();
    assert_eq!(
        inbox.first_time_many(&mut tx, &keys).await.unwrap(),
        [true, true, false, false, true]
    );
    inbox.commit(tx).await.unwrap();
    let mut tx = inbox.begin().await.unwrap();
    assert_eq!(
        inbox.first_time_many(&mut tx, &keys[..2]).await.unwrap(),
        [false, false]
    );
    assert_eq!(
        inbox.first_time_many(&mut tx, &[]).await.unwrap(),
        Vec::<bool>::new()
    );
}

/// A key is new again once its retention ran out, and the purge deletes expired keys in
/// batches of at most its limit.
pub async fn expired_keys_are_new_again_and_purged<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_millis(500)).await else {
        return;
    };
    let inbox = case.inbox();
    let mut tx = inbox.begin().await.unwrap();
    for i in 0..5 {
        assert!(
            inbox
                .first_time(&mut tx, &key(&format!("r{i}")))
                .await
                .unwrap()
        );
    }
    assert!(!inbox.first_time(&mut tx, &key("r0")).await.unwrap());
    inbox.commit(tx).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut tx = inbox.begin().await.unwrap();
    assert!(
        inbox.first_time(&mut tx, &key("r0")).await.unwrap(),
        "a key outlived its retention"
    );
    inbox.commit(tx).await.unwrap();
    let mut purged = 0;
    for _ in 0..20 {
        let n = inbox.purge_expired(3).await.unwrap();
        assert!(n <= 3, "a purge of limit 3 deleted {n}");
        purged += n;
        if n == 0 && purged >= 4 {
            break;
        }
    }
    assert_eq!(purged, 4, "four keys expired (r0 was recorded again)");
    let mut tx = inbox.begin().await.unwrap();
    assert!(!inbox.first_time(&mut tx, &key("r0")).await.unwrap());
}

/// Positions move by compare-and-set in the inbox's transaction: a stale writer is fenced and
/// changes nothing, and only committed positions load.
pub async fn offsets_advance_by_compare_and_set<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let inbox = case.inbox();
    let at = |offset, expected| Position::new("g", "t", 0, offset, expected);
    let mut tx = inbox.begin().await.unwrap();
    inbox.advance(&mut tx, &at(9, None)).await.unwrap();
    inbox.advance(&mut tx, &at(10, Some(10))).await.unwrap();
    let e = inbox.advance(&mut tx, &at(11, Some(10))).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Fenced {
                expected: Some(10),
                found: Some(11),
                ..
            }
        ),
        "{e:?}"
    );
    let e = inbox.advance(&mut tx, &at(0, None)).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Fenced {
                expected: None,
                found: Some(11),
                ..
            }
        ),
        "{e:?}"
    );
    inbox.commit(tx).await.unwrap();
    let mut tx = inbox.begin().await.unwrap();
    inbox
        .advance(&mut tx, &Position::new("g", "t", 1, 4, None))
        .await
        .unwrap();
    drop(tx);
    let positions = inbox.load_positions("g", "t").await.unwrap();
    assert_eq!(positions.into_iter().collect::<Vec<_>>(), [(0, 11)]);
}

/// 200 events, every one published twice, and a quarter of them a third time.
fn publish(broker: &MemoryBroker) {
    for round in 0..3 {
        for i in 0..200 {
            if round < 2 || i % 4 == 0 {
                broker
                    .send(Message::new("ledger", format!("{i}")).with_event_id(format!("evt-{i}")));
            }
        }
    }
    broker.close();
}

/// The runtime test's handler: the effect, then every 10th event fails once and every 10th
/// from 5 panics once.
struct FailsOnce<C> {
    case: Arc<C>,
    failures: Arc<AtomicUsize>,
}

impl<C: InboxCase> InboxHandler<<C::Inbox as Inbox>::Tx, Message> for FailsOnce<C> {
    async fn handle(
        &self,
        tx: &mut <C::Inbox as Inbox>::Tx,
        msg: &Message,
    ) -> Result<(), BoxError> {
        let n: u32 = std::str::from_utf8(&msg.payload)?.parse()?;
        self.case.apply(tx, &n.to_string()).await?;
        // every 10th event fails once, after its effect: the rollback undoes both rows
        if n.is_multiple_of(10) && msg.deliveries == Some(1) {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err("failed after the effect".into());
        }
        // and every 10th from 5 panics once, after its effect: the same
        if n % 10 == 5 && msg.deliveries == Some(1) {
            self.failures.fetch_add(1, Ordering::SeqCst);
            panic!("a handler bug after the effect");
        }
        Ok(())
    }
}

/// The consumer runtime in Inbox mode, `batch` deliveries per transaction, under duplicates,
/// concurrent copies, a handler that fails after its effect and one that panics after it: every
/// effect exactly once.
pub async fn the_runtime_applies_every_event_once<C: InboxCase>(batch: usize) {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let case = Arc::new(case);
    let broker = MemoryBroker::new();
    publish(&broker);
    let failures = Arc::new(AtomicUsize::new(0));
    let handler = FailsOnce {
        case: Arc::clone(&case),
        failures: Arc::clone(&failures),
    };
    let stats = Consumer::inbox("ledger", case.inbox().clone())
        .with_concurrency(8)
        .with_batch(batch)
        .with_retry_delay(Duration::from_millis(5))
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    let effects = case.applied().await;
    assert_eq!(effects.len(), 200, "{stats:?}");
    assert!(
        effects.values().all(|(n, _)| *n == 1),
        "an effect applied twice: {stats:?}"
    );
    assert_eq!((stats.handled, stats.duplicates), (200, 250), "{stats:?}");
    let txids: Vec<i64> = effects.values().filter_map(|(_, t)| *t).collect();
    if !txids.is_empty() {
        let mut distinct = txids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if batch == 1 {
            assert_eq!(distinct.len(), txids.len(), "one transaction per message");
        } else {
            assert!(
                distinct.len() < txids.len(),
                "{} transactions for {} messages: not batched",
                distinct.len(),
                txids.len()
            );
        }
    }
    let failures = failures.load(Ordering::SeqCst) as u64;
    assert!(failures >= 1);
    if batch == 1 {
        assert_eq!(stats.retried, failures);
    } else {
        // a failure in a batch is met again when its message runs alone, and counted then
        assert!((1..=failures).contains(&stats.retried), "{stats:?}");
    }
}

/// A dead-lettered key is recorded in the transaction that commits once the dead letter is
/// stored: the event's three copies end in the dead-letter destination once.
pub async fn a_dead_letter_is_recorded_once<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let broker = MemoryBroker::new();
    for _ in 0..3 {
        broker.send(Message::new("ledger", "poison").with_event_id("evt-broken"));
    }
    broker.close();
    let handler = async |_tx: &mut <C::Inbox as Inbox>::Tx,
                         _msg: &Message|
           -> Result<(), BoxError> { Err("always broken".into()) };
    let stats = Consumer::inbox("ledger", case.inbox().clone())
        .with_max_attempts(2)
        .with_retry_delay(Duration::from_millis(5))
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    assert_eq!(broker.dead_letters().len(), 1, "{stats:?}");
    assert_eq!((stats.dead_lettered, stats.duplicates), (1, 2), "{stats:?}");
}

/// Sixteen events on one lane: event 0 holds its batch until all sixteen were received, so the
/// events after its batch share the next one, and every event is in a batch of several; event
/// 7's handler fails once, after its effect (with `fail`). Counts each handler's runs.
struct Isolates<C> {
    case: Arc<C>,
    stats: idemgate_consumer::StatsHandle,
    runs: Arc<std::sync::Mutex<BTreeMap<u32, u32>>>,
    fail: bool,
}

impl<C: InboxCase> InboxHandler<<C::Inbox as Inbox>::Tx, Message> for Isolates<C> {
    async fn handle(
        &self,
        tx: &mut <C::Inbox as Inbox>::Tx,
        msg: &Message,
    ) -> Result<(), BoxError> {
        let n: u32 = std::str::from_utf8(&msg.payload)?.parse()?;
        let run = {
            let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
            let run = runs.entry(n).or_insert(0);
            *run += 1;
            *run
        };
        if n == 0 {
            let all = self.stats.until(|s| s.received >= 16);
            tokio::time::timeout(Duration::from_secs(30), all).await?;
        }
        self.case.apply(tx, &n.to_string()).await?;
        if self.fail && n == 7 && run == 1 {
            return Err("event 7 fails once, after its effect".into());
        }
        Ok(())
    }
}

/// The sixteen events, `evt-0` to `evt-15`.
fn sixteen_events() -> Vec<Message> {
    (0..16)
        .map(|n| Message::new("ledger", format!("{n}")).with_event_id(format!("evt-{n}")))
        .collect()
}

/// Runs sixteen events through `inbox`, batches of 16, on one lane; returns the handler runs
/// per event and the stats.
async fn sixteen<C: InboxCase, I>(
    case: &Arc<C>,
    inbox: I,
    fail: bool,
) -> (BTreeMap<u32, u32>, idemgate_consumer::Stats)
where
    I: Inbox<Tx = <C::Inbox as Inbox>::Tx>,
{
    let broker = MemoryBroker::new();
    for msg in sixteen_events() {
        broker.send(msg);
    }
    broker.close();
    sixteen_from(case, inbox, fail, broker.source()).await
}

/// [`sixteen`], from `source`.
async fn sixteen_from<C: InboxCase, I, S: Source>(
    case: &Arc<C>,
    inbox: I,
    fail: bool,
    source: S,
) -> (BTreeMap<u32, u32>, idemgate_consumer::Stats)
where
    I: Inbox<Tx = <C::Inbox as Inbox>::Tx>,
{
    let consumer = Consumer::inbox("ledger", inbox)
        .with_concurrency(1)
        .with_batch(16)
        .with_retry_delay(Duration::from_millis(5));
    let runs = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let handler = Isolates {
        case: Arc::clone(case),
        stats: consumer.stats_handle(),
        runs: Arc::clone(&runs),
        fail,
    };
    let stats = tokio::time::timeout(
        Duration::from_secs(60),
        consumer.run(source, handler, std::future::pending()),
    )
    .await
    .expect("the consumer drained its source")
    .unwrap();
    let runs = runs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (runs, stats)
}

/// One failing handler in a batch costs only its own message: it alone runs again, the others
/// ran once and committed together, every effect exactly once.
pub async fn a_failing_handler_costs_only_its_own_message<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let case = Arc::new(case);
    let (runs, stats) = sixteen(&case, case.inbox().clone(), true).await;
    for n in 0..16 {
        let expected = if n == 7 { 2 } else { 1 };
        assert_eq!(
            runs.get(&n),
            Some(&expected),
            "event {n}: {runs:?} {stats:?}"
        );
    }
    assert_eq!((stats.handled, stats.retried), (16, 1), "{stats:?}");
    let effects = case.applied().await;
    assert_eq!(effects.len(), 16, "{effects:?}");
    assert!(effects.values().all(|(n, _)| *n == 1), "{effects:?}");
    // where the database tells transactions apart: batches committed, and event 7's retry
    // committed on its own
    let mut per_tx: BTreeMap<i64, u32> = BTreeMap::new();
    for (_, tx) in effects.values() {
        if let Some(tx) = tx {
            *per_tx.entry(*tx).or_default() += 1;
        }
    }
    if let Some((_, Some(seventh))) = effects.get("7") {
        assert!(per_tx.values().any(|n| *n > 1), "no batch: {effects:?}");
        assert_eq!(per_tx[seventh], 1, "{effects:?}");
    }
}

/// A queue that can hand out one message under two receipts, as SQS does once a held
/// message's visibility timeout passes: settling either receipt settles the message, and a
/// receipt of a message that is gone settles nothing (a nack brings nothing back).
#[derive(Clone)]
struct Receipts {
    state: Arc<std::sync::Mutex<ReceiptsState>>,
    notify: Arc<tokio::sync::Notify>,
}

struct ReceiptsState {
    messages: Vec<Message>,
    gone: Vec<bool>,
    /// Messages to hand out, by index, in order (one index twice: two receipts).
    visible: std::collections::VecDeque<usize>,
    held: usize,
}

impl Receipts {
    fn new(messages: Vec<Message>, order: impl IntoIterator<Item = usize>) -> Self {
        let gone = vec![false; messages.len()];
        Receipts {
            state: Arc::new(std::sync::Mutex::new(ReceiptsState {
                messages,
                gone,
                visible: order.into_iter().collect(),
                held: 0,
            })),
            notify: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReceiptsState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Settles receipt `i`: the message is `gone`, or visible again.
    fn settle(&self, i: usize, gone: bool) {
        let mut s = self.state();
        s.held -= 1;
        if gone {
            s.gone[i] = true;
        } else if !s.gone[i] {
            s.visible.push_back(i);
        }
        drop(s);
        self.notify.notify_waiters();
    }
}

struct Receipt {
    queue: Receipts,
    i: usize,
    msg: Message,
    settled: bool,
}

impl Source for Receipts {
    type Delivery = Receipt;

    async fn recv(&mut self) -> idemgate_consumer::Result<Option<Receipt>> {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.state();
                while let Some(i) = s.visible.pop_front() {
                    if !s.gone[i] {
                        s.held += 1;
                        let msg = s.messages[i].clone();
                        return Ok(Some(Receipt {
                            queue: self.clone(),
                            i,
                            msg,
                            settled: false,
                        }));
                    }
                }
                if s.held == 0 {
                    return Ok(None);
                }
            }
            notified.await;
        }
    }
}

impl Delivery for Receipt {
    fn message(&self) -> &Message {
        &self.msg
    }

    async fn ack(mut self) -> idemgate_consumer::Result<()> {
        self.settled = true;
        self.queue.settle(self.i, true);
        Ok(())
    }

    async fn nack(mut self, delay: Duration) -> idemgate_consumer::Result<()> {
        self.settled = true;
        // visible again after the delay, at least 100 ms (SQS counts whole seconds)
        let (queue, i) = (self.queue.clone(), self.i);
        tokio::spawn(async move {
            tokio::time::sleep(delay.max(Duration::from_millis(100))).await;
            queue.settle(i, false);
        });
        Ok(())
    }

    async fn dead_letter(mut self, _reason: &str) -> idemgate_consumer::Result<()> {
        self.settled = true;
        self.queue.settle(self.i, true);
        Ok(())
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        if !self.settled {
            self.queue.settle(self.i, false);
        }
    }
}

/// A message held twice in one batch (received again under a second receipt, as SQS hands out
/// a message whose visibility timeout passed) whose handler fails: the second copy is not acked
/// as a duplicate (that would delete the message the first copy gives back), and the event is
/// applied once.
pub async fn a_failed_message_received_twice_is_not_acked<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let case = Arc::new(case);
    // evt-7 twice in a row: both receipts in one batch
    let order = (0..16).flat_map(|n| if n == 7 { vec![7, 7] } else { vec![n] });
    let queue = Receipts::new(sixteen_events(), order);
    let (runs, stats) = sixteen_from(&case, case.inbox().clone(), true, queue).await;
    let effects = case.applied().await;
    assert_eq!(effects.len(), 16, "evt-7 was lost: {effects:?} {stats:?}");
    assert!(effects.values().all(|(n, _)| *n == 1), "{effects:?}");
    assert_eq!(runs.get(&7), Some(&2), "{runs:?} {stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
}

/// An inbox whose first commit of a batch (several keys) fails after the work: a database
/// failure mid-batch.
#[derive(Debug)]
struct FailsFirstBatchCommit<I> {
    inner: I,
    batch: std::sync::atomic::AtomicBool,
    failed: std::sync::atomic::AtomicBool,
}

impl<I: Inbox> Inbox for FailsFirstBatchCommit<I> {
    type Tx = I::Tx;

    async fn begin(&self) -> Result<I::Tx, Error> {
        self.inner.begin().await
    }

    async fn first_time(&self, tx: &mut I::Tx, key: &Key) -> Result<bool, Error> {
        self.inner.first_time(tx, key).await
    }

    async fn first_time_many(&self, tx: &mut I::Tx, keys: &[Key]) -> Result<Vec<bool>, Error> {
        if keys.len() > 1 {
            self.batch.store(true, Ordering::SeqCst);
        }
        self.inner.first_time_many(tx, keys).await
    }

    async fn savepoint(&self, tx: &mut I::Tx, n: u32) -> Result<bool, Error> {
        self.inner.savepoint(tx, n).await
    }

    async fn rollback_to(&self, tx: &mut I::Tx, n: u32) -> Result<(), Error> {
        self.inner.rollback_to(tx, n).await
    }

    async fn forget(&self, tx: &mut I::Tx, key: &Key) -> Result<(), Error> {
        self.inner.forget(tx, key).await
    }

    async fn commit(&self, tx: I::Tx) -> Result<(), Error> {
        if self.batch.swap(false, Ordering::SeqCst) && !self.failed.swap(true, Ordering::SeqCst) {
            drop(tx);
            return Err(Error::Unavailable {
                backend: "test",
                source: "the connection was lost at the commit".into(),
            });
        }
        self.inner.commit(tx).await
    }

    fn retention(&self) -> Duration {
        self.inner.retention()
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64, Error> {
        self.inner.purge_expired(limit).await
    }

    async fn advance(&self, tx: &mut I::Tx, position: &Position) -> Result<(), Error> {
        self.inner.advance(tx, position).await
    }

    async fn load_positions(&self, group: &str, topic: &str) -> Result<BTreeMap<i32, i64>, Error> {
        self.inner.load_positions(group, topic).await
    }
}

/// A database failure mid-batch (the first commit of a batch fails) rolls the batch back, and
/// its messages run again one per transaction: their handlers ran twice, the others' once,
/// each effect committed once.
pub async fn a_failed_batch_runs_again_and_applies_each_once<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let case = Arc::new(case);
    let inbox = FailsFirstBatchCommit {
        inner: case.inbox().clone(),
        batch: Default::default(),
        failed: Default::default(),
    };
    let (runs, stats) = sixteen(&case, inbox, false).await;
    assert_eq!(runs.len(), 16, "{runs:?}");
    let again = runs.values().filter(|n| **n == 2).count();
    assert!(
        again >= 2 && runs.values().all(|n| *n == 1 || *n == 2),
        "the failed batch (several events) ran twice, nothing else: {runs:?}"
    );
    assert_eq!(stats.handled, 16, "{stats:?}");
    let effects = case.applied().await;
    assert_eq!(effects.len(), 16, "{effects:?}");
    assert!(effects.values().all(|(n, _)| *n == 1), "{effects:?}");
}

/// A table name that is not an identifier fails every call on it with [`Error::Config`], on an
/// open transaction too, before any statement is sent.
pub async fn a_bad_table_name_refuses_every_call<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let inbox = case.with_table("x; drop table y");
    let mut tx = inbox.begin().await.unwrap();
    assert!(matches!(
        inbox.first_time(&mut tx, &key("evt-1")).await,
        Err(Error::Config { .. })
    ));
    assert!(matches!(
        inbox
            .first_time_many(&mut tx, &[key("evt-1"), key("evt-2")])
            .await,
        Err(Error::Config { .. })
    ));
    drop(tx);
    assert!(matches!(
        inbox.purge_expired(10).await,
        Err(Error::Config { .. })
    ));
}

/// A table dropped to reset it is created again by `migrate`, though `idemgate_schema` still
/// records its version, and starts empty.
pub async fn a_dropped_table_is_created_again<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let table = crate::service::unique("reset");
    let inbox = case.with_table(&table);
    C::migrate(&inbox).await.unwrap();
    let mut tx = inbox.begin().await.unwrap();
    assert!(inbox.first_time(&mut tx, &key("evt-1")).await.unwrap());
    inbox.commit(tx).await.unwrap();
    case.drop_table(&table).await;
    C::migrate(&inbox)
        .await
        .expect("migrate creates a dropped table again");
    let mut tx = inbox.begin().await.unwrap();
    assert!(
        inbox.first_time(&mut tx, &key("evt-1")).await.unwrap(),
        "the table starts empty"
    );
    inbox.commit(tx).await.unwrap();
    let mut tx = inbox.begin().await.unwrap();
    assert!(!inbox.first_time(&mut tx, &key("evt-1")).await.unwrap());
    drop(tx);
    case.drop_table(&table).await;
}

/// An inbox built without an offsets table refuses positions with `Error::Config`, and
/// records keys all the same.
pub async fn positions_need_an_offsets_table<C: InboxCase>() {
    let Some(case) = C::open(Duration::from_secs(600)).await else {
        return;
    };
    let inbox = case.without_offsets();
    C::migrate(&inbox).await.unwrap();
    let mut tx = inbox.begin().await.unwrap();
    assert!(inbox.first_time(&mut tx, &key("evt-1")).await.unwrap());
    let position = Position::new("g", "t", 0, 5, None);
    assert!(matches!(
        inbox.advance(&mut tx, &position).await,
        Err(Error::Config { .. })
    ));
    drop(tx);
    assert!(matches!(
        inbox.load_positions("g", "t").await,
        Err(Error::Config { .. })
    ));
}

/// Stamps the inbox conformance suite for an [`InboxCase`] as `#[tokio::test]`s.
#[macro_export]
macro_rules! inbox_conformance_tests {
    ($case:ty) => {
        mod inbox_conformance {
            #[allow(unused_imports)]
            use super::*;
            use $crate::inbox_conformance as c;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn duplicate_waits_then_sees_a_duplicate() {
                c::duplicate_waits_then_sees_a_duplicate::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_transactions_apply_each_effect_once() {
                c::concurrent_transactions_apply_each_effect_once::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn batches_answer_per_key() {
                c::batches_answer_per_key::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expired_keys_are_new_again_and_purged() {
                c::expired_keys_are_new_again_and_purged::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_dropped_table_is_created_again() {
                c::a_dropped_table_is_created_again::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn positions_need_an_offsets_table() {
                c::positions_need_an_offsets_table::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn offsets_advance_by_compare_and_set() {
                c::offsets_advance_by_compare_and_set::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_failing_handler_costs_only_its_own_message() {
                c::a_failing_handler_costs_only_its_own_message::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_failed_message_received_twice_is_not_acked() {
                c::a_failed_message_received_twice_is_not_acked::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_failed_batch_runs_again_and_applies_each_once() {
                c::a_failed_batch_runs_again_and_applies_each_once::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_runtime_applies_every_event_once() {
                c::the_runtime_applies_every_event_once::<$case>(1).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_runtime_in_batches_applies_every_event_once() {
                c::the_runtime_applies_every_event_once::<$case>(16).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_dead_letter_is_recorded_once() {
                c::a_dead_letter_is_recorded_once::<$case>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_bad_table_name_refuses_every_call() {
                c::a_bad_table_name_refuses_every_call::<$case>().await;
            }
        }
    };
}

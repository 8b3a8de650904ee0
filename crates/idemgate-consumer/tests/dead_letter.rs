//! A dead letter that waits for the database keeps its delivery in progress at the broker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use idemgate_consumer::memory::MemoryBroker;
use idemgate_consumer::{BoxError, Consumer, Delivery, InboxHandler, Message, Source};
use idemgate_core::{Error, Inbox, Key, Position, Result};
use idemgate_sqlite::{SqliteInbox, SqliteTx};

/// An inbox whose database is away while `down` is set, and whose next `fail_commits` commits
/// fail (their transactions rolled back).
#[derive(Clone)]
struct Away {
    inner: SqliteInbox,
    down: Arc<AtomicBool>,
    fail_commits: Arc<AtomicUsize>,
}

impl Away {
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                backend: "test",
                source: "the database restarts".into(),
            });
        }
        Ok(())
    }
}

impl Inbox for Away {
    type Tx = SqliteTx;

    async fn begin(&self) -> Result<SqliteTx> {
        self.check()?;
        self.inner.begin().await
    }
    async fn first_time(&self, tx: &mut SqliteTx, key: &Key) -> Result<bool> {
        self.inner.first_time(tx, key).await
    }
    async fn first_time_many(&self, tx: &mut SqliteTx, keys: &[Key]) -> Result<Vec<bool>> {
        self.inner.first_time_many(tx, keys).await
    }
    async fn savepoint(&self, tx: &mut SqliteTx, n: u32) -> Result<bool> {
        self.inner.savepoint(tx, n).await
    }
    async fn rollback_to(&self, tx: &mut SqliteTx, n: u32) -> Result<()> {
        self.inner.rollback_to(tx, n).await
    }
    async fn forget(&self, tx: &mut SqliteTx, key: &Key) -> Result<()> {
        self.inner.forget(tx, key).await
    }
    async fn commit(&self, tx: SqliteTx) -> Result<()> {
        let fail = self
            .fail_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            drop(tx);
            return Err(Error::Unavailable {
                backend: "test",
                source: "the connection dropped at the commit".into(),
            });
        }
        self.inner.commit(tx).await
    }
    fn retention(&self) -> Duration {
        self.inner.retention()
    }
    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        self.inner.purge_expired(limit).await
    }
    async fn advance(&self, tx: &mut SqliteTx, position: &Position) -> Result<()> {
        self.inner.advance(tx, position).await
    }
    async fn load_positions(&self, group: &str, topic: &str) -> Result<BTreeMap<i32, i64>> {
        self.inner.load_positions(group, topic).await
    }
}

/// What a [`Hooked`] source's deliveries do around the broker's own settlement.
trait Hooks: Send + Sync + 'static {
    /// Before the dead letter: an error here is the broker refusing it.
    fn before_dead_letter(&self) -> idemgate_consumer::Result<()> {
        Ok(())
    }
    /// Once the broker stored the dead letter.
    fn after_dead_letter(&self) {}
    /// On each in-progress signal.
    fn in_progress(&self) {}
}

/// A source whose deliveries run `H` around their dead letters and in-progress signals.
struct Hooked<S, H> {
    inner: S,
    hooks: Arc<H>,
}

impl<S, H> Hooked<S, H> {
    fn new(inner: S, hooks: H) -> Self {
        Hooked {
            inner,
            hooks: Arc::new(hooks),
        }
    }
}

struct HookedDelivery<D, H> {
    inner: D,
    hooks: Arc<H>,
}

impl<D: Delivery, H: Hooks> Delivery for HookedDelivery<D, H> {
    fn message(&self) -> &Message {
        self.inner.message()
    }
    async fn ack(self) -> idemgate_consumer::Result<()> {
        self.inner.ack().await
    }
    async fn nack(self, delay: Duration) -> idemgate_consumer::Result<()> {
        self.inner.nack(delay).await
    }
    async fn dead_letter(self, reason: &str) -> idemgate_consumer::Result<()> {
        // refused: dropped unsettled, so the broker redelivers it
        self.hooks.before_dead_letter()?;
        self.inner.dead_letter(reason).await?;
        self.hooks.after_dead_letter();
        Ok(())
    }
    async fn in_progress(&self) -> idemgate_consumer::Result<()> {
        self.hooks.in_progress();
        self.inner.in_progress().await
    }
}

impl<S: Source, H: Hooks> Source for Hooked<S, H> {
    type Delivery = HookedDelivery<S::Delivery, H>;
    async fn recv(&mut self) -> idemgate_consumer::Result<Option<Self::Delivery>> {
        Ok(self.inner.recv().await?.map(|d| HookedDelivery {
            inner: d,
            hooks: Arc::clone(&self.hooks),
        }))
    }
}

/// Counts the in-progress signals.
struct CountsSignals(Arc<AtomicUsize>);

impl Hooks for CountsSignals {
    fn in_progress(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The broker refuses the first `.0` dead letters.
struct RefusesDeadLetters(AtomicUsize);

impl Hooks for RefusesDeadLetters {
    fn before_dead_letter(&self) -> idemgate_consumer::Result<()> {
        let refused = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            return Err(idemgate_consumer::Error::Broker {
                broker: "test",
                message: "the broker is down".into(),
                source: None,
            });
        }
        Ok(())
    }
}

/// Once a dead letter is stored, fails the commit that records it and takes the database away
/// for 300 ms.
struct FailsTheRecord {
    down: Arc<AtomicBool>,
    fail_commits: Arc<AtomicUsize>,
}

impl Hooks for FailsTheRecord {
    fn after_dead_letter(&self) {
        self.fail_commits.store(1, Ordering::SeqCst);
        self.down.store(true, Ordering::SeqCst);
        let down = Arc::clone(&self.down);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            down.store(false, Ordering::SeqCst);
        });
    }
}

/// The handler: fails its one attempt and takes the database away for 2 s, noting how many
/// in-progress signals the delivery had sent by then.
struct FailsAndTakesTheDatabase {
    down: Arc<AtomicBool>,
    signals: Arc<AtomicUsize>,
    before: Arc<AtomicUsize>,
}

impl InboxHandler<SqliteTx, Message> for FailsAndTakesTheDatabase {
    async fn handle(
        &self,
        _tx: &mut SqliteTx,
        _msg: &Message,
    ) -> std::result::Result<(), BoxError> {
        self.before
            .store(self.signals.load(Ordering::SeqCst), Ordering::SeqCst);
        self.down.store(true, Ordering::SeqCst);
        let down = Arc::clone(&self.down);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            down.store(false, Ordering::SeqCst);
        });
        Err("the handler fails".into())
    }
}

/// A message out of attempts is dead-lettered in a transaction that records its key. While the
/// database is away that transaction is retried, and the delivery must stay in progress at the
/// broker all along: otherwise SQS shows the message again and, past its redrive budget,
/// dead-letters it itself, without the reason, beside the consumer's own dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_waiting_for_the_database_stays_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteInbox::open(dir.path().join("app.db")).unwrap();
    sqlite.migrate().await.unwrap();
    let down = Arc::new(AtomicBool::new(false));
    let inbox = Away {
        inner: sqlite,
        down: Arc::clone(&down),
        fail_commits: Arc::default(),
    };
    let broker = MemoryBroker::new();
    broker.send(Message::new("orders", "1").with_event_id("evt-1"));
    broker.close();
    let signals = Arc::new(AtomicUsize::new(0));
    let source = Hooked::new(broker.source(), CountsSignals(Arc::clone(&signals)));
    let before = Arc::new(AtomicUsize::new(0));
    let handler = FailsAndTakesTheDatabase {
        down,
        signals: Arc::clone(&signals),
        before: Arc::clone(&before),
    };
    // a signal every 100 ms (a third of the lease)
    let consumer = Consumer::inbox("orders", inbox)
        .with_max_attempts(1)
        .with_lease(Duration::from_millis(300))
        .with_retry_delay(Duration::from_millis(5));
    let stats = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(source, handler, std::future::pending()),
    )
    .await
    .expect("the dead letter is stored once the database is back")
    .unwrap();
    let during = signals.load(Ordering::SeqCst) - before.load(Ordering::SeqCst);
    assert!(
        during >= 5,
        "{during} in-progress signals while the dead letter waited 2 s for the database"
    );
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(broker.dead_letters().len(), 1);
}

/// Applies a message by writing its id into `applied`, in the inbox transaction; `poison`
/// always fails.
struct Applies;

impl InboxHandler<SqliteTx, Message> for Applies {
    async fn handle(&self, tx: &mut SqliteTx, msg: &Message) -> std::result::Result<(), BoxError> {
        let id = msg.event_id.clone().unwrap_or_default();
        if id == "poison" {
            return Err("always fails".into());
        }
        if id == "refused" {
            return Err(idemgate_consumer::Permanent::new("the amount is negative").into());
        }
        tx.execute("INSERT INTO applied (id) VALUES (?1)", [id])?;
        Ok(())
    }
}

/// An exhausted message whose dead letter the broker could not take goes back to the broker,
/// and comes again. The later messages of its key that were in its batch are applied in their
/// order, before the ones the lane holds behind them: given back with it, they would come
/// again after those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_went_nowhere_keeps_its_keys_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let inbox = SqliteInbox::open(&path).unwrap();
    inbox.migrate().await.unwrap();
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute_batch("CREATE TABLE applied (n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT)")
        .unwrap();
    let broker = MemoryBroker::new();
    let ids = ["poison", "1", "2", "3", "4", "5", "6"];
    for id in ids {
        broker.send(
            Message::new("orders", id)
                .with_event_id(id)
                .with_ordering_key("account-7"),
        );
    }
    broker.close();
    let source = Hooked::new(broker.source(), RefusesDeadLetters(AtomicUsize::new(1)));
    let stats = tokio::time::timeout(
        Duration::from_secs(30),
        Consumer::inbox("orders", inbox)
            .with_batch(3)
            .with_max_attempts(1)
            .with_retry_delay(Duration::from_millis(5))
            .run(source, Applies, std::future::pending()),
    )
    .await
    .expect("the consumer drains the queue")
    .unwrap();
    let applied: Vec<String> = db
        .prepare("SELECT id FROM applied ORDER BY n")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(applied, ["1", "2", "3", "4", "5", "6"], "{stats:?}");
    assert_eq!(stats.dead_letter_failures, 1, "{stats:?}");
    assert_eq!(broker.dead_letters().len(), 1, "{stats:?}");
}

/// In Inbox mode a `Permanent` failure is dead-lettered at once too, its key recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_in_inbox_mode_is_dead_lettered_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let inbox = SqliteInbox::open(&path).unwrap();
    inbox.migrate().await.unwrap();
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute_batch("CREATE TABLE applied (n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT)")
        .unwrap();
    let broker = MemoryBroker::new();
    for id in ["refused", "1", "refused"] {
        broker.send(Message::new("orders", id).with_event_id(id));
    }
    broker.close();
    let stats = Consumer::inbox("orders", inbox)
        .with_max_attempts(5)
        .with_retry_delay(Duration::from_millis(5))
        .run(broker.source(), Applies, std::future::pending())
        .await
        .unwrap();
    assert_eq!(stats.retried, 0, "{stats:?}");
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1, "the copy is acked as a duplicate: {stats:?}");
    assert!(
        dead[0].1.contains("the amount is negative"),
        "{}",
        dead[0].1
    );
    let applied: i64 = db
        .query_row("SELECT count(*) FROM applied", [], |r| r.get(0))
        .unwrap();
    assert_eq!(applied, 1);
}

/// A dead letter is stored, then the commit that records its key fails and the database is away
/// for a while: the key is recorded once the database is back, so a copy of the event that
/// comes later is acked as a duplicate, not dead-lettered a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_whose_record_failed_is_recorded_once_the_database_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let sqlite = SqliteInbox::open(&path).unwrap();
    sqlite.migrate().await.unwrap();
    let (down, fail_commits) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let inbox = Away {
        inner: sqlite,
        down: Arc::clone(&down),
        fail_commits: Arc::clone(&fail_commits),
    };
    let broker = MemoryBroker::new();
    let poison = || Message::new("orders", "x").with_event_id("poison");
    broker.send(poison());
    let source = Hooked::new(
        broker.source(),
        FailsTheRecord {
            down,
            fail_commits: Arc::clone(&fail_commits),
        },
    );
    let consumer = Consumer::inbox("orders", inbox)
        .with_max_attempts(1)
        .with_retry_delay(Duration::from_millis(5));
    let run = tokio::spawn(consumer.run(source, Applies, std::future::pending()));

    // the key, read from a connection of its own: recorded once the record is retried
    let reader = SqliteInbox::open(&path).unwrap();
    let key = Key::new("orders", "poison").unwrap();
    let recorded = async {
        loop {
            let mut tx = reader.begin().await.unwrap();
            if !reader.first_time(&mut tx, &key).await.unwrap() {
                return;
            }
            drop(tx);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), recorded)
        .await
        .expect("the dead letter's key is recorded after its failed commit");
    assert_eq!(fail_commits.load(Ordering::SeqCst), 0, "no commit failed");

    broker.send(poison());
    broker.close();
    let stats = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the consumer drains the queue")
        .unwrap()
        .unwrap();
    assert_eq!(broker.dead_letters().len(), 1, "{stats:?}");
    assert_eq!(stats.duplicates, 1, "{stats:?}");
}

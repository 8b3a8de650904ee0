//! MariaDB: the inbox conformance suite, and what is MariaDB's own: its batch statements and
//! purge walk, faults, foreign tables and the event log.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use std::collections::BTreeMap;

use idemgate_core::{BoxError, Claim, Error, Inbox, Key, Outcome, Store, StoreExt};
use idemgate_mysql::{MySqlInbox, MySqlOffsets, MySqlOutbox, MySqlStore, MySqlTx};
use idemgate_testkit::inbox_conformance::InboxCase;
use idemgate_testkit::outbox_conformance::OutboxCase;
use idemgate_testkit::service;
use sqlx::MySqlPool;
use sqlx::mysql::MySqlPoolOptions;

static N: AtomicU32 = AtomicU32::new(0);

fn unique(what: &str) -> String {
    format!(
        "idemgate_{what}{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn url() -> String {
    service::url("IDEMGATE_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
}

async fn pool() -> Option<MySqlPool> {
    service::connect(
        "MariaDB",
        MySqlPoolOptions::new().max_connections(10).connect(&url()),
    )
    .await
}

#[tokio::test]
async fn inbox_batches_and_purges() {
    let Some(pool) = pool().await else { return };
    let inbox = MySqlInbox::new(pool.clone())
        .with_table(unique("inbox"))
        .with_retention(Duration::from_millis(300));
    inbox.migrate().await.unwrap();
    let keys: Vec<Key> = ["a", "b", "a", "c"]
        .iter()
        .map(|id| Key::new("b", *id).unwrap())
        .collect();
    let mut tx = pool.begin().await.unwrap();
    assert!(inbox.first_time(&mut tx, &keys[1]).await.unwrap());
    assert_eq!(
        inbox.first_time_many(&mut tx, &keys).await.unwrap(),
        [true, false, false, true]
    );
    // two scopes in one batch: the same id in another scope is another key
    let mixed = [
        Key::new("b", "a").unwrap(),
        Key::new("other", "a").unwrap(),
        Key::new("other", "f").unwrap(),
        Key::new("other", "a").unwrap(),
    ];
    assert_eq!(
        inbox.first_time_many(&mut tx, &mixed).await.unwrap(),
        [false, true, true, false]
    );
    tx.commit().await.unwrap();
    // after the retention the batch sees them as new again
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        inbox.first_time_many(&mut tx, &keys[..2]).await.unwrap(),
        [true, true]
    );
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut purged = 0;
    while purged < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "keys were never purged"
        );
        purged += inbox.purge_expired(2).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(purged, 5);
}

/// The purge walks the primary key in chunks: every call deletes at most its limit, live keys
/// stay, and calls until one answers 0 leave no expired key behind.
#[tokio::test]
async fn inbox_purge_walks_the_key_in_bounded_chunks() {
    let Some(pool) = pool().await else { return };
    let table = unique("inbox");
    let short = MySqlInbox::new(pool.clone())
        .with_table(&table)
        .with_retention(Duration::from_millis(200));
    short.migrate().await.unwrap();
    let long = MySqlInbox::new(pool.clone())
        .with_table(&table)
        .with_retention(Duration::from_secs(600));
    let mut tx = pool.begin().await.unwrap();
    let expiring: Vec<Key> = (0..30)
        .map(|i| Key::new(["a", "m", "z"][i % 3], format!("e{i:02}")).unwrap())
        .collect();
    let live: Vec<Key> = (0..10)
        .map(|i| Key::new(["a", "m", "z"][i % 3], format!("l{i:02}")).unwrap())
        .collect();
    assert!(
        short
            .first_time_many(&mut tx, &expiring)
            .await
            .unwrap()
            .iter()
            .all(|b| *b)
    );
    assert!(
        long.first_time_many(&mut tx, &live)
            .await
            .unwrap()
            .iter()
            .all(|b| *b)
    );
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (mut total, mut calls) = (0, 0);
    loop {
        let n = short.purge_expired(4).await.unwrap();
        assert!(n <= 4, "a purge call deleted {n} keys, over its limit of 4");
        total += n;
        calls += 1;
        assert!(calls < 100, "the purge never finished");
        if n == 0 {
            break;
        }
    }
    assert_eq!(total, 30);
    let (left,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 10, "a live key was purged");
    let mut tx = pool.begin().await.unwrap();
    assert!(
        long.first_time_many(&mut tx, &live)
            .await
            .unwrap()
            .iter()
            .all(|b| !*b),
        "the live keys are still known"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_connection_is_unavailable_then_recovers() {
    let Some(admin) = pool().await else { return };
    let table = unique("fault");
    let store = MySqlStore::builder()
        .with_url(url())
        .with_table(&table)
        .with_max_connections(1)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let key = Key::new("f", "k").unwrap();
    let Claim::Acquired(old) = store
        .claim_for(&key, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!()
    };
    store.release(old.clone()).await.unwrap();

    let mut blocker = admin.begin().await.unwrap();
    sqlx::query(&format!("SELECT 1 FROM {table} WHERE id = 'k' FOR UPDATE"))
        .execute(&mut *blocker)
        .await
        .unwrap();
    let claim = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move { store.claim_for(&key, Duration::from_secs(60)).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let id: i64 = loop {
        let found: Option<(i64,)> = sqlx::query_as("SELECT id FROM information_schema.processlist WHERE info LIKE ? AND id <> CONNECTION_ID()")
            .bind(format!("INSERT INTO {table}%"))
            .fetch_optional(&admin)
            .await
            .unwrap();
        if let Some((id,)) = found {
            break id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim never blocked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    sqlx::query(&format!("KILL {id}"))
        .execute(&admin)
        .await
        .unwrap();
    let cut = claim.await.unwrap();
    assert!(
        matches!(cut, Err(Error::Unavailable { .. })),
        "a killed connection gave {cut:?}"
    );
    blocker.rollback().await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let fresh = loop {
        match store.claim_for(&key, Duration::from_secs(60)).await {
            Ok(Claim::Acquired(l)) => break l,
            Err(Error::Unavailable { .. }) if tokio::time::Instant::now() < deadline => continue,
            other => panic!("after the kill: {other:?}"),
        }
    };
    assert_eq!(
        fresh.token(),
        old.token() + 1,
        "the killed claim took effect"
    );
    assert!(matches!(
        store
            .complete(&old, &Outcome::new(0, "zombie"), Duration::from_secs(60))
            .await,
        Err(Error::LeaseLost)
    ));
}

#[tokio::test]
async fn foreign_tables_and_bad_names_are_typed_errors() {
    let Some(pool) = pool().await else { return };
    let table = unique("foreign");
    sqlx::query(&format!("CREATE TABLE {table} (a INT)"))
        .execute(&pool)
        .await
        .unwrap();
    let store = MySqlStore::builder()
        .with_pool(pool.clone())
        .with_table(&table)
        .build()
        .unwrap();
    assert!(matches!(store.migrate().await, Err(Error::Corrupt { .. })));
    // a bad inbox table: migrate here, the other calls in inbox_conformance
    let inbox = MySqlInbox::new(pool.clone()).with_table("x; drop");
    assert!(matches!(inbox.migrate().await, Err(Error::Config { .. })));
    assert!(matches!(
        MySqlStore::builder()
            .with_pool(pool)
            .with_table("x; drop")
            .build(),
        Err(Error::Config { .. })
    ));
    let down = MySqlStore::builder()
        .with_url("mysql://root@127.0.0.1:1/test")
        .with_acquire_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    assert!(matches!(
        down.claim_for(&Key::new("d", "k").unwrap(), Duration::from_secs(1))
            .await,
        Err(Error::Unavailable { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_log_is_idempotent_and_gap_free() {
    use idemgate_mysql::{Appended, MySqlEventLog};
    let Some(pool) = pool().await else { return };
    let log = MySqlEventLog::new().with_table(unique("log"));
    log.migrate(&mut *pool.acquire().await.unwrap())
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        log.append(&mut *conn, "acct-1", "e1", b"+5").await.unwrap(),
        Appended {
            seq: 1,
            fresh: true
        }
    );
    assert_eq!(
        log.append(&mut *conn, "acct-1", "e2", b"+7").await.unwrap(),
        Appended {
            seq: 2,
            fresh: true
        }
    );
    assert_eq!(
        log.append(&mut *conn, "acct-1", "e1", b"+5").await.unwrap(),
        Appended {
            seq: 1,
            fresh: false
        }
    );
    assert_eq!(
        log.append(&mut *conn, "acct-2", "e1", b"+1").await.unwrap(),
        Appended {
            seq: 1,
            fresh: true
        }
    );

    // inside a transaction that rolls back: no position is used up
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        log.append(&mut *tx, "acct-1", "e3", b"x")
            .await
            .unwrap()
            .seq,
        3
    );
    tx.rollback().await.unwrap();

    // 8 writers, each appending every event of 0..40 (so each event 8 times)
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (pool, log) = (pool.clone(), log.clone());
            tokio::spawn(async move {
                let mut conn = pool.acquire().await.unwrap();
                let mut fresh = 0;
                for i in 0..40 {
                    if log
                        .append(&mut *conn, "acct-1", &format!("c{i}"), b"p")
                        .await
                        .unwrap()
                        .fresh
                    {
                        fresh += 1;
                    }
                }
                fresh
            })
        })
        .collect();
    let mut fresh = 0;
    for t in tasks {
        fresh += t.await.unwrap();
    }
    assert_eq!(fresh, 40);
    let events = log.read(&mut *conn, "acct-1", 0, 1000).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=42).collect::<Vec<_>>(),
        "positions have gaps or repeats"
    );
    assert_eq!(events[0].payload, b"+5");
    assert_eq!(
        log.read(&mut *conn, "acct-1", 40, 10).await.unwrap().len(),
        2
    );
}

/// The inbox conformance suite on MariaDB.
struct MySqlCase {
    pool: MySqlPool,
    inbox: MySqlInbox,
    effects: String,
}

impl InboxCase for MySqlCase {
    type Inbox = MySqlInbox;

    async fn open(retention: Duration) -> Option<Self> {
        let pool = pool().await?;
        let inbox = MySqlInbox::new(pool.clone())
            .with_table(unique("cinbox"))
            .with_offsets(MySqlOffsets::new().with_table(unique("coffsets")))
            .with_retention(retention);
        inbox.migrate().await.unwrap();
        let effects = unique("ceffects");
        sqlx::query(&format!(
            "CREATE TABLE {effects} (event VARCHAR(64) PRIMARY KEY, applied INT NOT NULL) ENGINE=InnoDB"
        ))
        .execute(&pool)
        .await
        .unwrap();
        Some(MySqlCase {
            pool,
            inbox,
            effects,
        })
    }

    fn inbox(&self) -> &MySqlInbox {
        &self.inbox
    }

    fn with_table(&self, table: &str) -> MySqlInbox {
        self.inbox.clone().with_table(table)
    }

    fn without_offsets(&self) -> MySqlInbox {
        MySqlInbox::new(self.pool.clone()).with_table(unique("cinbox"))
    }

    async fn migrate(inbox: &MySqlInbox) -> Result<(), Error> {
        inbox.migrate().await
    }

    async fn drop_table(&self, table: &str) {
        sqlx::query(&format!("DROP TABLE {table}"))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    async fn apply(&self, tx: &mut MySqlTx, event: &str) -> Result<(), BoxError> {
        let t = &self.effects;

        sqlx::query(&format!(
            "INSERT INTO {t} (event, applied) VALUES (?, 1)
             ON DUPLICATE KEY UPDATE applied = applied + 1"
        ))
        .bind(event)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn applied(&self) -> BTreeMap<String, (u64, Option<i64>)> {
        let rows: Vec<(String, i32)> =
            sqlx::query_as(&format!("SELECT event, applied FROM {}", self.effects))
                .fetch_all(&self.pool)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(e, n)| (e, (u64::try_from(n).unwrap(), None)))
            .collect()
    }
}

idemgate_testkit::inbox_conformance_tests!(MySqlCase);

impl OutboxCase for MySqlCase {
    type Outbox = MySqlOutbox;

    async fn outbox(&self) -> MySqlOutbox {
        let outbox = MySqlOutbox::new(self.pool.clone()).with_table(unique("coutbox"));
        outbox.migrate().await.unwrap();
        outbox
    }
}

idemgate_testkit::outbox_conformance_tests!(MySqlCase);

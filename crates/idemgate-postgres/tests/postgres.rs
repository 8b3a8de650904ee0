//! PostgreSQL: the inbox conformance suite, and what is PostgreSQL's own: its batch statements,
//! upgrades, faults, foreign tables, the event log and partitions.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use std::collections::BTreeMap;

use idemgate_core::{BoxError, Claim, Error, Inbox, Key, Outcome, Store, StoreExt};
use idemgate_core::{Outbox, Outgoing};
use idemgate_postgres::{PgInbox, PgOffsets, PgOutbox, PgTx, PostgresStore};
use idemgate_testkit::inbox_conformance::InboxCase;
use idemgate_testkit::outbox_conformance::OutboxCase;
use idemgate_testkit::service;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

static N: AtomicU32 = AtomicU32::new(0);

fn unique(what: &str) -> String {
    format!(
        "idemgate_{what}{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn url() -> String {
    service::url(
        "IDEMGATE_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

async fn pool() -> Option<PgPool> {
    service::connect(
        "PostgreSQL",
        PgPoolOptions::new().max_connections(10).connect(&url()),
    )
    .await
}

#[tokio::test]
async fn an_inbox_table_of_version_1_is_upgraded_in_place() {
    let Some(pool) = pool().await else { return };
    let t = unique("inbox");
    // the table as idemgate's first schema made it, with one processed key
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS idemgate_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
         CREATE TABLE {t} (scope TEXT NOT NULL, id TEXT NOT NULL,
             processed_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, PRIMARY KEY (scope, id));
         INSERT INTO {t} VALUES ('b', 'old', 0, 9223372036854775807);
         INSERT INTO idemgate_schema VALUES ('{t}', 1);"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let inbox = PgInbox::new(pool.clone()).with_table(&t);
    inbox.migrate().await.unwrap();
    inbox.migrate().await.unwrap();
    let version: i32 =
        sqlx::query_scalar("SELECT version FROM idemgate_schema WHERE component = $1")
            .bind(&t)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(version, 2);
    // the old key is still known; a batch around it tells it from the new ones
    let keys: Vec<Key> = ["new1", "old", "new2"]
        .iter()
        .map(|id| Key::new("b", *id).unwrap())
        .collect();
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        inbox.first_time_many(&mut tx, &keys).await.unwrap(),
        [true, false, true]
    );
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn inbox_batches_and_purges() {
    let Some(pool) = pool().await else { return };
    let inbox = PgInbox::new(pool.clone())
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
    // every key new, one repeated: the one-scope fast path
    let fresh: Vec<Key> = ["d", "e", "d"]
        .iter()
        .map(|id| Key::new("b", *id).unwrap())
        .collect();
    assert_eq!(
        inbox.first_time_many(&mut tx, &fresh).await.unwrap(),
        [true, true, false]
    );
    // every key known: nothing inserted, every answer false
    assert_eq!(
        inbox.first_time_many(&mut tx, &fresh).await.unwrap(),
        [false, false, false]
    );
    // two scopes in one batch: the same id in another scope is another key
    let mixed = [
        Key::new("b", "a").unwrap(),
        Key::new("other", "a").unwrap(),
        Key::new("other", "f").unwrap(),
    ];
    assert_eq!(
        inbox.first_time_many(&mut tx, &mixed).await.unwrap(),
        [false, true, true]
    );
    assert_eq!(
        inbox.first_time_many(&mut tx, &mixed).await.unwrap(),
        [false, false, false]
    );
    tx.commit().await.unwrap();
    // after the retention the batch sees them as new again, beside a new key
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut tx = pool.begin().await.unwrap();
    let again = [
        keys[0].clone(),
        Key::new("b", "g").unwrap(),
        keys[1].clone(),
    ];
    assert_eq!(
        inbox.first_time_many(&mut tx, &again).await.unwrap(),
        [true, true, true]
    );
    tx.rollback().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut purged = 0;
    while purged < 7 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "keys were never purged"
        );
        purged += inbox.purge_expired(2).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(purged, 7);
}

/// The effect, the inbox row and the position commit together; a stale writer changes nothing.
#[tokio::test]
async fn inbox_offsets_and_effect_share_one_transaction() {
    let Some(pool) = pool().await else { return };
    let inbox = PgInbox::new(pool.clone()).with_table(unique("inbox"));
    let offsets = PgOffsets::new().with_table(unique("offsets"));
    inbox.migrate().await.unwrap();
    offsets
        .migrate(&mut *pool.acquire().await.unwrap())
        .await
        .unwrap();
    let ledger = unique("ledger");
    sqlx::raw_sql(&format!(
        "CREATE TABLE {ledger} (total BIGINT NOT NULL); INSERT INTO {ledger} VALUES (0)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    // consumer A processes offset 0; consumer B, a zombie, replays it after A committed
    for (expected, who) in [(None, "a"), (None, "b")] {
        let mut tx = pool.begin().await.unwrap();
        let fresh = inbox
            .first_time(&mut tx, &Key::new("ledger", "evt-0").unwrap())
            .await
            .unwrap();
        if fresh {
            sqlx::query(&format!("UPDATE {ledger} SET total = total + 5"))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        match offsets.advance(&mut *tx, "g", "t", 0, expected, 1).await {
            Ok(()) => tx.commit().await.unwrap(),
            Err(Error::Fenced { .. }) => {
                assert_eq!(who, "b");
                tx.rollback().await.unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    let (total,): (i64,) = sqlx::query_as(&format!("SELECT max(total) FROM {ledger}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_connection_is_unavailable_then_recovers() {
    let Some(admin) = pool().await else { return };
    let table = unique("fault");
    let store = PostgresStore::builder()
        .with_url(url())
        .with_table(&table)
        .with_max_connections(1)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let held = Key::new("f", "held").unwrap();
    let Claim::Acquired(held_lease) = store
        .claim_for(&held, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!()
    };
    let key = Key::new("f", "k").unwrap();
    let Claim::Acquired(old) = store
        .claim_for(&key, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!()
    };
    store.release(old.clone()).await.unwrap();

    // another session locks the row, so the store's next claim blocks mid-statement
    let mut blocker = admin.begin().await.unwrap();
    sqlx::query(&format!("SELECT 1 FROM {table} WHERE id = 'k' FOR UPDATE"))
        .execute(&mut *blocker)
        .await
        .unwrap();
    let claim = {
        let store = store.clone();
        let key = key.clone();
        tokio::spawn(async move { store.claim_for(&key, Duration::from_secs(60)).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let pid: i32 = loop {
        let found: Option<(i32,)> = sqlx::query_as(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(format!("%INSERT INTO {table}%"))
        .fetch_optional(&admin)
        .await
        .unwrap();
        if let Some((pid,)) = found {
            break pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim never blocked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&admin)
        .await
        .unwrap();
    let cut = claim.await.unwrap();
    assert!(
        matches!(cut, Err(Error::Unavailable { .. })),
        "a cut connection gave {cut:?}"
    );
    blocker.rollback().await.unwrap();

    // the pool reconnects; the cut claim left no lease behind, and old leases stay fenced
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let fresh = loop {
        match store.claim_for(&key, Duration::from_secs(60)).await {
            Ok(Claim::Acquired(l)) => break l,
            Err(Error::Unavailable { .. }) if tokio::time::Instant::now() < deadline => continue,
            other => panic!("after the cut: {other:?}"),
        }
    };
    assert_eq!(fresh.token(), old.token() + 1, "the cut claim took effect");
    assert!(matches!(
        store
            .complete(&old, &Outcome::new(0, "zombie"), Duration::from_secs(60))
            .await,
        Err(Error::LeaseLost)
    ));
    store
        .complete(&held_lease, &Outcome::new(0, "ok"), Duration::from_secs(60))
        .await
        .unwrap();
}

#[tokio::test]
async fn foreign_tables_and_bad_names_are_typed_errors() {
    let Some(pool) = pool().await else { return };
    let table = unique("foreign");
    sqlx::query(&format!("CREATE TABLE {table} (a INTEGER)"))
        .execute(&pool)
        .await
        .unwrap();
    let store = PostgresStore::builder()
        .with_pool(pool.clone())
        .with_table(&table)
        .build()
        .unwrap();
    assert!(matches!(store.migrate().await, Err(Error::Corrupt { .. })));
    // a bad inbox table: migrate here, the other calls in inbox_conformance
    let inbox = PgInbox::new(pool.clone()).with_table("x; drop");
    assert!(matches!(inbox.migrate().await, Err(Error::Config { .. })));
    assert!(matches!(
        PostgresStore::builder()
            .with_pool(pool)
            .with_table("x; drop")
            .build(),
        Err(Error::Config { .. })
    ));
    assert!(matches!(
        PostgresStore::builder().build(),
        Err(Error::Config { .. })
    ));
    let down = PostgresStore::builder()
        .with_url("postgres://postgres@127.0.0.1:1/test")
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
    use idemgate_postgres::{Appended, PgEventLog};
    let Some(pool) = pool().await else { return };
    let log = PgEventLog::new().with_table(unique("log"));
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

/// Daily partitions by the event's UUIDv7 time; retention drops whole partitions.
#[tokio::test]
async fn daily_partitions_are_dropped_when_every_record_expired() {
    use idemgate_core::EventId;
    use idemgate_postgres::Partitions;
    let Some(pool) = pool().await else { return };
    let table = unique("daily");
    let store = PostgresStore::builder()
        .with_pool(pool.clone())
        .with_table(&table)
        .with_partitions(Partitions::uuid_v7_daily())
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let today = store.today().await.unwrap();
    store.create_partitions(today - 1, today + 2).await.unwrap();

    // an event of today with a short retention, one with a long retention, one from 3 days ago
    let short = EventId::new().key("orders").unwrap();
    let long = EventId::new().key("other").unwrap();
    let old_uuid = uuid_v7_at(today - 3);
    let old = Key::new("orders", old_uuid).unwrap();
    for (k, ret) in [(&short, 300u64), (&long, 3_600_000), (&old, 300)] {
        let Claim::Acquired(l) = store.claim_for(k, Duration::from_secs(30)).await.unwrap() else {
            panic!()
        };
        store
            .complete(&l, &Outcome::new(0, "ok"), Duration::from_millis(ret))
            .await
            .unwrap();
    }
    assert!(matches!(
        store
            .claim_for(
                &Key::new("x", "not-a-uuid").unwrap(),
                Duration::from_secs(1)
            )
            .await,
        Err(Error::InvalidKey { .. })
    ));
    let count = |part: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i64,)>(&format!("SELECT count(*) FROM {part}"))
                .fetch_one(&pool)
                .await
                .unwrap()
                .0
        }
    };
    assert_eq!(
        count(format!("{table}_b{today}")).await,
        2,
        "today's events are in today's partition"
    );
    assert_eq!(
        count(format!("{table}_default")).await,
        1,
        "an event older than the partitions goes to the default"
    );
    // nothing is dropped while today's partition holds a live record
    tokio::time::sleep(Duration::from_millis(400)).await;
    let dropped = store.drop_expired_partitions().await.unwrap();
    assert!(
        !dropped.contains(&format!("{table}_b{today}")),
        "a partition with a live record was dropped"
    );
    assert!(
        dropped.contains(&format!("{table}_b{}", today - 1))
            && dropped.contains(&format!("{table}_b{}", today + 1)),
        "{dropped:?}"
    );
    assert!(store.get(&long).await.unwrap().is_some());
    // the default partition is purged row by row
    assert_eq!(store.purge_expired(100).await.unwrap(), 2);
}

/// A UUIDv7 whose timestamp falls at noon of `day` (days since the epoch).
fn uuid_v7_at(day: i64) -> String {
    let ms = u64::try_from(day * 86_400_000 + 43_200_000).unwrap();
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        ms / 1000,
        u32::try_from(ms % 1000).unwrap() * 1_000_000,
    );
    uuid::Uuid::new_v7(ts).to_string()
}

/// The inbox conformance suite on PostgreSQL.
struct PgCase {
    pool: PgPool,
    inbox: PgInbox,
    effects: String,
}

impl InboxCase for PgCase {
    type Inbox = PgInbox;

    async fn open(retention: Duration) -> Option<Self> {
        let pool = pool().await?;
        let inbox = PgInbox::new(pool.clone())
            .with_table(unique("cinbox"))
            .with_offsets(PgOffsets::new().with_table(unique("coffsets")))
            .with_retention(retention);
        inbox.migrate().await.unwrap();
        let effects = unique("ceffects");
        sqlx::query(&format!(
            "CREATE TABLE {effects} (event TEXT PRIMARY KEY, applied INT NOT NULL, tx BIGINT NOT NULL)"
        ))
        .execute(&pool)
        .await
        .unwrap();
        Some(PgCase {
            pool,
            inbox,
            effects,
        })
    }

    fn inbox(&self) -> &PgInbox {
        &self.inbox
    }

    fn with_table(&self, table: &str) -> PgInbox {
        self.inbox.clone().with_table(table)
    }

    fn without_offsets(&self) -> PgInbox {
        PgInbox::new(self.pool.clone()).with_table(unique("cinbox"))
    }

    async fn migrate(inbox: &PgInbox) -> Result<(), Error> {
        inbox.migrate().await
    }

    async fn drop_table(&self, table: &str) {
        sqlx::query(&format!("DROP TABLE {table}"))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    async fn apply(&self, tx: &mut PgTx, event: &str) -> Result<(), BoxError> {
        let t = &self.effects;

        sqlx::query(&format!(
            "INSERT INTO {t} (event, applied, tx) VALUES ($1, 1, txid_current())
             ON CONFLICT (event) DO UPDATE SET applied = {t}.applied + 1"
        ))
        .bind(event)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn applied(&self) -> BTreeMap<String, (u64, Option<i64>)> {
        let rows: Vec<(String, i32, i64)> =
            sqlx::query_as(&format!("SELECT event, applied, tx FROM {}", self.effects))
                .fetch_all(&self.pool)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(e, n, tx)| (e, (u64::try_from(n).unwrap(), Some(tx))))
            .collect()
    }
}

idemgate_testkit::inbox_conformance_tests!(PgCase);

impl OutboxCase for PgCase {
    type Outbox = PgOutbox;

    async fn outbox(&self) -> PgOutbox {
        let outbox = PgOutbox::new(self.pool.clone()).with_table(unique("coutbox"));
        outbox.migrate().await.unwrap();
        outbox
    }
}

idemgate_testkit::outbox_conformance_tests!(PgCase);

/// A relay waiting for rows wakes on the commit's notification, long before its poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_a_waiting_relay() {
    let Some(pool) = pool().await else { return };
    let outbox = PgOutbox::new(pool.clone()).with_table(unique("woutbox"));
    outbox.migrate().await.unwrap();
    let (listening, ready) = tokio::sync::oneshot::channel();
    let waiting = {
        // a clone listens on a connection of its own: its first wait connects it, and a wait
        // with nothing committed times out
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let idle = outbox.wait(Duration::from_millis(50)).await;
            let _ = listening.send(idle);
            outbox.wait(Duration::from_secs(30)).await
        })
    };
    assert!(!ready.await.unwrap(), "nothing was committed yet");
    let inbox = PgInbox::new(pool);
    let mut tx = inbox.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, &Outgoing::new("invoices", "1"))
        .await
        .unwrap();
    inbox.commit(tx).await.unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the commit wakes the relay before its 30 s poll")
        .unwrap();
    assert!(woken);
}

//! MariaDB-specific behaviour: the inbox under concurrency, offsets, faults, foreign tables.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idemgate_core::{Claim, Error, Key, Outcome, Store, StoreExt};
use idemgate_mysql::{MySqlInbox, MySqlOffsets, MySqlStore};
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

#[tokio::test(flavor = "multi_thread")]
async fn inbox_second_transaction_waits_then_sees_a_duplicate() {
    let Some(pool) = pool().await else { return };
    let inbox = MySqlInbox::new().with_table(unique("inbox")).unwrap();
    inbox.migrate(&pool).await.unwrap();
    let key = Key::new("ledger", "evt-1").unwrap();
    let mut first = pool.begin().await.unwrap();
    assert!(inbox.first_time(&mut first, &key).await.unwrap());
    let second = {
        let (pool, inbox, key) = (pool.clone(), inbox.clone(), key.clone());
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let seen = inbox.first_time(&mut tx, &key).await.unwrap();
            tx.commit().await.unwrap();
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished(), "the second transaction did not wait");
    first.commit().await.unwrap();
    assert!(
        !second.await.unwrap(),
        "both transactions saw the key for the first time"
    );

    let other = Key::new("ledger", "evt-2").unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(inbox.first_time(&mut tx, &other).await.unwrap());
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(
        inbox.first_time(&mut tx, &other).await.unwrap(),
        "a rolled-back sighting counted"
    );
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_inbox_transactions_apply_each_effect_once() {
    let Some(pool) = pool().await else { return };
    let inbox = MySqlInbox::new().with_table(unique("inbox")).unwrap();
    inbox.migrate(&pool).await.unwrap();
    let effects = unique("effects");
    sqlx::query(&format!(
        "CREATE TABLE {effects} (id VARCHAR(64) PRIMARY KEY, n INT NOT NULL)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (pool, inbox, effects) = (pool.clone(), inbox.clone(), effects.clone());
            tokio::spawn(async move {
                for i in 0..50 {
                    let key = Key::new("c", format!("e{i}")).unwrap();
                    // a deadlock victim rolls back and retries: that is the typed, retryable path
                    loop {
                        let mut tx = pool.begin().await.unwrap();
                        let step = async {
                            if inbox.first_time(&mut tx, &key).await? {
                                sqlx::query(&format!("INSERT INTO {effects} (id, n) VALUES (?, 1) ON DUPLICATE KEY UPDATE n = n + 1"))
                                    .bind(key.id())
                                    .execute(&mut *tx)
                                    .await
                                    .unwrap();
                            }
                            Ok::<_, Error>(())
                        }
                        .await;
                        match step {
                            Ok(()) => {
                                tx.commit().await.unwrap();
                                break;
                            }
                            Err(e) if e.is_retryable() => tx.rollback().await.unwrap(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (rows, max): (i64, i32) =
        sqlx::query_as(&format!("SELECT count(*), max(n) FROM {effects}"))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((rows, max), (50, 1));
}

#[tokio::test]
async fn inbox_batches_and_purges() {
    let Some(pool) = pool().await else { return };
    let inbox = MySqlInbox::new()
        .with_table(unique("inbox"))
        .unwrap()
        .with_retention(Duration::from_millis(300));
    inbox.migrate(&pool).await.unwrap();
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
        purged += inbox.purge_expired(&pool, 2).await.unwrap();
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
    let short = MySqlInbox::new()
        .with_table(&table)
        .unwrap()
        .with_retention(Duration::from_millis(200));
    short.migrate(&pool).await.unwrap();
    let long = MySqlInbox::new()
        .with_table(&table)
        .unwrap()
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
        let n = short.purge_expired(&pool, 4).await.unwrap();
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

#[tokio::test]
async fn offsets_advance_by_compare_and_set() {
    let Some(pool) = pool().await else { return };
    let offsets = MySqlOffsets::new().with_table(unique("offsets")).unwrap();
    offsets.migrate(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    offsets
        .advance(&mut tx, "g", "orders", 0, None, 10)
        .await
        .unwrap();
    offsets
        .advance(&mut tx, "g", "orders", 1, None, 3)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    offsets
        .advance(&mut tx, "g", "orders", 0, Some(10), 11)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let e = offsets
        .advance(&mut tx, "g", "orders", 0, Some(10), 11)
        .await
        .unwrap_err();
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
    let e = offsets
        .advance(&mut tx, "g", "orders", 1, None, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Fenced {
                expected: None,
                found: Some(3),
                ..
            }
        ),
        "{e:?}"
    );
    tx.rollback().await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let pos = offsets
        .load_positions(&mut conn, "g", "orders")
        .await
        .unwrap();
    assert_eq!(pos.into_iter().collect::<Vec<_>>(), [(0, 11), (1, 3)]);
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
    let log = MySqlEventLog::new().with_table(unique("log")).unwrap();
    log.migrate(&pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        log.append(&mut conn, "acct-1", "e1", b"+5").await.unwrap(),
        Appended {
            seq: 1,
            fresh: true
        }
    );
    assert_eq!(
        log.append(&mut conn, "acct-1", "e2", b"+7").await.unwrap(),
        Appended {
            seq: 2,
            fresh: true
        }
    );
    assert_eq!(
        log.append(&mut conn, "acct-1", "e1", b"+5").await.unwrap(),
        Appended {
            seq: 1,
            fresh: false
        }
    );
    assert_eq!(
        log.append(&mut conn, "acct-2", "e1", b"+1").await.unwrap(),
        Appended {
            seq: 1,
            fresh: true
        }
    );

    // inside a transaction that rolls back: no position is used up
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        log.append(&mut tx, "acct-1", "e3", b"x").await.unwrap().seq,
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
                        .append(&mut conn, "acct-1", &format!("c{i}"), b"p")
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
    let events = log.read(&mut conn, "acct-1", 0, 1000).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=42).collect::<Vec<_>>(),
        "positions have gaps or repeats"
    );
    assert_eq!(events[0].payload, b"+5");
    assert_eq!(
        log.read(&mut conn, "acct-1", 40, 10).await.unwrap().len(),
        2
    );
}

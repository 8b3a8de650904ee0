//! Inbox mode through the runtime on PostgreSQL and MariaDB: the key row and a deliberately
//! non-idempotent effect (`applied = applied + 1`) commit together, under duplicates, concurrent
//! copies, handler failures and panics, and a consumer that dies before its ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use idemgate_consumer::memory::MemoryBroker;
use idemgate_consumer::{
    Consumer, HandlerFuture, InboxHandler, Message, MySqlInboxPool, PgInboxPool, Stats,
};
use idemgate_mysql::MySqlInbox;
use idemgate_postgres::PgInbox;
use idemgate_testkit::service;
use sqlx::{MySql, Postgres, Transaction};

static N: AtomicU32 = AtomicU32::new(0);

fn unique(what: &str) -> String {
    format!(
        "idemgate_{what}{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// 200 events, every one published twice, and a quarter of them a third time: the effect table
/// holds each event exactly once with `applied = 1`.
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

/// Every one of the 200 events has its effect row, applied once; the 250 extra copies were
/// acked as duplicates.
fn assert_applied_once(rows: &[(i32, i32)], stats: &Stats) {
    assert_eq!(rows.len(), 200, "{stats:?}");
    assert!(
        rows.iter().all(|(_, applied)| *applied == 1),
        "an effect applied twice: {stats:?}"
    );
    assert_eq!((stats.handled, stats.duplicates), (200, 250), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_inbox_applies_every_event_exactly_once() {
    postgres_case(1).await;
}

/// Batches of up to 16 deliveries per transaction: the failing handlers roll their batch back
/// and the batch's messages run again one per transaction; still every effect once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_inbox_in_batches_applies_every_event_exactly_once() {
    postgres_case(16).await;
}

/// Batches really share transactions (several effect rows with one transaction id) only in
/// batch mode. (PostgreSQL: `txid_current()`; MariaDB has no cheap equivalent, and its batched
/// test checks the effects alone.)
fn assert_batched(txids: &[i64], batch: usize) {
    let mut distinct = txids.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if batch == 1 {
        assert_eq!(distinct.len(), txids.len(), "one transaction per message");
    } else {
        // (a batch holding a failing message runs again one per transaction)
        assert!(
            distinct.len() < txids.len(),
            "{} transactions for {} messages: not batched",
            distinct.len(),
            txids.len()
        );
    }
}

/// The test database, or `None` where PostgreSQL is not required and not running.
async fn pg_pool() -> Option<sqlx::PgPool> {
    service::connect(
        "PostgreSQL",
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect(&service::url(
                "IDEMGATE_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            )),
    )
    .await
}

async fn postgres_case(batch: usize) {
    let Some(pool) = pg_pool().await else {
        return;
    };
    let (inbox_table, effects) = (unique("cinbox"), unique("ceffects"));
    let inbox = PgInbox::new().with_table(&inbox_table).unwrap();
    inbox.migrate(&pool).await.unwrap();
    sqlx::query(&format!(
        "CREATE TABLE {effects} (event int PRIMARY KEY, applied int NOT NULL, tx bigint NOT NULL)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let broker = MemoryBroker::new();
    publish(&broker);
    let failures = Arc::new(AtomicUsize::new(0));
    let (f, table) = (Arc::clone(&failures), effects.clone());
    let handler = <dyn InboxHandler<Transaction<'static, Postgres>>>::from_fn(
        move |tx: &mut Transaction<'static, Postgres>, msg: &Message| -> HandlerFuture<'_> {
            let (f, table) = (Arc::clone(&f), table.clone());
            Box::pin(async move {
                let n: i32 = std::str::from_utf8(&msg.payload)?.parse()?;
                sqlx::query(&format!(
                    "INSERT INTO {table} (event, applied, tx) VALUES ($1, 1, txid_current())
                     ON CONFLICT (event) DO UPDATE SET applied = {table}.applied + 1"
                ))
                .bind(n)
                .execute(&mut **tx)
                .await?;
                // every 10th event fails once, after its effect: the rollback undoes both rows
                if n % 10 == 0 && msg.deliveries == Some(1) {
                    f.fetch_add(1, Ordering::SeqCst);
                    return Err("failed after the effect".into());
                }
                // and every 10th from 5 panics once, after its effect: the same
                if n % 10 == 5 && msg.deliveries == Some(1) {
                    f.fetch_add(1, Ordering::SeqCst);
                    panic!("a handler bug after the effect");
                }
                Ok(())
            })
        },
    );
    let stats = Consumer::inbox("ledger", PgInboxPool::new(inbox, pool.clone()))
        .with_concurrency(8)
        .with_batch(batch)
        .with_retry_delay(Duration::from_millis(5))
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    let rows: Vec<(i32, i32, i64)> = sqlx::query_as(&format!(
        "SELECT event, applied, tx FROM {effects} ORDER BY event"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    let (rows, txids): (Vec<(i32, i32)>, Vec<i64>) =
        rows.into_iter().map(|(e, a, t)| ((e, a), t)).unzip();
    assert_applied_once(&rows, &stats);
    assert_batched(&txids, batch);
    let failures = failures.load(Ordering::SeqCst) as u64;
    assert!(failures >= 1);
    if batch == 1 {
        assert_eq!(stats.retried, failures);
    } else {
        // a failure in a batch is met again when its message runs alone, and counted then
        assert!((1..=failures).contains(&stats.retried), "{stats:?}");
    }
    for t in [effects, inbox_table] {
        sqlx::query(&format!("DROP TABLE {t}"))
            .execute(&pool)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_inbox_applies_every_event_exactly_once() {
    mariadb_case(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_inbox_in_batches_applies_every_event_exactly_once() {
    mariadb_case(16).await;
}

async fn mariadb_case(batch: usize) {
    let Some(pool) = service::connect(
        "MariaDB",
        sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(10)
            .connect(&service::url(
                "IDEMGATE_MYSQL_URL",
                "mysql://root@127.0.0.1:3306/test",
            )),
    )
    .await
    else {
        return;
    };
    let (inbox_table, effects) = (unique("cinbox"), unique("ceffects"));
    let inbox = MySqlInbox::new().with_table(&inbox_table).unwrap();
    inbox.migrate(&pool).await.unwrap();
    sqlx::query(&format!(
        "CREATE TABLE {effects} (event INT PRIMARY KEY, applied INT NOT NULL)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let broker = MemoryBroker::new();
    publish(&broker);
    let table = effects.clone();
    let handler = <dyn InboxHandler<Transaction<'static, MySql>>>::from_fn(
        move |tx: &mut Transaction<'static, MySql>, msg: &Message| -> HandlerFuture<'_> {
            let table = table.clone();
            Box::pin(async move {
                let n: i32 = std::str::from_utf8(&msg.payload)?.parse()?;
                sqlx::query(&format!(
                    "INSERT INTO {table} (event, applied) VALUES (?, 1)
                     ON DUPLICATE KEY UPDATE applied = applied + 1"
                ))
                .bind(n)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        },
    );
    let stats = Consumer::inbox("ledger", MySqlInboxPool::new(inbox, pool.clone()))
        .with_concurrency(8)
        .with_batch(batch)
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    let rows: Vec<(i32, i32)> = sqlx::query_as(&format!("SELECT event, applied FROM {effects}"))
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_applied_once(&rows, &stats);
    for t in [effects, inbox_table] {
        sqlx::query(&format!("DROP TABLE {t}"))
            .execute(&pool)
            .await
            .unwrap();
    }
}

/// Inbox mode records a dead-lettered key in the transaction that commits once the dead letter
/// is stored: the copies of the event (all three published at once) end in the dead-letter
/// destination once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_event_is_dead_lettered_once_in_inbox_mode() {
    let Some(pool) = pg_pool().await else {
        return;
    };
    let inbox = PgInbox::new().with_table(unique("dlinbox")).unwrap();
    inbox.migrate(&pool).await.unwrap();
    let broker = MemoryBroker::new();
    for _ in 0..3 {
        broker.send(Message::new("ledger", "poison").with_event_id("evt-broken"));
    }
    broker.close();
    let handler = <dyn InboxHandler<Transaction<'static, Postgres>>>::from_fn(
        |_tx: &mut Transaction<'static, Postgres>, _msg: &Message| -> HandlerFuture<'_> {
            Box::pin(async { Err("always broken".into()) })
        },
    );
    let stats = Consumer::inbox("ledger", PgInboxPool::new(inbox, pool.clone()))
        .with_max_attempts(2)
        .with_retry_delay(Duration::from_millis(5))
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    assert_eq!(broker.dead_letters().len(), 1, "{stats:?}");
    assert_eq!((stats.dead_lettered, stats.duplicates), (1, 2), "{stats:?}");
}

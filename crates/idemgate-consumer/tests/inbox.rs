//! Inbox mode through the runtime on PostgreSQL and MariaDB: the key row and a deliberately
//! non-idempotent effect (`applied = applied + 1`) commit together, under duplicates, concurrent
//! copies, handler failures and a consumer that dies before its ack.

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
    let Some(pool) = service::connect(
        "PostgreSQL",
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect(&service::url(
                "IDEMGATE_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            )),
    )
    .await
    else {
        return;
    };
    let (inbox_table, effects) = (unique("cinbox"), unique("ceffects"));
    let inbox = PgInbox::new().with_table(&inbox_table).unwrap();
    inbox.migrate(&pool).await.unwrap();
    sqlx::query(&format!(
        "CREATE TABLE {effects} (event int PRIMARY KEY, applied int NOT NULL)"
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
                    "INSERT INTO {table} (event, applied) VALUES ($1, 1)
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
                Ok(())
            })
        },
    );
    let stats = Consumer::inbox("ledger", PgInboxPool::new(inbox, pool.clone()))
        .with_concurrency(8)
        .with_retry_delay(Duration::from_millis(5))
        .run(broker.source(), handler, std::future::pending())
        .await
        .unwrap();
    let rows: Vec<(i32, i32)> = sqlx::query_as(&format!(
        "SELECT event, applied FROM {effects} ORDER BY event"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_applied_once(&rows, &stats);
    assert!(failures.load(Ordering::SeqCst) >= 1);
    assert_eq!(stats.retried, failures.load(Ordering::SeqCst) as u64);
    for t in [effects, inbox_table] {
        sqlx::query(&format!("DROP TABLE {t}"))
            .execute(&pool)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_inbox_applies_every_event_exactly_once() {
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

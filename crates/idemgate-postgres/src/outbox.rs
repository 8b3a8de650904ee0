//! The transactional outbox on PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idemgate_core::{Outgoing, Result};
use idemgate_sql::OutboxTable;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Mutex;

use crate::PgTx;
use crate::error::pg;

/// At most one notification per this interval: `NOTIFY` serializes the commits of the
/// transactions that send one, so every enqueue notifying would halve their rate.
const NOTIFY_EVERY_MS: u64 = 50;

/// The transactional outbox on PostgreSQL: [`enqueue`](idemgate_core::Outbox::enqueue) writes
/// the message in the caller's [`PgTx`] (the transaction a [`PgInbox`](crate::PgInbox) opens,
/// so an Inbox-mode handler enqueues on the transaction it is given), and a relay
/// (`idemgate_consumer::Relay`) publishes it after the commit.
///
/// A relay waiting for rows wakes on `LISTEN/NOTIFY`: an enqueue adds `pg_notify` to its
/// transaction unless another did within the last 50 ms, and a woken relay looks again every
/// 10 ms for a while, so rows committed in that gap leave as quickly.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), idemgate_core::Error> {
/// use idemgate_core::{Inbox, Outbox, Outgoing};
/// use idemgate_postgres::{PgInbox, PgOutbox};
///
/// let (inbox, outbox) = (PgInbox::new(pool.clone()), PgOutbox::new(pool));
/// outbox.migrate().await?;
/// let mut tx = inbox.begin().await?;
/// sqlx::query("INSERT INTO invoices (id) VALUES (7)").execute(&mut *tx).await.unwrap();
/// outbox.enqueue(&mut tx, &Outgoing::new("invoices", "invoice 7 created")).await?;
/// inbox.commit(tx).await?; // the invoice and its event, or neither
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PgOutbox {
    pool: PgPool,
    table: OutboxTable,
    listener: Arc<Mutex<Option<PgListener>>>,
    // milliseconds since `epoch` from which an enqueue notifies again
    next_notify: Arc<AtomicU64>,
    epoch: Instant,
}

/// A clone shares the pool and the notification pacing, and listens on a connection of its
/// own, so relays on clones each hear every commit.
impl Clone for PgOutbox {
    fn clone(&self) -> Self {
        PgOutbox {
            pool: self.pool.clone(),
            table: self.table.clone(),
            listener: Arc::new(Mutex::new(None)),
            next_notify: Arc::clone(&self.next_notify),
            epoch: self.epoch,
        }
    }
}

impl PgOutbox {
    /// An outbox on `pool` in table `idemgate_outbox`. Call [`migrate`](Self::migrate) once
    /// first.
    pub fn new(pool: PgPool) -> Self {
        PgOutbox {
            pool,
            table: OutboxTable::new(),
            listener: Arc::new(Mutex::new(None)),
            next_notify: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        }
    }

    /// Another table (and notification channel): a lowercase identifier, or every call fails
    /// with `Error::Config`.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = self.table.with_table(table);
        self
    }

    /// The rows' statements, for inspection and tests.
    pub fn table(&self) -> &OutboxTable {
        &self.table
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the tables if missing.
    pub async fn migrate(&self) -> Result<()> {
        let mut conn = pg(self.pool.acquire().await)?;
        self.table.migrate(&mut *conn).await
    }

    async fn enqueue_in(&self, tx: &mut PgTx, msg: &Outgoing) -> Result<()> {
        self.table.enqueue(&mut **tx, msg).await?;
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_notify.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_notify
                .compare_exchange(
                    next,
                    now + NOTIFY_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            pg(sqlx::query("SELECT pg_notify($1, '')")
                .bind(self.table.name()?)
                .execute(&mut **tx)
                .await)?;
        }
        Ok(())
    }

    async fn wait_for(&self, timeout: Duration) -> bool {
        let mut listener = self.listener.lock().await;
        if listener.is_none() {
            let connected = async {
                let mut l = PgListener::connect_with(&self.pool).await?;
                l.listen(self.table.name().unwrap_or("idemgate_outbox"))
                    .await?;
                Ok::<_, sqlx::Error>(l)
            };
            match connected.await {
                Ok(l) => *listener = Some(l),
                Err(_) => {
                    // the database is away: wait out the timeout, as a poll would
                    drop(listener);
                    tokio::time::sleep(timeout).await;
                    return false;
                }
            }
        }
        let Some(l) = listener.as_mut() else {
            return false;
        };
        match tokio::time::timeout(timeout, l.try_recv()).await {
            Ok(Ok(Some(_))) => true,
            // a lost connection: the next wait connects again
            Ok(Ok(None) | Err(_)) => {
                *listener = None;
                false
            }
            Err(_) => false,
        }
    }
}

idemgate_sql::sqlx_outbox!(PgOutbox, PgTx, crate::classify_error);

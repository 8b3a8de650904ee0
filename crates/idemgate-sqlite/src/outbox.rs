//! The transactional outbox on SQLite.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemgate_core::{Backlog, Clock, DeadRow, Outbox, OutboxRow, Outgoing, Result};
use idemgate_sql::OutboxTable;
use rusqlite::Connection;
use tokio::sync::Mutex;

use crate::conn::{Lite, ready};
use crate::inbox::blocking;
use crate::store::open_connection;
use crate::{SqliteTx, Synchronous};

/// The transactional outbox on SQLite: [`enqueue`](Outbox::enqueue) writes the message in the
/// caller's [`SqliteTx`] (the transaction a [`SqliteInbox`](crate::SqliteInbox) opens, so an
/// Inbox-mode handler enqueues on the transaction it is given), and a relay
/// (`idemgate_consumer::Relay`) publishes it after the commit. The relay's takes and marks run
/// on the outbox's own connection; processes sharing the file serialize on its write lock. A
/// relay waiting for rows polls.
///
/// ```
/// use idemgate_core::{Inbox, Outbox, Outgoing};
/// use idemgate_sqlite::{SqliteInbox, SqliteOutbox};
///
/// # let dir = tempfile::tempdir().unwrap();
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let path = dir.path().join("app.db");
/// let (inbox, outbox) = (SqliteInbox::open(&path)?, SqliteOutbox::open(&path)?);
/// outbox.migrate().await?;
/// let mut tx = inbox.begin().await?;
/// outbox.enqueue(&mut tx, &Outgoing::new("invoices", "invoice 7 created")).await?;
/// drop(tx); // rolled back: nothing to publish
/// assert!(outbox.take("relay-1", 10, std::time::Duration::from_secs(30)).await?.is_empty());
/// # Ok::<(), idemgate_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    conn: Arc<Mutex<Connection>>,
    table: OutboxTable,
}

impl SqliteOutbox {
    /// An outbox on the SQLite file at `path` (created if missing; WAL, `synchronous=FULL`, a
    /// busy timeout of 30 s), in table `idemgate_outbox`. Call [`migrate`](Self::migrate) once
    /// first.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let conn = open_connection(path.as_ref(), Duration::from_secs(30), Synchronous::Full)?;
        Ok(SqliteOutbox {
            conn: Arc::new(Mutex::new(conn)),
            table: OutboxTable::new(),
        })
    }

    /// Another table: a lowercase identifier, or every call fails with `Error::Config`.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = self.table.with_table(table);
        self
    }

    /// The clock for the rows' times (default: the system clock).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.table = self.table.with_clock(clock);
        self
    }

    /// The rows' statements, for inspection and tests.
    pub fn table(&self) -> &OutboxTable {
        &self.table
    }

    /// Creates the tables if missing.
    pub async fn migrate(&self) -> Result<()> {
        self.on(|t, c| ready(t.migrate(c))).await
    }

    /// Runs `f` on the outbox's connection in a blocking thread.
    async fn on<T: Send + 'static>(
        &self,
        f: impl FnOnce(&OutboxTable, &mut Lite<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = Arc::clone(&self.conn).lock_owned().await;
        let table = self.table.clone();
        blocking(conn, move |c| f(&table, &mut Lite::new(c)))
            .await
            .map(|(_, t)| t)
    }
}

impl Outbox for SqliteOutbox {
    type Tx = SqliteTx;

    async fn enqueue(&self, tx: &mut SqliteTx, msg: &Outgoing) -> Result<()> {
        ready(self.table.enqueue(&mut Lite::new(tx), msg))
    }

    async fn take(&self, owner: &str, limit: usize, lease: Duration) -> Result<Vec<OutboxRow>> {
        let owner = owner.to_owned();
        self.on(move |t, c| ready(t.take(c, &owner, limit, lease)))
            .await
    }

    async fn sent(&self, ids: &[i64]) -> Result<()> {
        let ids = ids.to_vec();
        self.on(move |t, c| ready(t.sent(c, &ids))).await
    }

    async fn retry(&self, owner: &str, id: i64, delay: Duration, error: &str) -> Result<bool> {
        let (owner, error) = (owner.to_owned(), error.to_owned());
        self.on(move |t, c| ready(t.retry(c, &owner, id, delay, &error)))
            .await
    }

    async fn release(&self, owner: &str, ids: &[i64]) -> Result<()> {
        let (owner, ids) = (owner.to_owned(), ids.to_vec());
        self.on(move |t, c| ready(t.release(c, &owner, &ids))).await
    }

    async fn dead_letter(&self, owner: &str, id: i64, reason: &str) -> Result<bool> {
        let (owner, reason) = (owner.to_owned(), reason.to_owned());
        self.on(move |t, c| ready(t.dead_letter(c, &owner, id, &reason)))
            .await
    }

    async fn purge_sent(&self, retention: Duration, limit: usize) -> Result<u64> {
        self.on(move |t, c| ready(t.purge_sent(c, retention, limit)))
            .await
    }

    async fn backlog(&self) -> Result<Backlog> {
        self.on(|t, c| ready(t.backlog(c))).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadRow>> {
        self.on(move |t, c| ready(t.dead_letters(c, limit))).await
    }
}

//! The transactional inbox on SQLite.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemgate_core::backend::{duration_millis, to_millis};
use idemgate_core::{Clock, Error, Inbox, Key, Position, Result, SystemClock};
use rusqlite::{Connection, params};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::SqliteOffsets;
use crate::Synchronous;
use crate::conn::{Lite, migrate, ready};
use crate::error::sql;
use crate::store::open_connection;
use idemgate_sql::{Dialect, Table, no_positions};

/// The transactional inbox: records a key as processed *inside a transaction on its
/// connection*, so the dedup row and the business change commit (or roll back) together. A crash
/// at any point leaves either both or neither: exactly-once effect for effects in the same
/// database.
///
/// It implements the [`Inbox`] contract, so the consumer runtime's Inbox mode runs on it. Its
/// transactions ([`SqliteTx`]) are `BEGIN IMMEDIATE` on the inbox's one connection: they take
/// the file's write lock up front (waiting in a blocking thread, up to the busy timeout, while
/// another process holds it) and run one at a time.
///
/// ```
/// use idemgate_core::{Inbox, Key};
/// use idemgate_sqlite::SqliteInbox;
///
/// # let dir = tempfile::tempdir().unwrap();
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let inbox = SqliteInbox::open(dir.path().join("app.db"))?;
/// inbox.migrate().await?;
/// let mut tx = inbox.begin().await?;
/// tx.execute_batch("CREATE TABLE balance (total INTEGER); INSERT INTO balance VALUES (0);").unwrap();
/// inbox.commit(tx).await?;
///
/// let key = Key::new("ledger", "evt-1")?;
/// for _delivery in 0..3 {
///     let mut tx = inbox.begin().await?;
///     if inbox.first_time(&mut tx, &key).await? {
///         tx.execute("UPDATE balance SET total = total + 10", []).unwrap();
///     }
///     inbox.commit(tx).await?;
/// }
/// let tx = inbox.begin().await?;
/// let total: i64 = tx.query_row("SELECT total FROM balance", [], |r| r.get(0)).unwrap();
/// assert_eq!(total, 10);
/// # Ok::<(), idemgate_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct SqliteInbox {
    conn: Arc<Mutex<Connection>>,
    table: Table,
    retention: Duration,
    clock: Arc<dyn Clock>,
    offsets: Option<SqliteOffsets>,
    first_time: String,
    purge: String,
}

/// An open `BEGIN IMMEDIATE` transaction of a [`SqliteInbox`]: the handler writes its effect
/// through it (it derefs to the [`rusqlite::Connection`]). Dropped without
/// [`commit`](Inbox::commit), it rolls back.
#[derive(Debug)]
pub struct SqliteTx {
    conn: Option<OwnedMutexGuard<Connection>>,
}

impl Deref for SqliteTx {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
            .as_deref()
            .expect("a transaction holds its connection until it ends")
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        if let Some(conn) = &self.conn {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
}

/// Runs `f` on the connection in a blocking thread (it may wait for the file's write lock).
pub(crate) async fn blocking<T: Send + 'static>(
    conn: OwnedMutexGuard<Connection>,
    f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
) -> Result<(OwnedMutexGuard<Connection>, T)> {
    tokio::task::spawn_blocking(move || {
        let r = f(&conn);
        r.map(|t| (conn, t))
    })
    .await
    .map_err(|e| Error::Backend {
        backend: "sqlite",
        source: Box::new(e),
    })?
}

impl SqliteInbox {
    /// An inbox on the SQLite file at `path` (created if missing; WAL, `synchronous=FULL`, a
    /// busy timeout of 30 s), in table `idemgate_inbox`, keeping keys for 7 days. Call
    /// [`migrate`](Self::migrate) once first.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, Synchronous::Full)
    }

    /// [`open`](Self::open) with another durability: [`Synchronous::Normal`] survives a
    /// process kill, not a power cut.
    pub fn open_with(path: impl AsRef<Path>, synchronous: Synchronous) -> Result<Self> {
        let conn = open_connection(path.as_ref(), Duration::from_secs(30), synchronous)?;
        Ok(Self::new(conn))
    }

    /// An inbox on an open connection.
    pub fn new(conn: Connection) -> Self {
        Self::with_parts(
            Arc::new(Mutex::new(conn)),
            Table::new(Dialect::Sqlite, "idemgate_inbox"),
            Duration::from_secs(7 * 86_400),
            Arc::new(SystemClock),
            None,
        )
    }

    fn with_parts(
        conn: Arc<Mutex<Connection>>,
        table: Table,
        retention: Duration,
        clock: Arc<dyn Clock>,
        offsets: Option<SqliteOffsets>,
    ) -> Self {
        let t = table.as_given();
        SqliteInbox {
            first_time: format!(
                "INSERT INTO {t} (scope, id, processed_at, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (scope, id) DO UPDATE SET processed_at = ?3, expires_at = ?4
                 WHERE expires_at <= ?3"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE (scope, id) IN
                    (SELECT scope, id FROM {t} WHERE expires_at <= ?1 LIMIT ?2)"
            ),
            conn,
            table,
            retention,
            clock,
            offsets,
        }
    }

    /// Another table: an identifier, or every call fails with `Error::Config`.
    pub fn with_table(self, table: impl Into<String>) -> Self {
        Self::with_parts(
            self.conn,
            Table::new(Dialect::Sqlite, table),
            self.retention,
            self.clock,
            self.offsets,
        )
    }

    /// How long a processed key is remembered: at least the broker's redelivery window.
    pub fn with_retention(self, retention: Duration) -> Self {
        Self::with_parts(self.conn, self.table, retention, self.clock, self.offsets)
    }

    /// The clock for retention (default: system clock).
    pub fn with_clock(self, clock: impl Clock) -> Self {
        Self::with_parts(
            self.conn,
            self.table,
            self.retention,
            Arc::new(clock),
            self.offsets,
        )
    }

    /// Keeps Kafka positions ([`Inbox::advance`]) in `offsets` (`SqliteOffsets::new()`: the
    /// table `idemgate_offsets`), created by [`migrate`](Self::migrate). Without one, a message
    /// that carries a position is refused with `Error::Config`.
    pub fn with_offsets(self, offsets: SqliteOffsets) -> Self {
        let (conn, table, retention, clock) = (self.conn, self.table, self.retention, self.clock);
        Self::with_parts(conn, table, retention, clock, Some(offsets))
    }

    /// Creates the inbox table (and the offsets table, if it has one) if missing.
    ///
    /// Versions are recorded in the table `idemgate_schema`, one row per table. To reset the
    /// inbox, drop its table and call `migrate` again: a recorded table that is missing is
    /// created again.
    pub async fn migrate(&self) -> Result<()> {
        let conn = Arc::clone(&self.conn).lock_owned().await;
        let this = self.clone();
        blocking(conn, move |conn| {
            this.migrate_on(conn)?;
            match &this.offsets {
                Some(offsets) => ready(offsets.migrate(&mut Lite::new(conn))),
                None => Ok(()),
            }
        })
        .await
        .map(|_| ())
    }

    /// Creates the inbox table on `conn` if missing, for a caller that keeps its own connection
    /// and uses [`first_time_in`](Self::first_time_in).
    pub fn migrate_on(&self, conn: &Connection) -> Result<()> {
        let t = self.table.name()?;
        migrate(
            conn,
            t,
            &[format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    scope TEXT NOT NULL, id TEXT NOT NULL,
                    processed_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
                    PRIMARY KEY (scope, id)) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at);"
            )],
            &["scope", "id", "processed_at", "expires_at"],
        )
    }

    /// Records `key` in a transaction the caller opened on its own connection; `true` if this
    /// is its first time within the retention window (run the effect in the same transaction),
    /// `false` for a duplicate (skip the effect, commit, acknowledge).
    ///
    /// Two transactions with the same key serialize on SQLite's write lock: exactly one sees
    /// `true`. Use `BEGIN IMMEDIATE` (`TransactionBehavior::Immediate`) so the lock is taken up
    /// front rather than on upgrade.
    pub fn first_time_in(&self, conn: &Connection, key: &Key) -> Result<bool> {
        self.table.name()?;
        let now = to_millis(self.clock.now());
        let expires = now.saturating_add(duration_millis(self.retention));
        let mut stmt = sql(conn.prepare_cached(&self.first_time))?;
        let n = sql(stmt.execute(params![
            key.scope(),
            key.id(),
            i64::try_from(now).unwrap_or(i64::MAX),
            i64::try_from(expires).unwrap_or(i64::MAX)
        ]))?;
        Ok(n == 1)
    }
}

impl Inbox for SqliteInbox {
    type Tx = SqliteTx;

    async fn begin(&self) -> Result<SqliteTx> {
        let conn = Arc::clone(&self.conn).lock_owned().await;
        let (conn, ()) = blocking(conn, |c| sql(c.execute_batch("BEGIN IMMEDIATE"))).await?;
        Ok(SqliteTx { conn: Some(conn) })
    }

    async fn first_time(&self, tx: &mut SqliteTx, key: &Key) -> Result<bool> {
        self.first_time_in(tx, key)
    }

    async fn savepoint(&self, tx: &mut SqliteTx, n: u32) -> Result<bool> {
        sql(tx.execute_batch(&format!("SAVEPOINT idemgate_{n}")))?;
        Ok(true)
    }

    async fn rollback_to(&self, tx: &mut SqliteTx, n: u32) -> Result<()> {
        sql(tx.execute_batch(&format!("ROLLBACK TO SAVEPOINT idemgate_{n}")))
    }

    async fn forget(&self, tx: &mut SqliteTx, key: &Key) -> Result<()> {
        let t = self.table.name()?;
        let mut stmt =
            sql(tx.prepare_cached(&format!("DELETE FROM {t} WHERE scope = ?1 AND id = ?2")))?;
        sql(stmt.execute(params![key.scope(), key.id()]))?;
        Ok(())
    }

    async fn commit(&self, mut tx: SqliteTx) -> Result<()> {
        let conn = tx
            .conn
            .take()
            .expect("a transaction holds its connection until it ends");
        let (_conn, ()) = blocking(conn, |c| match c.execute_batch("COMMIT") {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK");
                sql(Err(e))
            }
        })
        .await?;
        Ok(())
    }

    fn retention(&self) -> Duration {
        self.retention
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        self.table.name()?;
        let now = i64::try_from(to_millis(self.clock.now())).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = Arc::clone(&self.conn).lock_owned().await;
        let purge = self.purge.clone();
        let (_conn, n) =
            blocking(conn, move |c| sql(c.execute(&purge, params![now, limit]))).await?;
        Ok(n as u64)
    }

    async fn advance(&self, tx: &mut SqliteTx, p: &Position) -> Result<()> {
        let offsets = self
            .offsets
            .as_ref()
            .ok_or_else(|| no_positions("sqlite"))?;
        ready(offsets.advance(
            &mut Lite::new(tx),
            &p.group,
            &p.topic,
            p.partition,
            p.expected,
            p.offset + 1,
        ))
    }

    async fn load_positions(&self, group: &str, topic: &str) -> Result<BTreeMap<i32, i64>> {
        let offsets = self
            .offsets
            .as_ref()
            .ok_or_else(|| no_positions("sqlite"))?;
        let conn = self.conn.lock().await;
        ready(offsets.load_positions(&mut Lite::new(&conn), group, topic))
    }
}

//! The transactional inbox on SQLite.

use std::sync::Arc;
use std::time::Duration;

use idemgate_core::{Clock, Key, Result, SystemClock, duration_millis, to_millis};
use rusqlite::{Connection, Transaction, params};

use crate::error::sql;
use crate::schema::{check_table, migrate};

/// The transactional inbox: records a key as processed *inside the caller's transaction*, so the
/// dedup row and the business change commit (or roll back) together. A crash at any point leaves
/// either both or neither: exactly-once effect for effects in the same database.
///
/// ```
/// use idemgate_core::Key;
/// use idemgate_sqlite::SqliteInbox;
/// use rusqlite::Connection;
///
/// let mut conn = Connection::open_in_memory().unwrap();
/// conn.execute_batch("CREATE TABLE balance (total INTEGER); INSERT INTO balance VALUES (0);").unwrap();
/// let inbox = SqliteInbox::new();
/// inbox.migrate(&conn)?;
///
/// let key = Key::new("ledger", "evt-1")?;
/// for _delivery in 0..3 {
///     let tx = conn.transaction().unwrap();
///     if inbox.first_time(&tx, &key)? {
///         tx.execute("UPDATE balance SET total = total + 10", []).unwrap();
///     }
///     tx.commit().unwrap();
/// }
/// let total: i64 = conn.query_row("SELECT total FROM balance", [], |r| r.get(0)).unwrap();
/// assert_eq!(total, 10);
/// # Ok::<(), idemgate_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SqliteInbox {
    table: String,
    retention: Duration,
    clock: Arc<dyn Clock>,
    first_time: String,
    purge: String,
}

impl Default for SqliteInbox {
    fn default() -> Self {
        Self::new()
    }
}

impl SqliteInbox {
    /// An inbox in table `idemgate_inbox`, keeping keys for 7 days.
    pub fn new() -> Self {
        Self::with_parts(
            "idemgate_inbox".into(),
            Duration::from_secs(7 * 86_400),
            Arc::new(SystemClock),
        )
    }

    fn with_parts(table: String, retention: Duration, clock: Arc<dyn Clock>) -> Self {
        SqliteInbox {
            first_time: format!(
                "INSERT INTO {table} (scope, id, processed_at, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (scope, id) DO UPDATE SET processed_at = ?3, expires_at = ?4
                 WHERE expires_at <= ?3"
            ),
            purge: format!(
                "DELETE FROM {table} WHERE (scope, id) IN
                    (SELECT scope, id FROM {table} WHERE expires_at <= ?1 LIMIT ?2)"
            ),
            table,
            retention,
            clock,
        }
    }

    /// Another table (an identifier).
    pub fn with_table(self, table: impl Into<String>) -> Result<Self> {
        let table = table.into();
        check_table(&table)?;
        Ok(Self::with_parts(table, self.retention, self.clock))
    }

    /// How long a processed key is remembered: at least the broker's redelivery window.
    pub fn with_retention(self, retention: Duration) -> Self {
        Self::with_parts(self.table, retention, self.clock)
    }

    /// The clock for retention (default: system clock).
    pub fn with_clock(self, clock: impl Clock) -> Self {
        Self::with_parts(self.table, self.retention, Arc::new(clock))
    }

    /// Creates the inbox table if missing (call outside a transaction, once at start-up).
    pub fn migrate(&self, conn: &Connection) -> Result<()> {
        let t = &self.table;
        migrate(
            conn,
            t,
            1,
            &format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    scope TEXT NOT NULL, id TEXT NOT NULL,
                    processed_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
                    PRIMARY KEY (scope, id)) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at);"
            ),
            &["scope", "id", "processed_at", "expires_at"],
        )
    }

    /// Records `key` in the caller's transaction; `true` if this is its first time within the
    /// retention window (run the effect in the same transaction), `false` for a duplicate (skip
    /// the effect, commit, acknowledge).
    ///
    /// Two transactions with the same key serialize on SQLite's write lock: exactly one sees
    /// `true`. Use `BEGIN IMMEDIATE` (`TransactionBehavior::Immediate`) so the lock is taken up
    /// front rather than on upgrade.
    pub fn first_time(&self, tx: &Transaction<'_>, key: &Key) -> Result<bool> {
        let now = to_millis(self.clock.now());
        let expires = now.saturating_add(duration_millis(self.retention));
        let mut stmt = sql(tx.prepare_cached(&self.first_time))?;
        let n = sql(stmt.execute(params![
            key.scope(),
            key.id(),
            i64::try_from(now).unwrap_or(i64::MAX),
            i64::try_from(expires).unwrap_or(i64::MAX)
        ]))?;
        Ok(n == 1)
    }

    /// [`first_time`](Self::first_time) for a batch: one answer per key, in order; a key
    /// repeated in the batch is `true` at most once. SQLite runs in-process, so a batch is the
    /// same prepared statement run per key inside the caller's transaction: no round trips to
    /// save, and one commit for all.
    pub fn first_time_many(&self, tx: &Transaction<'_>, keys: &[Key]) -> Result<Vec<bool>> {
        keys.iter().map(|k| self.first_time(tx, k)).collect()
    }

    /// Deletes at most `limit` keys past their retention; returns how many.
    pub fn purge_expired(&self, conn: &Connection, limit: usize) -> Result<u64> {
        let now = i64::try_from(to_millis(self.clock.now())).unwrap_or(i64::MAX);
        let n = sql(conn.execute(
            &self.purge,
            params![now, i64::try_from(limit).unwrap_or(i64::MAX)],
        ))?;
        Ok(n as u64)
    }
}

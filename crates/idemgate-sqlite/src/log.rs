//! An idempotent, append-only event log on SQLite.

use std::sync::Arc;

pub use idemgate_core::{Appended, LoggedEvent};
use idemgate_core::{Clock, Result, SystemClock, to_millis};
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::sql;
use crate::schema::{check_table, migrate};

/// An append-only log of events per stream, idempotent by event id: appending a known event id
/// is a no-op that returns its original position. Positions are gap-free per stream.
///
/// [`append`](Self::append) nests as a savepoint inside the caller's transaction (so the event
/// commits with the business change), or runs its own `BEGIN IMMEDIATE` transaction.
///
/// ```
/// use idemgate_sqlite::SqliteEventLog;
///
/// let conn = rusqlite::Connection::open_in_memory().unwrap();
/// let log = SqliteEventLog::new();
/// log.migrate(&conn)?;
/// assert_eq!(log.append(&conn, "acct-1", "evt-1", b"+5")?.seq, 1);
/// assert!(!log.append(&conn, "acct-1", "evt-1", b"+5")?.fresh);
/// # Ok::<(), idemgate_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SqliteEventLog {
    table: String,
    clock: Arc<dyn Clock>,
}

impl Default for SqliteEventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl SqliteEventLog {
    /// A log in table `idemgate_log`.
    pub fn new() -> Self {
        SqliteEventLog {
            table: "idemgate_log".into(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Another table (an identifier).
    pub fn with_table(mut self, table: impl Into<String>) -> Result<Self> {
        self.table = table.into();
        check_table(&self.table)?;
        Ok(self)
    }

    /// Creates the table if missing.
    pub fn migrate(&self, conn: &Connection) -> Result<()> {
        let t = &self.table;
        migrate(
            conn,
            t,
            1,
            &format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    stream TEXT NOT NULL, seq INTEGER NOT NULL, event_id TEXT NOT NULL,
                    payload BLOB NOT NULL, appended_at INTEGER NOT NULL,
                    PRIMARY KEY (stream, seq), UNIQUE (stream, event_id)) WITHOUT ROWID"
            ),
            &["stream", "seq", "event_id", "payload", "appended_at"],
        )
    }

    /// Appends `payload` as `event_id` to `stream`, unless that event id is already there.
    pub fn append(
        &self,
        conn: &Connection,
        stream: &str,
        event_id: &str,
        payload: &[u8],
    ) -> Result<Appended> {
        // SQLite has one writer at a time, so inside the write transaction the stream's last
        // position cannot move under us
        let (begin, commit, rollback) = if conn.is_autocommit() {
            ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")
        } else {
            (
                "SAVEPOINT idemgate_log",
                "RELEASE idemgate_log",
                "ROLLBACK TO idemgate_log; RELEASE idemgate_log",
            )
        };
        sql(conn.execute_batch(begin))?;
        let result = self.append_in_tx(conn, stream, event_id, payload);
        match &result {
            Ok(_) => sql(conn.execute_batch(commit))?,
            Err(_) => {
                let _ = conn.execute_batch(rollback);
            }
        }
        result
    }

    fn append_in_tx(
        &self,
        conn: &Connection,
        stream: &str,
        event_id: &str,
        payload: &[u8],
    ) -> Result<Appended> {
        let t = &self.table;
        let known: Option<i64> = sql(conn
            .query_row(
                &format!("SELECT seq FROM {t} WHERE stream = ?1 AND event_id = ?2"),
                params![stream, event_id],
                |r| r.get(0),
            )
            .optional())?;
        if let Some(seq) = known {
            return Ok(Appended { seq, fresh: false });
        }
        let last: i64 = sql(conn.query_row(
            &format!("SELECT coalesce(max(seq), 0) FROM {t} WHERE stream = ?1"),
            [stream],
            |r| r.get(0),
        ))?;
        let now = i64::try_from(to_millis(self.clock.now())).unwrap_or(i64::MAX);
        sql(conn.execute(
            &format!("INSERT INTO {t} (stream, seq, event_id, payload, appended_at) VALUES (?1, ?2, ?3, ?4, ?5)"),
            params![stream, last + 1, event_id, payload, now],
        ))?;
        Ok(Appended {
            seq: last + 1,
            fresh: true,
        })
    }

    /// Up to `limit` events of `stream` after position `after`, in order.
    pub fn read(
        &self,
        conn: &Connection,
        stream: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>> {
        let mut stmt = sql(conn.prepare(&format!(
            "SELECT seq, event_id, payload FROM {} WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            self.table
        )))?;
        let rows = sql(stmt.query_map(params![stream, after, limit], |r| {
            Ok(LoggedEvent {
                seq: r.get(0)?,
                event_id: r.get(1)?,
                payload: r.get(2)?,
            })
        }))?;
        sql(rows.collect())
    }
}

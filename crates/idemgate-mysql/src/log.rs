//! An idempotent, append-only event log.

use idemgate_core::Result;
pub use idemgate_core::{Appended, LoggedEvent};
use sqlx::{Connection, MySqlConnection, MySqlPool};

use crate::error::{check_ident, my};
use crate::schema::migrate;
use crate::store::NOW;

/// An append-only log of events per stream, idempotent by event id: appending a known event id
/// is a no-op that returns its original position, so a redelivered event is recorded once.
/// Positions are gap-free per stream (the stream head is locked for the append).
///
/// Call [`append`](Self::append) on a connection inside the transaction that makes the business
/// change (it nests as a savepoint), or on a bare connection (it runs its own transaction).
#[derive(Debug, Clone)]
pub struct MySqlEventLog {
    table: String,
}

impl Default for MySqlEventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl MySqlEventLog {
    /// A log in tables `idemgate_log` and `idemgate_log_heads`.
    pub fn new() -> Self {
        MySqlEventLog {
            table: "idemgate_log".into(),
        }
    }

    /// Other tables: `{table}` and `{table}_heads` (a lowercase identifier).
    pub fn with_table(mut self, table: impl Into<String>) -> Result<Self> {
        self.table = table.into();
        check_ident(&self.table)?;
        Ok(self)
    }

    /// Creates the tables if missing.
    pub async fn migrate(&self, pool: &MySqlPool) -> Result<()> {
        let t = &self.table;
        migrate(
            pool,
            &format!("{t}_heads"),
            1,
            &[format!("CREATE TABLE IF NOT EXISTS {t}_heads (stream VARBINARY(255) PRIMARY KEY, last_seq BIGINT NOT NULL) ENGINE=InnoDB")],
            &["stream", "last_seq"],
        )
        .await?;
        migrate(
            pool,
            t,
            1,
            &[format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    stream VARBINARY(255) NOT NULL, seq BIGINT NOT NULL, event_id VARBINARY(255) NOT NULL,
                    payload LONGBLOB NOT NULL, appended_at BIGINT NOT NULL,
                    PRIMARY KEY (stream, seq), UNIQUE KEY {t}_event (stream, event_id)) ENGINE=InnoDB"
            )],
            &["stream", "seq", "event_id", "payload", "appended_at"],
        )
        .await
    }

    /// Appends `payload` as `event_id` to `stream`, unless that event id is already there.
    pub async fn append(
        &self,
        conn: &mut MySqlConnection,
        stream: &str,
        event_id: &str,
        payload: &[u8],
    ) -> Result<Appended> {
        let t = &self.table;
        let mut tx = my(conn.begin().await)?;
        my(sqlx::query(&format!("INSERT INTO {t}_heads (stream, last_seq) VALUES (?, 0) ON DUPLICATE KEY UPDATE last_seq = last_seq"))
            .bind(stream)
            .execute(&mut *tx)
            .await)?;
        // the upsert above took the head's exclusive lock (an S lock, as INSERT IGNORE takes, would
        // deadlock two appends upgrading it): appends to this stream serialize, duplicates included
        let (last,): (i64,) = my(sqlx::query_as(&format!(
            "SELECT last_seq FROM {t}_heads WHERE stream = ? FOR UPDATE"
        ))
        .bind(stream)
        .fetch_one(&mut *tx)
        .await)?;
        let known: Option<(i64,)> = my(sqlx::query_as(&format!(
            "SELECT seq FROM {t} WHERE stream = ? AND event_id = ?"
        ))
        .bind(stream)
        .bind(event_id)
        .fetch_optional(&mut *tx)
        .await)?;
        if let Some((seq,)) = known {
            my(tx.commit().await)?;
            return Ok(Appended { seq, fresh: false });
        }
        let seq = last + 1;
        my(sqlx::query(&format!("INSERT INTO {t} (stream, seq, event_id, payload, appended_at) VALUES (?, ?, ?, ?, {NOW})"))
            .bind(stream)
            .bind(seq)
            .bind(event_id)
            .bind(payload)
            .execute(&mut *tx)
            .await)?;
        my(sqlx::query(&format!(
            "UPDATE {t}_heads SET last_seq = ? WHERE stream = ?"
        ))
        .bind(seq)
        .bind(stream)
        .execute(&mut *tx)
        .await)?;
        my(tx.commit().await)?;
        Ok(Appended { seq, fresh: true })
    }

    /// Up to `limit` events of `stream` after position `after`, in order.
    pub async fn read(
        &self,
        conn: &mut MySqlConnection,
        stream: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>> {
        let rows: Vec<(i64, String, Vec<u8>)> = my(sqlx::query_as(&format!(
            "SELECT seq, CAST(event_id AS CHAR), payload FROM {} WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
            self.table
        ))
        .bind(stream)
        .bind(after)
        .bind(limit)
        .fetch_all(conn)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(seq, event_id, payload)| LoggedEvent {
                seq,
                event_id,
                payload,
            })
            .collect())
    }
}

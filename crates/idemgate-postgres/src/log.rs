//! An idempotent, append-only event log.

use idemgate_core::Result;
pub use idemgate_core::{Appended, LoggedEvent};
use sqlx::{Connection, PgConnection, PgPool};

use crate::error::{check_ident, pg};
use crate::schema::migrate;
use crate::store::NOW;

/// An append-only log of events per stream, idempotent by event id: appending a known event id
/// is a no-op that returns its original position, so a redelivered event is recorded once.
/// Positions are gap-free per stream (the stream head is locked for the append).
///
/// Call [`append`](Self::append) on a connection inside the transaction that makes the business
/// change (it nests as a savepoint), or on a bare connection (it runs its own transaction).
#[derive(Debug, Clone)]
pub struct PgEventLog {
    table: String,
}

impl Default for PgEventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl PgEventLog {
    /// A log in tables `idemgate_log` and `idemgate_log_heads`.
    pub fn new() -> Self {
        PgEventLog {
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
    pub async fn migrate(&self, pool: &PgPool) -> Result<()> {
        let t = &self.table;
        migrate(
            pool,
            &format!("{t}_heads"),
            &[&format!("CREATE TABLE IF NOT EXISTS {t}_heads (stream TEXT PRIMARY KEY, last_seq BIGINT NOT NULL)")],
            &["stream", "last_seq"],
        )
        .await?;
        migrate(
            pool,
            t,
            &[&format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    stream TEXT NOT NULL, seq BIGINT NOT NULL, event_id TEXT NOT NULL,
                    payload BYTEA NOT NULL, appended_at BIGINT NOT NULL,
                    PRIMARY KEY (stream, seq), UNIQUE (stream, event_id))"
            )],
            &["stream", "seq", "event_id", "payload", "appended_at"],
        )
        .await
    }

    /// Appends `payload` as `event_id` to `stream`, unless that event id is already there.
    pub async fn append(
        &self,
        conn: &mut PgConnection,
        stream: &str,
        event_id: &str,
        payload: &[u8],
    ) -> Result<Appended> {
        let t = &self.table;
        let mut tx = pg(conn.begin().await)?;
        pg(sqlx::query(&format!(
            "INSERT INTO {t}_heads (stream, last_seq) VALUES ($1, 0) ON CONFLICT DO NOTHING"
        ))
        .bind(stream)
        .execute(&mut *tx)
        .await)?;
        // the head's row lock serializes appends to this stream, duplicates included
        let (last,): (i64,) = pg(sqlx::query_as(&format!(
            "SELECT last_seq FROM {t}_heads WHERE stream = $1 FOR UPDATE"
        ))
        .bind(stream)
        .fetch_one(&mut *tx)
        .await)?;
        let known: Option<(i64,)> = pg(sqlx::query_as(&format!(
            "SELECT seq FROM {t} WHERE stream = $1 AND event_id = $2"
        ))
        .bind(stream)
        .bind(event_id)
        .fetch_optional(&mut *tx)
        .await)?;
        if let Some((seq,)) = known {
            pg(tx.commit().await)?;
            return Ok(Appended { seq, fresh: false });
        }
        let seq = last + 1;
        pg(sqlx::query(&format!("INSERT INTO {t} (stream, seq, event_id, payload, appended_at) VALUES ($1, $2, $3, $4, {NOW})"))
            .bind(stream)
            .bind(seq)
            .bind(event_id)
            .bind(payload)
            .execute(&mut *tx)
            .await)?;
        pg(sqlx::query(&format!(
            "UPDATE {t}_heads SET last_seq = $2 WHERE stream = $1"
        ))
        .bind(stream)
        .bind(seq)
        .execute(&mut *tx)
        .await)?;
        pg(tx.commit().await)?;
        Ok(Appended { seq, fresh: true })
    }

    /// Up to `limit` events of `stream` after position `after`, in order.
    pub async fn read(
        &self,
        conn: &mut PgConnection,
        stream: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>> {
        let rows: Vec<(i64, String, Vec<u8>)> = pg(sqlx::query_as(&format!(
            "SELECT seq, event_id, payload FROM {} WHERE stream = $1 AND seq > $2 ORDER BY seq LIMIT $3",
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

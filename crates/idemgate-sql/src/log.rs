//! An idempotent, append-only event log, on any SQL backend.

use std::sync::Arc;

use idemgate_core::backend::{Appended, LoggedEvent, to_millis};
use idemgate_core::{Clock, Error, Result, SystemClock};

use crate::{Arg, Dialect, Kind, SqlConn, Table};

/// An append-only log of events per stream, idempotent by event id: appending a known event id
/// is a no-op that returns its original position, so a redelivered event is recorded once.
/// Positions are gap-free per stream (the stream's head row is locked for the append).
///
/// Call [`append`](Self::append) inside the transaction that makes the business change, so the
/// event and the change commit together.
#[derive(Debug, Clone)]
pub struct EventLog {
    table: Table,
    clock: Arc<dyn Clock>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLog {
    /// A log in tables `idemgate_log` and `idemgate_log_heads`.
    pub fn new() -> Self {
        EventLog {
            table: Table::new(Dialect::Postgres, "idemgate_log"),
            clock: Arc::new(SystemClock),
        }
    }

    /// Other tables: `{table}` and `{table}_heads`. `table` is a lowercase identifier, or every
    /// call fails with `Error::Config`.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = Table::new(Dialect::Postgres, table);
        self
    }

    /// The clock that stamps `appended_at` where the database has none of its own (SQLite).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Creates the tables if missing.
    pub async fn migrate<C: SqlConn>(&self, conn: &mut C) -> Result<()> {
        let (t, d) = (self.table.name()?, conn.dialect());
        let (key, big, blob, opts) = (
            d.key_type(),
            d.bigint_type(),
            d.blob_type(),
            d.table_options(),
        );
        crate::migrate(
            conn,
            &format!("{t}_heads"),
            &[format!(
                "CREATE TABLE IF NOT EXISTS {t}_heads (stream {key} PRIMARY KEY, last_seq {big} NOT NULL){opts}"
            )],
            &["stream", "last_seq"],
        )
        .await?;
        crate::migrate(
            conn,
            t,
            &[format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    stream {key} NOT NULL, seq {big} NOT NULL, event_id {key} NOT NULL,
                    payload {blob} NOT NULL, appended_at {big} NOT NULL,
                    PRIMARY KEY (stream, seq), UNIQUE (stream, event_id)){opts}"
            )],
            &["stream", "seq", "event_id", "payload", "appended_at"],
        )
        .await
    }

    /// Appends `payload` as `event_id` to `stream`, unless that event id is already there. Call
    /// it on a connection inside the transaction that makes the business change (it nests as a
    /// savepoint), or on a bare connection (it runs its own transaction).
    pub async fn append<C: SqlConn>(
        &self,
        conn: &mut C,
        stream: &str,
        event_id: &str,
        payload: &[u8],
    ) -> Result<Appended> {
        crate::in_transaction(conn, async |conn| {
            self.append_in(conn, stream, event_id, payload).await
        })
        .await
    }

    async fn append_in<C: SqlConn>(
        &self,
        conn: &mut C,
        stream: &str,
        event_id: &str,
        payload: &[u8],
    ) -> Result<Appended> {
        let (t, d) = (self.table.name()?, conn.dialect());
        // the head's write lock serializes appends to this stream, duplicates included. A
        // SQLite log made before it kept heads starts each stream from its last position (one
        // writer: reading the log there locks nothing more; InnoDB's range locks on it would
        // deadlock concurrent appends)
        let heads = format!("{t}_heads");
        let (rows, args) = if d == Dialect::Sqlite {
            (
                format!("SELECT ?, COALESCE(MAX(seq), 0) FROM {t} WHERE stream = ?"),
                [Arg::Text(stream), Arg::Text(stream)],
            )
        } else {
            ("VALUES (?, ?)".to_owned(), [Arg::Text(stream), Arg::Int(0)])
        };
        let lock = d.insert_or_lock(&heads, "stream", "last_seq", &rows);
        conn.execute(&d.sql(&lock), &args).await?;
        let known = conn
            .fetch(
                &d.sql(&format!(
                    "SELECT seq FROM {t} WHERE stream = ? AND event_id = ?"
                )),
                &[Arg::Text(stream), Arg::Text(event_id)],
                &[Kind::Int],
            )
            .await?;
        if let Some(seq) = known.first().and_then(|r| r[0].int()) {
            return Ok(Appended { seq, fresh: false });
        }
        let last = conn
            .fetch(
                &d.sql(&format!("SELECT last_seq FROM {heads} WHERE stream = ?")),
                &[Arg::Text(stream)],
                &[Kind::Int],
            )
            .await?
            .first()
            .and_then(|r| r[0].int())
            .ok_or_else(|| Error::Corrupt {
                backend: d.backend(),
                reason: format!("stream {stream:?} has no head row in {heads}"),
            })?;
        let seq = last + 1;
        // the database's clock, or (SQLite) the log's
        let (at, at_arg) = match d.now_ms() {
            Some(expr) => (expr, None),
            None => {
                let now = i64::try_from(to_millis(self.clock.now())).unwrap_or(i64::MAX);
                ("?", Some(Arg::Int(now)))
            }
        };
        let mut args = vec![
            Arg::Text(stream),
            Arg::Int(seq),
            Arg::Text(event_id),
            Arg::Blob(payload),
        ];
        args.extend(at_arg);
        conn.execute(
            &d.sql(&format!(
                "INSERT INTO {t} (stream, seq, event_id, payload, appended_at) VALUES (?, ?, ?, ?, {at})"
            )),
            &args,
        )
        .await?;
        conn.execute(
            &d.sql(&format!("UPDATE {heads} SET last_seq = ? WHERE stream = ?")),
            &[Arg::Int(seq), Arg::Text(stream)],
        )
        .await?;
        Ok(Appended { seq, fresh: true })
    }

    /// Up to `limit` events of `stream` after position `after`, in order.
    pub async fn read<C: SqlConn>(
        &self,
        conn: &mut C,
        stream: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>> {
        let (t, d) = (self.table.name()?, conn.dialect());
        let rows = conn
            .fetch(
                &d.sql(&format!(
                    "SELECT seq, event_id, payload FROM {} WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
                    t
                )),
                &[Arg::Text(stream), Arg::Int(after), Arg::Int(limit)],
                &[Kind::Int, Kind::Text, Kind::Blob],
            )
            .await?;
        rows.into_iter()
            .map(|r| {
                let mut r = r.into_iter();
                match (r.next(), r.next(), r.next()) {
                    (Some(seq), Some(id), Some(payload)) => Ok(LoggedEvent {
                        seq: seq.int().unwrap_or_default(),
                        event_id: id.into_text().unwrap_or_default(),
                        payload: payload.into_blob().unwrap_or_default(),
                    }),
                    _ => Err(Error::Corrupt {
                        backend: d.backend(),
                        reason: "a short event row".into(),
                    }),
                }
            })
            .collect()
    }
}

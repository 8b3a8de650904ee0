//! The SQL that idemgate's PostgreSQL, MySQL/MariaDB and SQLite backends share, written once:
//!
//! - [`Dialect`]: placeholders, key, integer and blob types, insert-ignore, the clock;
//! - [`SqlConn`]: the few operations the shared code needs from a connection (sqlx's
//!   `PgConnection` and `MySqlConnection` with the `postgres` and `mysql` features; SQLite
//!   through `idemgate-sqlite`);
//! - [`migrate`]: one migration algorithm (versioned steps, serialized across processes);
//! - [`Offsets`]: Kafka positions by compare-and-set in the inbox transaction;
//! - [`EventLog`]: an append-only event log, idempotent by event id, gap-free per stream;
//! - [`OutboxTable`]: the transactional outbox's rows, taken in order per ordering key;
//! - how a `sqlx::Error` maps onto idemgate's error kinds, and which table names are accepted.
//!
//! The backends keep only the SQL that really differs: their claim and inbox statements.
//!
//! ```
//! use idemgate_sql::Dialect;
//!
//! assert!(idemgate_sql::check_ident("idemgate_records").is_ok());
//! assert!(idemgate_sql::check_ident("x; drop").is_err());
//! assert_eq!(Dialect::Postgres.sql("WHERE a = ? AND b = ?"), "WHERE a = $1 AND b = $2");
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod classify;
mod conn;
mod dialect;
mod inspect;
mod log;
mod migrate;
mod offsets;
mod outbox;
mod table;

pub use classify::check_ident;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use classify::classify;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) use classify::classify_for;
#[cfg(feature = "mysql")]
pub use classify::classify_mysql;
#[cfg(feature = "postgres")]
pub use classify::classify_postgres;
pub use conn::{Arg, Kind, SqlConn, Value, in_transaction};
pub use dialect::Dialect;
pub use inspect::{InboxRow, inbox_row};
pub use log::EventLog;
pub use migrate::migrate;
pub use offsets::Offsets;
pub use outbox::OutboxTable;
pub use table::Table;

/// What an inbox without an offsets table answers when asked for positions.
pub fn no_positions(backend: &'static str) -> idemgate_core::Error {
    idemgate_core::Error::Config {
        message: format!(
            "this {backend} inbox keeps no positions: give it an offsets table with \
             `with_offsets(..)` and migrate it"
        ),
    }
}

/// A duration in whole milliseconds, as the tables store it (saturating).
pub fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[doc(hidden)]
pub mod __private {
    pub use idemgate_core::{Backlog, DeadRow, Outbox, OutboxRow, Outgoing};
    pub use idemgate_core::{Inbox, Key, Position, Result};
    pub use std::collections::BTreeMap;
    pub use std::time::Duration;
}

/// Implements [`Inbox`](idemgate_core::Inbox) for a sqlx backend's inbox: a type with `pool`
/// (a sqlx pool), `offsets` (an optional [`Offsets`]) and `retention` fields, inherent
/// `first_time`, `first_time_many` and `purge` methods, and a `sql()` whose statements include
/// `forget` (a delete by scope and id); `$tx` is its pool's transaction, `$classify` its error
/// classification and `$backend` its name. Savepoints are SQL's `SAVEPOINT idemgate_<n>`.
#[macro_export]
macro_rules! sqlx_inbox {
    ($inbox:ty, $tx:ty, $classify:path, $backend:literal) => {
        impl $crate::__private::Inbox for $inbox {
            type Tx = $tx;

            async fn begin(&self) -> $crate::__private::Result<$tx> {
                self.pool.begin().await.map_err($classify)
            }

            async fn first_time(
                &self,
                tx: &mut $tx,
                key: &$crate::__private::Key,
            ) -> $crate::__private::Result<bool> {
                <$inbox>::first_time(self, tx, key).await
            }

            async fn first_time_many(
                &self,
                tx: &mut $tx,
                keys: &[$crate::__private::Key],
            ) -> $crate::__private::Result<Vec<bool>> {
                <$inbox>::first_time_many(self, tx, keys).await
            }

            async fn savepoint(&self, tx: &mut $tx, n: u32) -> $crate::__private::Result<bool> {
                sqlx::query(&format!("SAVEPOINT idemgate_{n}"))
                    .execute(&mut **tx)
                    .await
                    .map_err($classify)?;
                Ok(true)
            }

            async fn rollback_to(&self, tx: &mut $tx, n: u32) -> $crate::__private::Result<()> {
                sqlx::query(&format!("ROLLBACK TO SAVEPOINT idemgate_{n}"))
                    .execute(&mut **tx)
                    .await
                    .map_err($classify)?;
                Ok(())
            }

            async fn forget(
                &self,
                tx: &mut $tx,
                key: &$crate::__private::Key,
            ) -> $crate::__private::Result<()> {
                sqlx::query(&self.sql()?.forget)
                    .bind(key.scope())
                    .bind(key.id())
                    .execute(&mut **tx)
                    .await
                    .map_err($classify)?;
                Ok(())
            }

            async fn commit(&self, tx: $tx) -> $crate::__private::Result<()> {
                tx.commit().await.map_err($classify)
            }

            fn retention(&self) -> $crate::__private::Duration {
                self.retention
            }

            async fn purge_expired(&self, limit: usize) -> $crate::__private::Result<u64> {
                self.purge(limit).await
            }

            async fn advance(
                &self,
                tx: &mut $tx,
                p: &$crate::__private::Position,
            ) -> $crate::__private::Result<()> {
                let next = p.offset + 1;
                let offsets = self
                    .offsets
                    .as_ref()
                    .ok_or_else(|| $crate::no_positions($backend))?;
                offsets
                    .advance(&mut **tx, &p.group, &p.topic, p.partition, p.expected, next)
                    .await
            }

            async fn load_positions(
                &self,
                group: &str,
                topic: &str,
            ) -> $crate::__private::Result<$crate::__private::BTreeMap<i32, i64>> {
                let offsets = self
                    .offsets
                    .as_ref()
                    .ok_or_else(|| $crate::no_positions($backend))?;
                let mut conn = self.pool.acquire().await.map_err($classify)?;
                offsets.load_positions(&mut *conn, group, topic).await
            }
        }
    };
}

/// Implements [`Outbox`](idemgate_core::Outbox) for a sqlx backend's outbox: a type with `pool`
/// (a sqlx pool) and `table` (an [`OutboxTable`]) fields and inherent `enqueue_in` (the enqueue
/// on `$tx`) and `wait_for` (the relay's wait) methods; `$classify` is its error classification.
#[macro_export]
macro_rules! sqlx_outbox {
    ($outbox:ty, $tx:ty, $classify:path) => {
        impl $crate::__private::Outbox for $outbox {
            type Tx = $tx;

            async fn enqueue(
                &self,
                tx: &mut $tx,
                msg: &$crate::__private::Outgoing,
            ) -> $crate::__private::Result<()> {
                self.enqueue_in(tx, msg).await
            }

            async fn take(
                &self,
                owner: &str,
                limit: usize,
                lease: $crate::__private::Duration,
            ) -> $crate::__private::Result<Vec<$crate::__private::OutboxRow>> {
                let mut conn = self.pool.acquire().await.map_err($classify)?;
                self.table.take(&mut *conn, owner, limit, lease).await
            }

            async fn sent(&self, ids: &[i64]) -> $crate::__private::Result<()> {
                let mut conn = self.pool.acquire().await.map_err($classify)?;
                self.table.sent(&mut *conn, ids).await
            }

            async fn retry(
                &self,
                owner: &str,
                id: i64,
                delay: $crate::__private::Duration,
                error: &str,
            ) -> $crate::__private::Result<bool> {
                let mut conn = self.pool.acquire().await.map_err($classify)?;
                self.table.retry(&mut *conn, owner, id, delay, error).await
            }

            async fn release(&self, owner: &str, ids: &[i64]) -> $crate::__private::Result<()> {
                let mut conn = self.pool.acquire().await.map_err($classify)?;
                self.table.release(&mut *conn, owner, ids).await
            }

            async fn dead_letter(
                &self,
                owner: &str,
                id: i64,
                reason: &str,
            ) -> $crate::__private::Result<bool> {
                let mut conn = self.pool.acquire().await.map_err($classify)?;
                self.table.dead_letter(&mut *conn, owner, id, reason).await
            }

            async fn purge_sent(
                &self,
                retention: $crate::__private::Duration,
                limit: usize,
            ) -> $crate::__private::Result<u64> {
                let mut conn = self.pool.acquire().await.map_err($classify)?;
                self.table.purge_sent(&mut *conn, retention, limit).await
            }

            async fn backlog(&self) -> $crate::__private::Result<$crate::__private::Backlog> {
                let mut conn = self.pool.acquire().await.map_err($classify)?;
                self.table.backlog(&mut *conn).await
            }

            async fn dead_letters(
                &self,
                limit: usize,
            ) -> $crate::__private::Result<Vec<$crate::__private::DeadRow>> {
                let mut conn = self.pool.acquire().await.map_err($classify)?;
                self.table.dead_letters(&mut *conn, limit).await
            }

            async fn wait(&self, timeout: $crate::__private::Duration) -> bool {
                self.wait_for(timeout).await
            }
        }
    };
}

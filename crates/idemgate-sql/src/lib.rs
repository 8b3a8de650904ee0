//! The SQL that idemgate's PostgreSQL, MySQL/MariaDB and SQLite backends share, written once:
//!
//! - [`Dialect`]: placeholders, key, integer and blob types, insert-ignore, the clock;
//! - [`SqlConn`]: the few operations the shared code needs from a connection (sqlx's
//!   `PgConnection` and `MySqlConnection` with the `postgres` and `mysql` features; SQLite
//!   through `idemgate-sqlite`);
//! - [`migrate`]: one migration algorithm (versioned steps, serialized across processes);
//! - [`Offsets`]: Kafka positions by compare-and-set in the inbox transaction;
//! - [`EventLog`]: an append-only event log, idempotent by event id, gap-free per stream;
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
mod log;
mod migrate;
mod offsets;

pub use classify::check_ident;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use classify::classify;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) use classify::classify_for;
#[cfg(feature = "mysql")]
pub use classify::classify_mysql;
#[cfg(feature = "postgres")]
pub use classify::classify_postgres;
pub use conn::{Arg, Kind, SqlConn, Value};
pub use dialect::Dialect;
pub use log::EventLog;
pub use migrate::migrate;
pub use offsets::Offsets;

/// A duration in whole milliseconds, as the tables store it (saturating).
pub fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

//! MySQL and MariaDB backend for idemgate.
//!
//! - [`MySqlStore`]: the [`Store`](idemgate_core::Store) contract: each claim is one
//!   `INSERT … ON DUPLICATE KEY UPDATE` against the primary key whose assignments only take
//!   effect when the key is free (marked by a per-claim nonce), read back under the row lock in
//!   the same transaction; expiry judged by the database's clock;
//! - [`MySqlOutbox`]: the transactional outbox, in that same transaction (relays wake on
//!   a poll);
//! - [`MySqlInbox`]: the transactional inbox, inside the caller's transaction;
//! - [`MySqlOffsets`]: Kafka consumer positions advanced by compare-and-set in that transaction;
//! - [`MySqlEventLog`]: an append-only event log, idempotent by event id, gap-free per stream.
//!
//! Keys are stored as `VARBINARY`, so they compare byte for byte whatever the server's collation.
//!
//! ```no_run
//! # async fn example() -> Result<(), idemgate_core::Error> {
//! use idemgate_mysql::MySqlStore;
//! let store = MySqlStore::builder().with_url("mysql://root@127.0.0.1:3306/test").build()?;
//! store.migrate().await?;
//! # Ok(()) }
//! ```

mod error;
mod inbox;
mod outbox;
mod store;

pub use error::classify_error;
pub use idemgate_core::backend::{Appended, LoggedEvent};
pub use inbox::{MySqlInbox, MySqlTx};
pub use outbox::MySqlOutbox;

/// Kafka positions kept in the inbox transaction ([`idemgate_sql::Offsets`] on MySQL).
pub type MySqlOffsets = idemgate_sql::Offsets;
/// An idempotent, append-only event log ([`idemgate_sql::EventLog`] on MySQL).
pub type MySqlEventLog = idemgate_sql::EventLog;
pub use store::{MySqlStore, MySqlStoreBuilder};

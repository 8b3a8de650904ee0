//! PostgreSQL backend for idemgate.
//!
//! - [`PostgresStore`]: the [`Store`](idemgate_core::Store) contract on PostgreSQL: each claim
//!   is one `INSERT … ON CONFLICT … DO UPDATE … WHERE <free> RETURNING` against the primary key,
//!   expiry judged by the database's clock;
//! - [`PgOutbox`]: the transactional outbox, in that same transaction (relays wake on
//!   `LISTEN/NOTIFY`);
//! - [`PgInbox`]: the transactional inbox, inside the caller's transaction;
//! - [`PgOffsets`]: Kafka consumer positions advanced by compare-and-set in that same
//!   transaction;
//! - [`PgEventLog`]: an append-only event log, idempotent by event id, gap-free per stream.
//!
//! ```no_run
//! use std::time::Duration;
//! use idemgate_core::{Gate, Key};
//! use idemgate_postgres::PostgresStore;
//!
//! # async fn example() -> Result<(), idemgate_core::Error> {
//! let store = PostgresStore::builder().with_url("postgres://postgres@127.0.0.1/test").build()?;
//! store.migrate().await?;
//! let gate = Gate::new(store).with_lease(Duration::from_secs(30));
//! let key = Key::compose("payments", ["pay_123", "capture"])?;
//! let _ = gate.run(&key, None, |_| async { Ok::<_, String>(String::from("captured")) }).await;
//! # Ok(()) }
//! ```

mod error;
mod inbox;
mod outbox;
mod store;

pub use error::classify_error;
pub use idemgate_core::backend::{Appended, LoggedEvent};
pub use inbox::{PgInbox, PgTx};
pub use outbox::PgOutbox;

/// Kafka positions kept in the inbox transaction ([`idemgate_sql::Offsets`] on PostgreSQL).
pub type PgOffsets = idemgate_sql::Offsets;
/// An idempotent, append-only event log ([`idemgate_sql::EventLog`] on PostgreSQL).
pub type PgEventLog = idemgate_sql::EventLog;
pub use store::{Partitions, PostgresStore, PostgresStoreBuilder};

//! SQLite backend for idemgate: the embedded, persistent default.
//!
//! - [`SqliteStore`]: a [`Store`](idemgate_core::Store) in one SQLite file (WAL, one atomic
//!   statement per claim, group commit), shared safely by several processes;
//! - [`SqliteInbox`]: the transactional inbox, so the dedup row and the business change commit
//!   in one transaction;
//! - [`SqliteOutbox`]: the transactional outbox, in that same transaction;
//! - [`SqliteOffsets`]: Kafka consumer positions, compare-and-set in the inbox transaction;
//! - [`SqliteEventLog`]: an append-only event log, idempotent by event id;
//! - [`SqliteQueue`]: an at-least-once queue with SQS semantics (visibility timeout, receive
//!   count, delete to acknowledge, message groups), used by `idemgate demo`; with the
//!   `consumer` feature, [`QueueSource`] runs the consumer runtime on it and [`QueueSink`]
//!   publishes to it (a relay's sink).
//!
//! ```
//! use std::time::Duration;
//! use idemgate_core::{Gate, Key, Run};
//! use idemgate_sqlite::SqliteStore;
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("dedup.db");
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store = SqliteStore::open(&path)?;
//! let gate = Gate::new(store).with_lease(Duration::from_secs(30));
//! let key = Key::compose("emails", ["user-7", "welcome"])?;
//! let sent = gate.run(&key, None, |_lease| async { Ok::<_, std::io::Error>(true) }).await.unwrap();
//! assert_eq!(sent, Run::Fresh(true));
//! assert!(gate.run(&key, None, |_| async { Ok::<bool, std::io::Error>(false) }).await.unwrap().is_replayed());
//! # Ok::<(), idemgate_core::Error>(())
//! # }).unwrap();
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

mod conn;
mod error;
mod inbox;
mod outbox;
mod queue;
#[cfg(feature = "consumer")]
mod source;
mod store;

pub use conn::{Lite, ready, with_connection};
pub use idemgate_core::backend::{Appended, LoggedEvent};
pub use inbox::{SqliteInbox, SqliteTx};
pub use outbox::SqliteOutbox;

/// Kafka positions kept in the inbox transaction ([`idemgate_sql::Offsets`] on SQLite, through
/// [`Lite`]).
pub type SqliteOffsets = idemgate_sql::Offsets;
/// An idempotent, append-only event log ([`idemgate_sql::EventLog`] on SQLite, through
/// [`Lite`]).
pub type SqliteEventLog = idemgate_sql::EventLog;
pub use queue::{Message, QueueStats, Receipt, SqliteQueue};
#[cfg(feature = "consumer")]
#[cfg_attr(docsrs, doc(cfg(feature = "consumer")))]
pub use source::{DeadLetter, QueueDelivery, QueueSink, QueueSource};
pub use store::{SqliteStore, SqliteStoreBuilder, Synchronous};

//! SQLite backend for idemgate: the embedded, persistent default.
//!
//! - [`SqliteStore`]: a [`Store`](idemgate_core::Store) in one SQLite file (WAL, one atomic
//!   statement per claim, group commit), shared safely by several processes;
//! - [`SqliteInbox`]: the transactional inbox, so the dedup row and the business change commit
//!   in one transaction;
//! - [`SqliteOffsets`]: Kafka consumer positions, compare-and-set in the inbox transaction;
//! - [`SqliteEventLog`]: an append-only event log, idempotent by event id;
//! - [`SqliteQueue`]: an at-least-once queue with SQS semantics (visibility timeout, receive
//!   count, delete to acknowledge), used by `idemgate demo`.
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
//! let gate = Gate::new(store).lease(Duration::from_secs(30));
//! let key = Key::compose("emails", ["user-7", "welcome"])?;
//! let sent = gate.run(&key, None, |_lease| async { Ok::<_, std::io::Error>(true) }).await.unwrap();
//! assert_eq!(sent, Run::Fresh(true));
//! assert!(gate.run(&key, None, |_| async { Ok::<bool, std::io::Error>(false) }).await.unwrap().is_replayed());
//! # Ok::<(), idemgate_core::Error>(())
//! # }).unwrap();
//! ```

mod error;
mod inbox;
mod log;
mod offsets;
mod queue;
mod schema;
mod store;

pub use inbox::SqliteInbox;
pub use log::{Appended, LoggedEvent, SqliteEventLog};
pub use offsets::SqliteOffsets;
pub use queue::{Message, QueueStats, Receipt, SqliteQueue};
pub use store::{SqliteStore, SqliteStoreBuilder, Synchronous};

//! The core of idemgate: exactly-once effects on top of at-least-once delivery.
//!
//! This crate has the vocabulary every other idemgate crate shares, and no I/O:
//!
//! - [`Key`] (scope + id, [`Key::compose`] for business keys, [`Key::derive`] for downstream
//!   calls), [`EventId`] (UUIDv7 or producer + sequence) and [`Fingerprint`] (BLAKE3);
//! - the [`Store`] contract: atomic [`claim`](Store::claim), [`complete`](Store::complete) with
//!   a stored [`Outcome`], [`release`](Store::release), [`renew`](Store::renew), leases with
//!   fencing tokens and retention; [`StoreExt`] and the type-erased [`BoxStore`];
//! - [`MemoryStore`], sharded and optionally bounded;
//! - the [`Inbox`] contract: the processed-event row in the handler's own transaction, with
//!   Kafka [`Position`]s advanced in that same transaction;
//! - the [`Outbox`] contract: outgoing messages in the business change's transaction, taken
//!   and marked sent by a relay, in order per ordering key;
//! - the [`Gate`] runner: claim, run with a lease heartbeat, complete, and replay to duplicates.
//!
//! ```
//! use std::time::Duration;
//! use idemgate_core::{Fingerprint, Gate, GateError, Key, MemoryStore, Run};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let gate = Gate::new(MemoryStore::new())
//!     .with_lease(Duration::from_secs(30))
//!     .with_retention(Duration::from_secs(7 * 86_400));
//! let key = Key::compose("inventory", ["order-17", "sku-9"])?;
//! let fp = Fingerprint::of(b"qty=2");
//!
//! let reserve = |_lease| async { Ok::<u32, String>(2) };
//! assert_eq!(gate.run(&key, Some(&fp), reserve).await.unwrap(), Run::Fresh(2));
//! assert_eq!(gate.run(&key, Some(&fp), reserve).await.unwrap(), Run::Replayed(2));
//!
//! // the same key with another request is refused, not replayed
//! let other = Fingerprint::of(b"qty=3");
//! let err = gate.run(&key, Some(&other), reserve).await.unwrap_err();
//! assert!(matches!(err, GateError::Mismatch { .. }));
//! # Ok::<(), idemgate_core::Error>(())
//! # }).unwrap();
//! ```
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `tracing` | no (yes via `idemgate`) | an `idemgate.run` span per fresh execution (key, token, attempt) |
//! | `metrics` | no (yes via `idemgate`) | `idemgate_gate_total{outcome}`, `idemgate_takeovers_total`, `idemgate_store_seconds{op}` |
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "cache")]
mod cache;
mod clock;
mod error;
mod fingerprint;
mod gate;
mod inbox;
mod json;
mod key;
mod memory;
mod obs;
mod outbox;
mod outcome;
mod record;
mod row;
mod store;
mod warning;

#[cfg(feature = "cache")]
pub use cache::CachedStore;
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{BoxError, Error, Result};
pub use fingerprint::Fingerprint;
pub use gate::{ErrorPolicy, Gate, GateError, InProgressPolicy, Run};
pub use inbox::{Inbox, InboxFn, InboxHandler, Position};
pub use json::JsonFields;
pub use key::{EventId, Key, MAX_KEY_LEN};
pub use memory::{MemoryStore, MemoryStoreBuilder};
pub use outbox::{Backlog, DeadRow, Outbox, OutboxRow, Outgoing};
pub use outcome::{Meta, Outcome};
pub use record::{Claim, ClaimOptions, Forgotten, Lease, Record, State};
pub use store::{BoxStore, Store, StoreExt};
pub use warning::Warning;

/// What only backend authors need: the row SQL stores keep a record in, the millisecond
/// helpers, the token arithmetic, the lease heartbeat, and the event log's rows.
pub mod backend {
    pub use crate::clock::{duration_millis, from_millis, to_millis};
    pub use crate::gate::{KeepAlive, LeaseGuard, keep_alive};
    pub use crate::record::{END_OF_TIME_MS, TOKENS_PER_MS, first_token, later};
    pub use crate::row::{Appended, ForgetStep, LoggedEvent, RecordRow, time_from_ms};
}

//! **idemgate**: exactly-once effects on top of at-least-once delivery.
//!
//! Brokers redeliver and clients retry. idemgate makes a handler safe to run against any number
//! of duplicates: an atomic check-and-claim per key with leases and fencing tokens, stored
//! results replayed to duplicates, and a transactional inbox for effects in the same database.
//!
//! ```
//! use std::time::Duration;
//! use idemgate::{Gate, Key, MemoryStore, Run};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let gate = Gate::new(MemoryStore::new()).lease(Duration::from_secs(30));
//! let key = Key::compose("payments", ["pay_123", "capture"])?;
//! let first = gate.run(&key, None, |_| async { Ok::<_, String>(42) }).await.unwrap();
//! let again = gate.run(&key, None, |_| async { Ok::<_, String>(0) }).await.unwrap();
//! assert_eq!((first, again), (Run::Fresh(42), Run::Replayed(42)));
//! # Ok::<(), idemgate::Error>(())
//! # }).unwrap();
//! ```
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `sqlite` | yes | [`sqlite`]: `SqliteStore`, `SqliteInbox`, `SqliteQueue` |
//! | `postgres` | no | `postgres`: `PostgresStore`, `PgInbox`, `PgOffsets` |
//! | `mysql` | no | `mysql`: `MySqlStore`, `MySqlInbox`, `MySqlOffsets` (MySQL and MariaDB) |
//! | `redis` | no | `redis`: `RedisStore` (standalone and cluster) |
//! | `tracing` | yes | spans from the Gate |
//! | `metrics` | yes | counters and histograms from the Gate |
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use idemgate_core as core;
pub use idemgate_core::*;

#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use idemgate_sqlite as sqlite;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use idemgate_postgres as postgres;

#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use idemgate_mysql as mysql;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use idemgate_redis as redis;

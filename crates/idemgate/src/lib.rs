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
//! let gate = Gate::new(MemoryStore::new()).with_lease(Duration::from_secs(30));
//! let key = Key::compose("payments", ["pay_123", "capture"])?;
//! let first = gate.run(&key, None, |_| async { Ok::<_, String>(42) }).await.unwrap();
//! let again = gate.run(&key, None, |_| async { Ok::<_, String>(0) }).await.unwrap();
//! assert_eq!((first, again), (Run::Fresh(42), Run::Replayed(42)));
//! # Ok::<(), idemgate::Error>(())
//! # }).unwrap();
//! ```
//!
//! [`open`] opens a store from a URL (`sqlite:PATH`, `postgres://…`, `redis://…`, …), each
//! scheme behind its feature; [`open_checked`] also returns what it found wrong with the
//! store's settings.
//!
//! The getting-started pages (`docs/getting-started/` in the repository) take each entry
//! point from `cargo new` to a running service: the HTTP layer, a consumer, the Gate.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `sqlite` | yes | [`sqlite`]: `SqliteStore`, the SQLite inbox (`SqliteInbox`, `SqliteTx`) and the embedded queue (`SqliteQueue`) |
//! | `postgres` | no | `postgres`: `PostgresStore`, `PgInbox` and its transaction `PgTx`, `PgOffsets`, `PgEventLog` |
//! | `mysql` | no | `mysql`: `MySqlStore`, `MySqlInbox` and `MySqlTx`, `MySqlOffsets`, `MySqlEventLog`, for MySQL 8 and MariaDB 10.5+ |
//! | `redis` | no | `redis`: `RedisStore`, for standalone Redis and Redis Cluster |
//! | `dynamodb` | no | `dynamodb`: `DynamoStore`, on Amazon DynamoDB |
//! | `inspect` | no | `inspect`: an inbox row and consumer positions read by URL (turns `sqlite`, `postgres` and `mysql` on) |
//! | `http` | no | `http`: the `Idempotency-Key` layer for tower and axum |
//! | `consumer` | no | `consumer`: the consumer runtime (Gate mode on any store, Inbox mode on any backend's inbox), `Source` / `Delivery` / `Sink`, the shutdown helpers, the in-process `MemoryBroker` |
//! | `rabbitmq` | no | `rabbitmq`: RabbitMQ source and sink (turns `consumer` on) |
//! | `nats` | no | `nats`: NATS JetStream source and sink (turns `consumer` on) |
//! | `kafka` | no | `kafka`: Kafka source and idempotent producer (turns `consumer` on; builds librdkafka from source, which needs a C toolchain) |
//! | `mqtt` | no | `mqtt`: MQTT 5 source and sink (turns `consumer` on) |
//! | `sqs` | no | `sqs`: Amazon SQS source and sink (turns `consumer` on) |
//! | `tracing` | yes | spans from the Gate (warnings and errors are logged through `tracing` whatever the features: install a subscriber to see them) |
//! | `metrics` | yes | counters and histograms from the Gate |
//! | `cache` | no | `CachedStore`, an in-process cache of completed records in front of any store |
//!
//! A project that depends on sqlx 0.8 itself (its default features, or its SQLite driver) turns
//! the default `sqlite` feature off: `rusqlite` and sqlx link different SQLite versions, and
//! Cargo refuses two `links = "sqlite3"` libraries in one build.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use idemgate_core as core;
pub use idemgate_core::*;

mod open;
pub use open::{open, open_checked};

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

#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub use idemgate_dynamodb as dynamodb;

#[cfg(feature = "inspect")]
#[cfg_attr(docsrs, doc(cfg(feature = "inspect")))]
pub mod inspect;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use idemgate_http as http;

#[cfg(feature = "consumer")]
#[cfg_attr(docsrs, doc(cfg(feature = "consumer")))]
pub use idemgate_consumer as consumer;

#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub use idemgate_rabbitmq as rabbitmq;

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use idemgate_nats as nats;

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use idemgate_kafka as kafka;

#[cfg(feature = "mqtt")]
#[cfg_attr(docsrs, doc(cfg(feature = "mqtt")))]
pub use idemgate_mqtt as mqtt;

#[cfg(feature = "sqs")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqs")))]
pub use idemgate_sqs as sqs;

// the getting-started pages, whose programs compile as doc tests
#[cfg(all(doctest, feature = "http", feature = "sqlite"))]
#[doc = include_str!("../../../docs/getting-started/http.md")]
struct GettingStartedHttp;

#[cfg(all(doctest, feature = "redis"))]
#[doc = include_str!("../../../docs/getting-started/gate.md")]
struct GettingStartedGate;

#[cfg(all(doctest, feature = "postgres", feature = "rabbitmq"))]
#[doc = include_str!("../../../docs/getting-started/consumer.md")]
struct GettingStartedConsumer;

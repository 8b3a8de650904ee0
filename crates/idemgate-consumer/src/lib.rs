//! Idempotent consumers on top of at-least-once brokers.
//!
//! A broker adapter is a [`Source`] of [`Delivery`] values and, for producers, a [`Sink`] that
//! stamps an event id. The [`Consumer`] runtime receives, extracts the key, claims it in a
//! [`Store`](idemgate_core::Store) (Gate mode) or opens an [`Inbox`] transaction (Inbox mode),
//! runs the handler, completes (or commits), and only then acks. A duplicate of a completed key
//! is acked without running the handler; an in-progress duplicate is held until it completes; a
//! fingerprint mismatch or a poison message is dead-lettered with its reason; a failing handler
//! is retried through the broker and dead-lettered after a configurable number of attempts.
//!
//! ```
//! use idemgate_consumer::{Consumer, Message, memory::MemoryBroker};
//! use idemgate_core::MemoryStore;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let broker = MemoryBroker::new();
//! // the same event delivered twice: at-least-once delivery
//! for _ in 0..2 {
//!     broker.send(Message::new("signups", "user-7").with_event_id("evt-1"));
//! }
//! broker.close();
//! let stats = Consumer::gate("emails", MemoryStore::new())
//!     .with_concurrency(8)
//!     .run(broker.source(), |msg: Message| async move {
//!         // send the welcome email; the duplicate never gets here
//!         Ok::<_, std::io::Error>(())
//!     }, std::future::pending::<()>())
//!     .await?;
//! assert_eq!((stats.handled, stats.duplicates), (1, 1));
//! # Ok::<(), idemgate_consumer::Error>(())
//! # }).unwrap();
//! ```
//!
//! **Inbox mode** records the key in the transaction the handler writes its effect in (any
//! [`Inbox`]: `PgInbox`, `MySqlInbox`, `SqliteInbox`), so the two commit together. The handler
//! takes the transaction and the message: an `async fn`, an async closure that captures
//! nothing, or a type implementing [`InboxHandler`] (one with state).
//!
//! ```
//! use idemgate_consumer::{Consumer, Inbox, Message, memory::MemoryBroker};
//! use idemgate_sqlite::{SqliteInbox, SqliteTx};
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let inbox = SqliteInbox::open(dir.path().join("app.db"))?;
//! inbox.migrate().await?;
//! # let tx = inbox.begin().await?;
//! # tx.execute_batch("CREATE TABLE credits (amount INTEGER NOT NULL)").unwrap();
//! # inbox.commit(tx).await?;
//! let broker = MemoryBroker::new();
//! for _ in 0..2 {
//!     broker.send(Message::new("credits", "10").with_event_id("evt-1"));
//! }
//! broker.close();
//! let stats = Consumer::inbox("credits", inbox)
//!     .run(
//!         broker.source(),
//!         async |tx: &mut SqliteTx, msg: &Message| {
//!             let amount: i64 = std::str::from_utf8(&msg.payload)?.parse()?;
//!             tx.execute("INSERT INTO credits (amount) VALUES (?1)", [amount])?;
//!             Ok(())
//!         },
//!         std::future::pending::<()>(),
//!     )
//!     .await?;
//! assert_eq!((stats.handled, stats.duplicates), (1, 1));
//! # Ok::<(), idemgate_consumer::Error>(())
//! # }).unwrap();
//! ```
//!
//! A handler that publishes enqueues on its transaction through an [`Outbox`]; a [`Relay`]
//! publishes what committed, so its events leave exactly when its effect commits.
//!
//! [`run`](Consumer::run) stops when its `shutdown` future resolves: [`shutdown::signal`]
//! (Ctrl-C or SIGTERM), [`StatsHandle::until`] (a condition on the counts) or
//! [`StatsHandle::idle`] (a drained queue).

mod broker;
mod consumer;
pub mod memory;
mod message;
mod relay;
pub mod shutdown;
mod window;

pub use broker::{Delivery, Sink, Source, dead_lettered};
pub use consumer::{Consumer, FingerprintFn, GateMode, InboxMode, KeyFn, Stats, StatsHandle};
pub use idemgate_core::{BoxError, Inbox, InboxFn, InboxHandler, Outbox, Position, Warning};
pub use message::{
    DEAD_LETTER_REASON, DEAD_LETTER_RETRY, EVENT_ID, Message, ORDERING_KEY, Outgoing, Permanent,
};
pub use relay::{Relay, RelayStats};
pub use window::{Horizon, WindowCheck, check_window};

/// What stops a consumer or a producer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker failed (a lost connection, a refused publish, a missing confirm).
    #[error("{broker} failed: {message}")]
    Broker {
        /// Which broker (`"rabbitmq"`, `"nats"`, ...).
        broker: &'static str,
        /// What was being done.
        message: String,
        /// The underlying failure (not repeated in the message: see
        /// [`source`](std::error::Error::source)).
        #[source]
        source: Option<BoxError>,
    },
    /// The broker refused a message for good (too large, an unknown destination): retrying it
    /// cannot succeed, so a relay dead-letters it.
    #[error("{broker} refused the message: {message}")]
    Refused {
        /// Which broker.
        broker: &'static str,
        /// Why.
        message: String,
    },
    /// The dedup store or the inbox failed.
    #[error(transparent)]
    Store(#[from] idemgate_core::Error),
    /// The store keeps records for less time than the broker may redeliver (strict mode).
    #[error("{0}")]
    Window(WindowCheck),
    /// A configuration value is wrong.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// A broker failure with its source.
    pub fn broker(
        broker: &'static str,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Broker {
            broker,
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

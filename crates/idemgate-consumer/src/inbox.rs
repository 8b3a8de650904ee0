//! Inbox mode: the processed-event row in the same transaction as the handler's effect.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use idemgate_core::{Key, Result};

use crate::{BoxError, Message, Position};

/// A transactional inbox the consumer opens transactions on: [`first_time`](Inbox::first_time)
/// inserts the key inside the transaction, so the row and the handler's effect commit together or
/// not at all. Two transactions with the same key: the second waits for the first and then sees
/// `false`.
pub trait Inbox: Send + Sync + 'static {
    /// The open transaction the handler writes its effect in.
    type Tx: Send + 'static;

    /// Opens a transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx>> + Send;

    /// Records `key` in `tx`; `false` when it was already recorded (a duplicate).
    fn first_time(&self, tx: &mut Self::Tx, key: &Key)
    -> impl Future<Output = Result<bool>> + Send;

    /// [`first_time`](Inbox::first_time) for several keys in one call (one statement where the
    /// database allows): one answer per key, in order; a key repeated in `keys` is `true` at most
    /// once. The default asks key by key.
    fn first_time_many(
        &self,
        tx: &mut Self::Tx,
        keys: &[Key],
    ) -> impl Future<Output = Result<Vec<bool>>> + Send {
        async move {
            let mut answers = Vec::with_capacity(keys.len());
            for key in keys {
                answers.push(self.first_time(tx, key).await?);
            }
            Ok(answers)
        }
    }

    /// Commits `tx`. Dropping a transaction rolls it back.
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = Result<()>> + Send;

    /// How long a processed key is remembered (for the window check).
    fn retention(&self) -> std::time::Duration;

    /// Moves a partitioned log's stored position from `position.expected` to `position.offset
    /// + 1` in `tx` (compare-and-set), for every message that carries a [`Position`]: the
    /// effect and the position commit together. A stale `expected` is
    /// [`Error::Fenced`](idemgate_core::Error::Fenced). The default keeps no positions.
    fn advance(
        &self,
        tx: &mut Self::Tx,
        position: &Position,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (tx, position);
        async { Ok(()) }
    }

    /// The stored next offset of every partition of `topic` for `group`, to seek to when a
    /// partition is assigned. The default keeps no positions.
    fn load_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> impl Future<Output = Result<BTreeMap<i32, i64>>> + Send {
        let _ = (group, topic);
        async { Ok(BTreeMap::new()) }
    }
}

/// A boxed handler future borrowing the transaction and the message.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>>;

/// An Inbox-mode handler: writes its effect in the consumer's transaction.
///
/// Any `Fn(&mut Tx, &Message) -> HandlerFuture` is one; `<dyn InboxHandler<Tx>>::from_fn`
/// helps the compiler see a closure as one.
pub trait InboxHandler<Tx>: Send + Sync + 'static {
    /// Applies `msg` inside `tx`.
    fn handle<'a>(&'a self, tx: &'a mut Tx, msg: &'a Message) -> HandlerFuture<'a>;
}

impl<Tx, F> InboxHandler<Tx> for F
where
    F: for<'a> Fn(&'a mut Tx, &'a Message) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    fn handle<'a>(&'a self, tx: &'a mut Tx, msg: &'a Message) -> HandlerFuture<'a> {
        self(tx, msg)
    }
}

impl<Tx> dyn InboxHandler<Tx> {
    /// Pins down a closure's signature as an Inbox handler:
    /// `<dyn InboxHandler<_>>::from_fn(|tx, msg| Box::pin(async move { … }))`.
    pub fn from_fn<F>(f: F) -> F
    where
        F: for<'a> Fn(&'a mut Tx, &'a Message) -> HandlerFuture<'a> + Send + Sync + 'static,
    {
        f
    }
}

/// A SQL inbox on a `sqlx` pool: the same shape for every database (each behind its feature).
macro_rules! sql_inbox_pool {
    ($feature:literal, $name:ident, $inbox:ident, $offsets:ident, $pool:ident, $db:ident, $krate:ident, $doc:literal) => {
        #[cfg(feature = $feature)]
        #[doc = $doc]
        #[derive(Debug, Clone)]
        pub struct $name {
            inbox: $krate::$inbox,
            offsets: $krate::$offsets,
            pool: sqlx::$pool,
        }

        #[cfg(feature = $feature)]
        impl $name {
            /// An inbox on `pool`, keeping partitioned-log positions (Kafka) in the default
            /// offsets table. Call [`migrate`](Self::migrate) once first.
            pub fn new(inbox: $krate::$inbox, pool: sqlx::$pool) -> Self {
                $name {
                    inbox,
                    offsets: $krate::$offsets::new(),
                    pool,
                }
            }

            /// Keeps positions in another offsets table.
            pub fn with_offsets(mut self, offsets: $krate::$offsets) -> Self {
                self.offsets = offsets;
                self
            }

            /// Creates the inbox and offsets tables if missing.
            pub async fn migrate(&self) -> Result<()> {
                self.inbox.migrate(&self.pool).await?;
                self.offsets.migrate(&self.pool).await
            }

            /// The pool.
            pub fn pool(&self) -> &sqlx::$pool {
                &self.pool
            }
        }

        #[cfg(feature = $feature)]
        impl Inbox for $name {
            type Tx = sqlx::Transaction<'static, sqlx::$db>;

            async fn begin(&self) -> Result<Self::Tx> {
                self.pool.begin().await.map_err($krate::classify_error)
            }

            async fn first_time(&self, tx: &mut Self::Tx, key: &Key) -> Result<bool> {
                self.inbox.first_time(tx, key).await
            }

            async fn first_time_many(&self, tx: &mut Self::Tx, keys: &[Key]) -> Result<Vec<bool>> {
                self.inbox.first_time_many(tx, keys).await
            }

            async fn commit(&self, tx: Self::Tx) -> Result<()> {
                tx.commit().await.map_err($krate::classify_error)
            }

            fn retention(&self) -> std::time::Duration {
                self.inbox.retention()
            }

            async fn advance(&self, tx: &mut Self::Tx, p: &Position) -> Result<()> {
                let next = p.offset + 1;
                self.offsets
                    .advance(tx, &p.group, &p.topic, p.partition, p.expected, next)
                    .await
            }

            async fn load_positions(&self, group: &str, topic: &str) -> Result<BTreeMap<i32, i64>> {
                let mut conn = self.pool.acquire().await.map_err($krate::classify_error)?;
                self.offsets.load_positions(&mut conn, group, topic).await
            }
        }
    };
}

sql_inbox_pool!(
    "postgres",
    PgInboxPool,
    PgInbox,
    PgOffsets,
    PgPool,
    Postgres,
    idemgate_postgres,
    "A `PgInbox` on a pool: the consumer's Inbox mode on PostgreSQL. The handler's `tx` is a \
     `sqlx::Transaction<'static, Postgres>`."
);

sql_inbox_pool!(
    "mysql",
    MySqlInboxPool,
    MySqlInbox,
    MySqlOffsets,
    MySqlPool,
    MySql,
    idemgate_mysql,
    "A `MySqlInbox` on a pool: the consumer's Inbox mode on MySQL and MariaDB. The handler's `tx` \
     is a `sqlx::Transaction<'static, MySql>`."
);

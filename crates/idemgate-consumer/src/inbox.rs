//! Inbox mode: the processed-event row in the same transaction as the handler's effect.

use std::future::Future;
use std::pin::Pin;

use idemgate_core::{Key, Result};

use crate::{BoxError, Message};

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

    /// Commits `tx`. Dropping a transaction rolls it back.
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = Result<()>> + Send;

    /// How long a processed key is remembered (for the window check).
    fn retention(&self) -> std::time::Duration;
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
    ($feature:literal, $name:ident, $inbox:ident, $pool:ident, $db:ident, $krate:ident, $doc:literal) => {
        #[cfg(feature = $feature)]
        #[doc = $doc]
        #[derive(Debug, Clone)]
        pub struct $name {
            inbox: $krate::$inbox,
            pool: sqlx::$pool,
        }

        #[cfg(feature = $feature)]
        impl $name {
            /// An inbox on `pool`. Call the inbox's `migrate` once first.
            pub fn new(inbox: $krate::$inbox, pool: sqlx::$pool) -> Self {
                $name { inbox, pool }
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

            async fn commit(&self, tx: Self::Tx) -> Result<()> {
                tx.commit().await.map_err($krate::classify_error)
            }

            fn retention(&self) -> std::time::Duration {
                self.inbox.retention()
            }
        }
    };
}

sql_inbox_pool!(
    "postgres",
    PgInboxPool,
    PgInbox,
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
    MySqlPool,
    MySql,
    idemgate_mysql,
    "A `MySqlInbox` on a pool: the consumer's Inbox mode on MySQL and MariaDB. The handler's `tx` \
     is a `sqlx::Transaction<'static, MySql>`."
);

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

#[cfg(feature = "postgres")]
mod pg {
    use idemgate_core::{Key, Result};
    use idemgate_postgres::{PgInbox, classify_error};
    use sqlx::{PgPool, Postgres, Transaction};

    /// A [`PgInbox`](idemgate_postgres::PgInbox) on a pool: the consumer's Inbox mode on
    /// PostgreSQL. The handler's `tx` is a `sqlx::Transaction<'static, Postgres>`.
    #[derive(Debug, Clone)]
    pub struct PgInboxPool {
        inbox: PgInbox,
        pool: PgPool,
    }

    impl PgInboxPool {
        /// An inbox on `pool`. Call [`PgInbox::migrate`] once first.
        pub fn new(inbox: PgInbox, pool: PgPool) -> Self {
            PgInboxPool { inbox, pool }
        }
    }

    impl super::Inbox for PgInboxPool {
        type Tx = Transaction<'static, Postgres>;

        async fn begin(&self) -> Result<Self::Tx> {
            self.pool.begin().await.map_err(classify_error)
        }

        async fn first_time(&self, tx: &mut Self::Tx, key: &Key) -> Result<bool> {
            self.inbox.first_time(tx, key).await
        }

        async fn commit(&self, tx: Self::Tx) -> Result<()> {
            tx.commit().await.map_err(classify_error)
        }

        fn retention(&self) -> std::time::Duration {
            self.inbox.retention()
        }
    }
}
#[cfg(feature = "postgres")]
pub use pg::PgInboxPool;

#[cfg(feature = "mysql")]
mod my {
    use idemgate_core::{Key, Result};
    use idemgate_mysql::{MySqlInbox, classify_error};
    use sqlx::{MySql, MySqlPool, Transaction};

    /// A [`MySqlInbox`](idemgate_mysql::MySqlInbox) on a pool: the consumer's Inbox mode on
    /// MySQL and MariaDB. The handler's `tx` is a `sqlx::Transaction<'static, MySql>`.
    #[derive(Debug, Clone)]
    pub struct MySqlInboxPool {
        inbox: MySqlInbox,
        pool: MySqlPool,
    }

    impl MySqlInboxPool {
        /// An inbox on `pool`. Call [`MySqlInbox::migrate`] once first.
        pub fn new(inbox: MySqlInbox, pool: MySqlPool) -> Self {
            MySqlInboxPool { inbox, pool }
        }
    }

    impl super::Inbox for MySqlInboxPool {
        type Tx = Transaction<'static, MySql>;

        async fn begin(&self) -> Result<Self::Tx> {
            self.pool.begin().await.map_err(classify_error)
        }

        async fn first_time(&self, tx: &mut Self::Tx, key: &Key) -> Result<bool> {
            self.inbox.first_time(tx, key).await
        }

        async fn commit(&self, tx: Self::Tx) -> Result<()> {
            tx.commit().await.map_err(classify_error)
        }

        fn retention(&self) -> std::time::Duration {
            self.inbox.retention()
        }
    }
}
#[cfg(feature = "mysql")]
pub use my::MySqlInboxPool;

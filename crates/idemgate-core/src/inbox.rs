//! The transactional inbox contract: the processed-event row in the same transaction as the
//! handler's effect.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use crate::error::{BoxError, Result};
use crate::key::Key;

/// A transactional inbox: [`first_time`](Inbox::first_time) records a key inside a transaction
/// the inbox opened, so the row and the handler's effect commit together or not at all. Two
/// transactions with the same key: the second waits for the first and then sees `false`.
///
/// Each SQL backend implements it on its own type (`PgInbox`, `MySqlInbox`, `SqliteInbox`); the
/// consumer runtime's Inbox mode runs on any implementation.
pub trait Inbox: Send + Sync + 'static {
    /// The open transaction the handler writes its effect in.
    type Tx: Send + 'static;

    /// Opens a transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx>> + Send;

    /// Records `key` in `tx`; `false` when it was already recorded (a duplicate).
    fn first_time(&self, tx: &mut Self::Tx, key: &Key)
    -> impl Future<Output = Result<bool>> + Send;

    /// [`first_time`](Inbox::first_time) for several keys in one call: one answer per key, in
    /// order; a key repeated in `keys` is `true` at most once. The default asks key by key; a
    /// backend that can answer in one statement overrides it, which is why it is part of the
    /// contract rather than of an extension trait.
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

    /// Marks savepoint `n` in `tx`, so that [`rollback_to`](Inbox::rollback_to) can undo what
    /// follows it. In a batch, each new message's effect runs under a savepoint of its own, so
    /// a failing handler costs only its own message. `false` when the inbox keeps no savepoints
    /// (the default): a failing handler then rolls its whole batch back.
    fn savepoint(&self, tx: &mut Self::Tx, n: u32) -> impl Future<Output = Result<bool>> + Send {
        let _ = (tx, n);
        async { Ok(false) }
    }

    /// Undoes what `tx` did since savepoint `n`, which stays set. An error means the
    /// transaction itself failed (a lost connection; a MySQL deadlock, which rolls the whole
    /// transaction back): nothing of it can commit.
    fn rollback_to(&self, tx: &mut Self::Tx, n: u32) -> impl Future<Output = Result<()>> + Send {
        let _ = (tx, n);
        async {
            Err(crate::Error::Config {
                message: "this inbox keeps no savepoints".into(),
            })
        }
    }

    /// Un-records `key`, recorded in `tx` by [`first_time`](Inbox::first_time) or
    /// [`first_time_many`](Inbox::first_time_many): the message is new again once `tx`
    /// commits. For a message of a batch whose handler failed, or that waits behind one.
    fn forget(&self, tx: &mut Self::Tx, key: &Key) -> impl Future<Output = Result<()>> + Send {
        let _ = (tx, key);
        async {
            Err(crate::Error::Config {
                message: "this inbox cannot un-record a key".into(),
            })
        }
    }

    /// Commits `tx`. Dropping a transaction rolls it back.
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = Result<()>> + Send;

    /// How long a processed key is remembered (for the window check).
    fn retention(&self) -> Duration;

    /// Deletes at most `limit` keys past their retention; returns how many.
    fn purge_expired(&self, limit: usize) -> impl Future<Output = Result<u64>> + Send;

    /// Moves a partitioned log's stored position from `position.expected` to `position.offset
    /// + 1` in `tx` (compare-and-set), for every message that carries a [`Position`]: the
    /// effect and the position commit together. A stale `expected` is
    /// [`Error::Fenced`](crate::Error::Fenced). The default keeps no positions.
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

/// A message's place in a partitioned log, and the position its commit moves from.
///
/// An inbox that keeps positions ([`Inbox::advance`]) moves the stored next offset of
/// `(group, topic, partition)` from `expected` to `offset + 1` by compare-and-set, in the
/// handler's transaction: the effect and the position commit together, and a consumer whose
/// view of the partition is stale is fenced off.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Position {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The message's offset.
    pub offset: i64,
    /// The stored next offset this consumer last saw (`None`: nothing stored yet).
    pub expected: Option<i64>,
}

impl Position {
    /// A position.
    pub fn new(
        group: impl Into<String>,
        topic: impl Into<String>,
        partition: i32,
        offset: i64,
        expected: Option<i64>,
    ) -> Self {
        Position {
            group: group.into(),
            topic: topic.into(),
            partition,
            offset,
            expected,
        }
    }
}

/// An Inbox-mode handler: writes the effect of a message `M` in the inbox's transaction `Tx`
/// (`PgTx`, `MySqlTx`, `SqliteTx`).
///
/// Three shapes are handlers:
/// - an async closure with its argument types written out and nothing captured:
///   `async |tx: &mut PgTx, msg: &Message| { …; Ok(()) }`;
/// - an `async fn reserve(tx: &mut PgTx, msg: &Message) -> Result<(), BoxError>`, passed by name;
/// - a type of yours that holds state (table names, a counter), implementing this trait with an
///   `async fn handle`.
///
/// An async closure that captures state is not one: Rust cannot yet require the futures of such
/// a closure to be `Send`, which the consumer's worker tasks need. Put the state in a type.
///
/// ```
/// use idemgate_core::{BoxError, InboxHandler};
///
/// # struct Tx(Vec<String>);
/// # struct Message { payload: String }
/// // a handler with state
/// struct Record {
///     table: String,
/// }
///
/// impl InboxHandler<Tx, Message> for Record {
///     async fn handle(&self, tx: &mut Tx, msg: &Message) -> Result<(), BoxError> {
///         tx.0.push(format!("INSERT INTO {} VALUES ('{}')", self.table, msg.payload));
///         Ok(())
///     }
/// }
///
/// // a closure
/// fn is_handler(_: impl InboxHandler<Tx, Message>) {}
/// is_handler(async |tx: &mut Tx, msg: &Message| {
///     let n: u32 = msg.payload.parse()?;
///     tx.0.push(format!("UPDATE balance SET total = total + {n}"));
///     Ok(())
/// });
/// is_handler(Record { table: "effects".into() });
/// ```
pub trait InboxHandler<Tx, M>: Send + Sync + 'static {
    /// Applies `msg` inside `tx`. An error rolls the transaction back; the message is tried
    /// again, then dead-lettered.
    fn handle<'a>(
        &'a self,
        tx: &'a mut Tx,
        msg: &'a M,
    ) -> impl Future<Output = Result<(), BoxError>> + Send + 'a;
}

/// A function from a transaction and a message to a `Send` future: what lets a closure or an
/// `async fn` be an [`InboxHandler`]. Implemented for every such function; not for implementing.
pub trait InboxFn<'a, Tx: 'a, M: 'a>: Fn(&'a mut Tx, &'a M) -> Self::Fut {
    /// The handler's future.
    type Fut: Future<Output = Result<(), BoxError>> + Send + 'a;
}

impl<'a, Tx: 'a, M: 'a, F, Fut> InboxFn<'a, Tx, M> for F
where
    F: Fn(&'a mut Tx, &'a M) -> Fut,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'a,
{
    type Fut = Fut;
}

impl<Tx: 'static, M: 'static, F> InboxHandler<Tx, M> for F
where
    F: for<'a> InboxFn<'a, Tx, M> + Send + Sync + 'static,
{
    fn handle<'a>(
        &'a self,
        tx: &'a mut Tx,
        msg: &'a M,
    ) -> impl Future<Output = Result<(), BoxError>> + Send + 'a {
        self(tx, msg)
    }
}

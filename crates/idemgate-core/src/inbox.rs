//! The transactional inbox contract: the processed-event row in the same transaction as the
//! handler's effect.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
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

/// A boxed handler future borrowing the transaction and the message.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>>;

/// An Inbox-mode handler: writes the effect of a message `M` in the inbox's transaction `Tx`.
///
/// Any `Fn(&mut Tx, &M) -> HandlerFuture` is one; `<dyn InboxHandler<Tx, M>>::from_fn` helps
/// the compiler see a closure as one.
pub trait InboxHandler<Tx, M>: Send + Sync + 'static {
    /// Applies `msg` inside `tx`.
    fn handle<'a>(&'a self, tx: &'a mut Tx, msg: &'a M) -> HandlerFuture<'a>;
}

impl<Tx, M, F> InboxHandler<Tx, M> for F
where
    F: for<'a> Fn(&'a mut Tx, &'a M) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    fn handle<'a>(&'a self, tx: &'a mut Tx, msg: &'a M) -> HandlerFuture<'a> {
        self(tx, msg)
    }
}

impl<Tx, M> dyn InboxHandler<Tx, M> {
    /// Pins down a closure's signature as an Inbox handler:
    /// `<dyn InboxHandler<_, _>>::from_fn(|tx, msg| Box::pin(async move { … }))`.
    pub fn from_fn<F>(f: F) -> F
    where
        F: for<'a> Fn(&'a mut Tx, &'a M) -> HandlerFuture<'a> + Send + Sync + 'static,
    {
        f
    }
}

//! The transactional outbox: outgoing messages written in the business change's transaction,
//! and published by a relay after it commits.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::{EventId, Key, Result};

/// A message to publish: a payload with its event id stamped by the producer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outgoing {
    /// The queue, subject, topic or routing key to publish to.
    pub destination: String,
    /// The body.
    pub payload: Bytes,
    /// The event id: the same for every retry of this publish, so the broker (where it can) and
    /// every consumer recognise a re-publish as the same event.
    pub event_id: String,
    /// Extra headers.
    pub headers: Vec<(String, Bytes)>,
    /// Kafka's message key, SQS FIFO's message group, MQTT's topic suffix: what orders messages.
    pub ordering_key: Option<String>,
}

impl Outgoing {
    /// A message with a fresh UUIDv7 event id. Keep the value and re-publish *it* on retry.
    pub fn new(destination: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Outgoing::with_event_id(destination, payload, EventId::new())
    }

    /// A message with the given event id (a producer id and sequence, or a stored UUID).
    pub fn with_event_id(
        destination: impl Into<String>,
        payload: impl Into<Bytes>,
        id: EventId,
    ) -> Self {
        Outgoing {
            destination: destination.into(),
            payload: payload.into(),
            event_id: id.to_string(),
            headers: Vec::new(),
            ordering_key: None,
        }
    }

    /// A message whose event id is a business key's id (order id + SKU, user id + email type):
    /// two producers that publish the same business fact publish the same event.
    pub fn for_business_key(
        destination: impl Into<String>,
        payload: impl Into<Bytes>,
        key: &Key,
    ) -> Self {
        Outgoing {
            destination: destination.into(),
            payload: payload.into(),
            event_id: key.id().to_owned(),
            headers: Vec::new(),
            ordering_key: None,
        }
    }

    /// A message as a backend stored it, for outbox backends.
    pub fn from_stored(
        destination: String,
        payload: impl Into<Bytes>,
        event_id: String,
        headers: Vec<(String, Bytes)>,
        ordering_key: Option<String>,
    ) -> Self {
        Outgoing {
            destination,
            payload: payload.into(),
            event_id,
            headers,
            ordering_key,
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the ordering key.
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }
}

/// A pending outbox row a relay took: the message, and how many times it was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxRow {
    /// The row's position in the outbox: rows of one ordering key leave in this order.
    pub id: i64,
    /// The message, with the event id fixed when it was enqueued.
    pub message: Outgoing,
    /// How many times a relay has taken the row, this time included.
    pub attempts: u32,
}

impl OutboxRow {
    /// A row, for backends and tests.
    pub fn new(id: i64, message: Outgoing, attempts: u32) -> Self {
        OutboxRow {
            id,
            message,
            attempts,
        }
    }
}

/// A row the relay gave up on: the broker refused it for good, or it ran out of attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadRow {
    /// The row's position.
    pub id: i64,
    /// The message.
    pub message: Outgoing,
    /// How many times it was taken.
    pub attempts: u32,
    /// Why it was dead-lettered.
    pub reason: String,
}

impl DeadRow {
    /// A dead row, for backends and tests.
    pub fn new(id: i64, message: Outgoing, attempts: u32, reason: String) -> Self {
        DeadRow {
            id,
            message,
            attempts,
            reason,
        }
    }
}

/// How much waits in an outbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backlog {
    /// Rows not yet published (held and backing-off rows included).
    pub pending: u64,
    /// How long the oldest pending row has waited, by the database's clock.
    pub oldest_pending: Option<Duration>,
    /// Dead-lettered rows, kept until someone deals with them.
    pub dead: u64,
}

impl Backlog {
    /// A backlog, for backends and tests.
    pub fn new(pending: u64, oldest_pending: Option<Duration>, dead: u64) -> Self {
        Backlog {
            pending,
            oldest_pending,
            dead,
        }
    }
}

/// The transactional outbox contract.
///
/// [`enqueue`](Self::enqueue) writes a message in the caller's transaction (the same `Tx` as
/// the backend's [`Inbox`](crate::Inbox), so an Inbox-mode handler enqueues on the transaction
/// it is given): the message exists if and only if the business change committed. A relay then
/// [`take`](Self::take)s pending rows, publishes them and marks them [`sent`](Self::sent) after
/// the broker confirmed. Rules every backend obeys (`idemgate_testkit::outbox_conformance_tests!`):
///
/// 1. Only committed rows are taken; a rolled-back enqueue is never published.
/// 2. A taken row is leased to its owner: no other take returns it until the lease runs out,
///    so several relays never publish the same row in the steady state. A row whose lease ran
///    out (its relay died between the publish and the mark) is taken again with the same event
///    id, which consumers deduplicate.
/// 3. Order per ordering key: a row is taken only when no earlier pending row of its key is held
///    by another take or backing off after a failure; a take returns a key's rows in order.
/// 4. [`retry`](Self::retry), [`release`](Self::release) and
///    [`dead_letter`](Self::dead_letter) act only for the row's current owner.
/// 5. Sent rows are kept until [`purge_sent`](Self::purge_sent) removes them after a retention;
///    dead rows stay, with their reason, until someone deals with them.
pub trait Outbox: Send + Sync + 'static {
    /// The caller's transaction, as the backend's inbox opens it.
    type Tx: Send + 'static;

    /// Writes `msg` in `tx`. It is published after `tx` commits, and never if it rolls back.
    fn enqueue(&self, tx: &mut Self::Tx, msg: &Outgoing)
    -> impl Future<Output = Result<()>> + Send;

    /// Takes up to `limit` publishable rows for `owner`, leasing them for `lease`, in order.
    fn take(
        &self,
        owner: &str,
        limit: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<OutboxRow>>> + Send;

    /// Marks rows sent: the broker confirmed them. Rows already sent or dead are left alone.
    fn sent(&self, ids: &[i64]) -> impl Future<Output = Result<()>> + Send;

    /// A publish failed: the row is due again after `delay`, and holds its key's later rows
    /// until then. `false` if `owner` no longer holds it.
    fn retry(
        &self,
        owner: &str,
        id: i64,
        delay: Duration,
        error: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Gives rows `owner` took and did not publish back, due at once.
    fn release(&self, owner: &str, ids: &[i64]) -> impl Future<Output = Result<()>> + Send;

    /// Moves a row to the dead state with `reason`: it is never published again, and no longer
    /// holds its key's later rows. `false` if `owner` no longer holds it.
    fn dead_letter(
        &self,
        owner: &str,
        id: i64,
        reason: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes up to `limit` rows sent more than `retention` ago; how many it deleted.
    fn purge_sent(
        &self,
        retention: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// What waits: pending rows, the oldest one's age, dead rows.
    fn backlog(&self) -> impl Future<Output = Result<Backlog>> + Send;

    /// Up to `limit` dead rows, oldest first, with their reasons.
    fn dead_letters(&self, limit: usize) -> impl Future<Output = Result<Vec<DeadRow>>> + Send;

    /// Waits until a commit may have added rows (PostgreSQL's `LISTEN/NOTIFY`) or `timeout`
    /// passed; `true` if woken by a commit. The default sleeps out the timeout.
    fn wait(&self, timeout: Duration) -> impl Future<Output = bool> + Send {
        async move {
            tokio::time::sleep(timeout).await;
            false
        }
    }
}

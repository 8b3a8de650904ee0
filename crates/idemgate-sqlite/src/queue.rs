//! An at-least-once queue in a SQLite file, with SQS semantics.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemgate_core::backend::{duration_millis, to_millis};
use idemgate_core::{Clock, Result, SystemClock};
use rusqlite::{Connection, TransactionBehavior, params};

use crate::conn::{check_table, migrate};
use crate::error::sql;
use crate::store::{Synchronous, open_connection};

/// A received message. Acknowledge it with [`SqliteQueue::delete`] before the visibility
/// timeout, or it is delivered again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The message id (stable across redeliveries; not an event id).
    pub id: i64,
    /// The payload.
    pub body: Vec<u8>,
    /// How many times it has been received, this time included: above 1 it is a redelivery.
    pub receive_count: u32,
    /// The message group it was sent in ([`SqliteQueue::send_in_group`]).
    pub group: Option<String>,
    /// The producer's event id, if it was sent with one ([`SqliteQueue::send_event`]).
    pub event_id: Option<String>,
    /// The handle of this receive, for delete and visibility changes.
    pub receipt: Receipt,
}

/// The handle of one receive of one message. A handle from an earlier receive is stale once the
/// message has been received again: deleting with it does nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    id: i64,
    handle: i64,
}

/// Counts of a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages not yet deleted (visible or in flight).
    pub messages: u64,
    /// Messages received and hidden by their visibility timeout.
    pub in_flight: u64,
    /// Messages ever sent.
    pub sent: u64,
    /// Receives ever made (first deliveries and redeliveries).
    pub receives: u64,
}

/// An at-least-once queue in a SQLite file, safe across processes.
///
/// Like SQS: [`receive`](Self::receive) hides messages for a visibility timeout and increments
/// their receive count; [`delete`](Self::delete) acknowledges; a message not deleted in time
/// becomes visible again and is redelivered. Delivery order is by visibility time, then send
/// order; of a message group ([`send_in_group`](Self::send_in_group)) only the oldest message
/// is received, so a group is handed out in send order, one at a time. Each call is one
/// transaction under SQLite's write lock, so any number of processes
/// may send and receive on the same file.
///
/// ```
/// use std::time::Duration;
/// use idemgate_sqlite::SqliteQueue;
///
/// # let dir = tempfile::tempdir().unwrap();
/// let q = SqliteQueue::open(dir.path().join("q.db"), "orders")?;
/// q.send(b"order-1")?;
/// let got = q.receive(10, Duration::from_secs(30))?;
/// assert_eq!(got[0].body, b"order-1");
/// assert!(q.receive(10, Duration::from_secs(30))?.is_empty(), "hidden while in flight");
/// assert!(q.delete(&got[0].receipt)?);
/// # Ok::<(), idemgate_core::Error>(())
/// ```
#[derive(Debug)]
pub struct SqliteQueue {
    conn: Connection,
    queue: String,
    clock: Arc<dyn Clock>,
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SqliteQueue {
    /// Opens queue `name` (an identifier-like name) in the file at `path`, creating both if
    /// missing.
    pub fn open(path: impl AsRef<Path>, name: &str) -> Result<Self> {
        Self::open_with_clock(path, name, SystemClock)
    }

    /// As [`open`](Self::open), judging visibility by `clock`.
    pub fn open_with_clock(path: impl AsRef<Path>, name: &str, clock: impl Clock) -> Result<Self> {
        check_table(name)?;
        let conn = open_connection(path.as_ref(), Duration::from_secs(30), Synchronous::Normal)?;
        migrate(
            &conn,
            "idemgate_queue",
            &[
                "CREATE TABLE IF NOT EXISTS idemgate_queue (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    queue TEXT NOT NULL,
                    body BLOB NOT NULL,
                    sent_at INTEGER NOT NULL,
                    visible_at INTEGER NOT NULL,
                    receive_count INTEGER NOT NULL DEFAULT 0,
                    receipt INTEGER NOT NULL DEFAULT 0);
                 CREATE INDEX IF NOT EXISTS idemgate_queue_visible ON idemgate_queue (queue, visible_at, id);"
                    .to_owned(),
                // version 2: message groups
                "ALTER TABLE idemgate_queue ADD COLUMN group_key TEXT;
                 CREATE INDEX IF NOT EXISTS idemgate_queue_group ON idemgate_queue (queue, group_key, id);"
                    .to_owned(),
                // version 3: the producer's event id
                "ALTER TABLE idemgate_queue ADD COLUMN event_id TEXT".to_owned(),
            ],
            &[
                "id",
                "queue",
                "body",
                "sent_at",
                "visible_at",
                "receive_count",
                "receipt",
                "group_key",
                "event_id",
            ],
        )?;
        migrate(
            &conn,
            "idemgate_queue_stats",
            &["CREATE TABLE IF NOT EXISTS idemgate_queue_stats (
                queue TEXT PRIMARY KEY, sent INTEGER NOT NULL, receives INTEGER NOT NULL)"
                .to_owned()],
            &["queue", "sent", "receives"],
        )?;
        sql(conn.execute(
            "INSERT OR IGNORE INTO idemgate_queue_stats (queue, sent, receives) VALUES (?1, 0, 0)",
            [name],
        ))?;
        Ok(SqliteQueue {
            conn,
            queue: name.to_owned(),
            clock: Arc::new(clock),
        })
    }

    fn now(&self) -> u64 {
        to_millis(self.clock.now())
    }

    /// Sends one message; returns its id.
    pub fn send(&self, body: &[u8]) -> Result<i64> {
        self.send_delayed(body, Duration::ZERO)
    }

    /// Sends one message that becomes visible after `delay`.
    pub fn send_delayed(&self, body: &[u8], delay: Duration) -> Result<i64> {
        Ok(self.send_batch([(body, delay)])?[0])
    }

    /// Sends one message in the message group `group`: a group's messages are received one at
    /// a time, in send order (each after the one before it was deleted), as in an SQS FIFO
    /// queue's message group.
    pub fn send_in_group(&self, body: &[u8], group: &str) -> Result<i64> {
        Ok(self.send_all([(body, Duration::ZERO, Some(group), None)])?[0])
    }

    /// Sends one message with the producer's event id, in `group` if one is given: every
    /// receive of it carries that id ([`Message::event_id`]).
    pub fn send_event(&self, body: &[u8], event_id: &str, group: Option<&str>) -> Result<i64> {
        Ok(self.send_all([(body, Duration::ZERO, group, Some(event_id))])?[0])
    }

    /// Sends several messages in one transaction; returns their ids.
    pub fn send_batch<'a>(
        &self,
        bodies: impl IntoIterator<Item = (&'a [u8], Duration)>,
    ) -> Result<Vec<i64>> {
        self.send_all(bodies.into_iter().map(|(b, d)| (b, d, None, None)))
    }

    fn send_all<'a>(
        &self,
        bodies: impl IntoIterator<Item = (&'a [u8], Duration, Option<&'a str>, Option<&'a str>)>,
    ) -> Result<Vec<i64>> {
        let now = self.now();
        let tx = sql(rusqlite::Transaction::new_unchecked(
            &self.conn,
            TransactionBehavior::Immediate,
        ))?;
        let mut ids = Vec::new();
        {
            let mut stmt = sql(tx.prepare_cached(
                "INSERT INTO idemgate_queue (queue, body, sent_at, visible_at, group_key, event_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            ))?;
            for (body, delay, group, event_id) in bodies {
                let visible = now.saturating_add(duration_millis(delay));
                sql(stmt.execute(params![
                    self.queue,
                    body,
                    ms(now),
                    ms(visible),
                    group,
                    event_id
                ]))?;
                ids.push(tx.last_insert_rowid());
            }
        }
        sql(tx.execute(
            "UPDATE idemgate_queue_stats SET sent = sent + ?2 WHERE queue = ?1",
            params![self.queue, ids.len() as i64],
        ))?;
        sql(tx.commit())?;
        Ok(ids)
    }

    /// Receives up to `max` visible messages and hides them for `visibility`. Of a message
    /// group, only its oldest message is received, and only while it is visible.
    pub fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Message>> {
        let now = self.now();
        let handle: i64 = rand::random::<i64>() & i64::MAX;
        let tx = sql(rusqlite::Transaction::new_unchecked(
            &self.conn,
            TransactionBehavior::Immediate,
        ))?;
        let msgs = {
            let mut stmt = sql(tx.prepare_cached(
                "UPDATE idemgate_queue
                    SET visible_at = ?3, receive_count = receive_count + 1, receipt = ?4
                  WHERE id IN (SELECT id FROM idemgate_queue m
                                WHERE queue = ?1 AND visible_at <= ?2
                                  AND (group_key IS NULL OR NOT EXISTS (
                                       SELECT 1 FROM idemgate_queue e
                                        WHERE e.queue = m.queue AND e.group_key = m.group_key
                                          AND e.id < m.id))
                                ORDER BY visible_at, id LIMIT ?5)
                  RETURNING id, body, receive_count, group_key, event_id",
            ))?;
            let rows = sql(stmt.query_map(
                params![
                    self.queue,
                    ms(now),
                    ms(now.saturating_add(duration_millis(visibility))),
                    handle,
                    i64::try_from(max).unwrap_or(i64::MAX)
                ],
                |r| {
                    let id: i64 = r.get(0)?;
                    Ok(Message {
                        id,
                        body: r.get(1)?,
                        receive_count: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(u32::MAX),
                        group: r.get(3)?,
                        event_id: r.get(4)?,
                        receipt: Receipt { id, handle },
                    })
                },
            ))?;
            let mut msgs: Vec<Message> = sql(rows.collect())?;
            msgs.sort_by_key(|m| m.id);
            msgs
        };
        if !msgs.is_empty() {
            sql(tx.execute(
                "UPDATE idemgate_queue_stats SET receives = receives + ?2 WHERE queue = ?1",
                params![self.queue, msgs.len() as i64],
            ))?;
        }
        sql(tx.commit())?;
        Ok(msgs)
    }

    /// Acknowledges a message; `false` if the receipt is stale (the message was received again
    /// after its visibility timeout) or the message is already gone.
    pub fn delete(&self, receipt: &Receipt) -> Result<bool> {
        let n = sql(self.conn.execute(
            "DELETE FROM idemgate_queue WHERE id = ?1 AND receipt = ?2",
            params![receipt.id, receipt.handle],
        ))?;
        Ok(n == 1)
    }

    /// Makes a received message visible again after `delay` (zero: at once), like SQS
    /// `ChangeMessageVisibility`; `false` if the receipt is stale.
    pub fn change_visibility(&self, receipt: &Receipt, delay: Duration) -> Result<bool> {
        let visible = self.now().saturating_add(duration_millis(delay));
        let n = sql(self.conn.execute(
            "UPDATE idemgate_queue SET visible_at = ?3 WHERE id = ?1 AND receipt = ?2",
            params![receipt.id, receipt.handle, ms(visible)],
        ))?;
        Ok(n == 1)
    }

    /// Counts of this queue.
    pub fn stats(&self) -> Result<QueueStats> {
        let now = ms(self.now());
        sql(self.conn.query_row(
            "SELECT (SELECT count(*) FROM idemgate_queue WHERE queue = ?1),
                    (SELECT count(*) FROM idemgate_queue WHERE queue = ?1 AND visible_at > ?2 AND receive_count > 0),
                    sent, receives
               FROM idemgate_queue_stats WHERE queue = ?1",
            params![self.queue, now],
            |r| {
                let get = |i| r.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
                Ok(QueueStats {
                    messages: get(0)?,
                    in_flight: get(1)?,
                    sent: get(2)?,
                    receives: get(3)?,
                })
            },
        ))
    }
}

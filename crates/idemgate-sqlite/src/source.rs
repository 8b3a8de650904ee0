//! The embedded queue as a consumer [`Source`]: receive with a visibility timeout, delete on ack.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use idemgate_consumer::{Delivery, Error, Message, Outgoing, Result, Sink, Source};
use serde::{Deserialize, Serialize};

use crate::{Receipt, SqliteQueue};

/// Pulls an event id out of a message body, for queues whose producers put it there.
type EventIdFn = Arc<dyn Fn(&[u8]) -> Option<String> + Send + Sync>;

/// A [`SqliteQueue`] as a consumer [`Source`]: each receive hides a message for the visibility
/// timeout; [`ack`](Delivery::ack) deletes it, [`nack`](Delivery::nack) shows it again after the
/// delay, and [`in_progress`](Delivery::in_progress) extends its visibility. A message sent in a
/// group ([`SqliteQueue::send_in_group`]) carries the group as its ordering key, and the
/// receive count is the delivery count.
///
/// ```
/// use std::time::Duration;
/// use idemgate_consumer::{Delivery, Source};
/// use idemgate_sqlite::{QueueSource, SqliteQueue};
///
/// # let dir = tempfile::tempdir().unwrap();
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let queue = SqliteQueue::open(dir.path().join("queue.db"), "orders")?;
/// queue.send(b"order-1")?;
/// let mut source = QueueSource::new(queue, Duration::from_secs(30));
/// let delivery = source.recv().await.unwrap().unwrap();
/// assert_eq!(&delivery.message().payload[..], b"order-1");
/// delivery.ack().await.unwrap();
/// # Ok::<(), idemgate_core::Error>(())
/// # }).unwrap();
/// ```
pub struct QueueSource {
    queue: Arc<Mutex<SqliteQueue>>,
    dead: Option<Arc<Mutex<SqliteQueue>>>,
    visibility: Duration,
    batch: usize,
    poll: Duration,
    event_id: Option<EventIdFn>,
    ready: VecDeque<crate::Message>,
}

impl fmt::Debug for QueueSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueSource")
            .field("visibility", &self.visibility)
            .field("batch", &self.batch)
            .field("dead_letters", &self.dead.is_some())
            .finish_non_exhaustive()
    }
}

/// A dead letter as [`QueueSource`] writes it to its dead-letter queue (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The message's event id, if it had one.
    pub event_id: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// The message body (UTF-8, lossy).
    pub payload: String,
}

impl DeadLetter {
    /// Reads a dead letter back from a message body of the dead-letter queue.
    pub fn parse(body: &[u8]) -> idemgate_core::Result<Self> {
        serde_json::from_slice(body).map_err(|e| idemgate_core::Error::Corrupt {
            backend: "sqlite",
            reason: format!("not a dead letter: {e}"),
        })
    }
}

fn queue_error(what: &'static str) -> impl Fn(idemgate_core::Error) -> Error {
    move |e| Error::broker("embedded", what, e)
}

fn lock(queue: &Mutex<SqliteQueue>) -> MutexGuard<'_, SqliteQueue> {
    queue.lock().unwrap_or_else(|e| e.into_inner())
}

impl QueueSource {
    /// A source on `queue`, hiding each received message for `visibility`.
    pub fn new(queue: SqliteQueue, visibility: Duration) -> Self {
        QueueSource {
            queue: Arc::new(Mutex::new(queue)),
            dead: None,
            visibility,
            batch: 8,
            poll: Duration::from_millis(20),
            event_id: None,
            ready: VecDeque::new(),
        }
    }

    /// Dead letters go to `dead` as [`DeadLetter`] documents (without it, a dead letter is
    /// deleted after a warning).
    pub fn with_dead_letters(mut self, dead: SqliteQueue) -> Self {
        self.dead = Some(Arc::new(Mutex::new(dead)));
        self
    }

    /// Messages received per query (default 8).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How long to wait before asking again when the queue was empty (default 20 ms).
    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Reads the event id of each message sent without one out of its body.
    pub fn with_event_id(
        mut self,
        event_id: impl Fn(&[u8]) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.event_id = Some(Arc::new(event_id));
        self
    }
}

impl Source for QueueSource {
    type Delivery = QueueDelivery;

    async fn recv(&mut self) -> Result<Option<QueueDelivery>> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                let mut msg = Message::new("embedded", m.body);
                let id = m
                    .event_id
                    .or_else(|| self.event_id.as_ref().and_then(|f| f(&msg.payload)));
                if let Some(id) = id {
                    msg = msg.with_event_id(id);
                }
                msg.deliveries = Some(m.receive_count);
                msg.ordering_key = m.group;
                return Ok(Some(QueueDelivery {
                    queue: Arc::clone(&self.queue),
                    dead: self.dead.clone(),
                    receipt: m.receipt,
                    msg,
                    visibility: self.visibility,
                }));
            }
            let batch = lock(&self.queue)
                .receive(self.batch, self.visibility)
                .map_err(queue_error("receiving"))?;
            if batch.is_empty() {
                tokio::time::sleep(self.poll).await;
            }
            self.ready.extend(batch);
        }
    }
}

/// One receive of a message of a [`QueueSource`].
#[derive(Debug)]
pub struct QueueDelivery {
    queue: Arc<Mutex<SqliteQueue>>,
    dead: Option<Arc<Mutex<SqliteQueue>>>,
    receipt: Receipt,
    msg: Message,
    visibility: Duration,
}

impl Delivery for QueueDelivery {
    fn message(&self) -> &Message {
        &self.msg
    }

    async fn ack(self) -> Result<()> {
        lock(&self.queue)
            .delete(&self.receipt)
            .map_err(queue_error("deleting"))?;
        Ok(())
    }

    async fn nack(self, delay: Duration) -> Result<()> {
        lock(&self.queue)
            .change_visibility(&self.receipt, delay)
            .map_err(queue_error("changing visibility"))?;
        Ok(())
    }

    async fn dead_letter(self, reason: &str) -> Result<()> {
        match &self.dead {
            Some(dead) => {
                let letter = DeadLetter {
                    event_id: self.msg.event_id.clone(),
                    reason: reason.to_owned(),
                    payload: String::from_utf8_lossy(&self.msg.payload).into_owned(),
                };
                let body = serde_json::to_vec(&letter)
                    .map_err(|e| Error::broker("embedded", "dead-lettering", e))?;
                lock(dead)
                    .send(&body)
                    .map_err(queue_error("dead-lettering"))?;
            }
            None => tracing::warn!(
                event_id = self.msg.event_id.as_deref().unwrap_or(""),
                reason,
                "dead letter dropped: the queue source has no dead-letter queue"
            ),
        }
        idemgate_consumer::dead_lettered(self.ack()).await
    }

    async fn in_progress(&self) -> Result<()> {
        lock(&self.queue)
            .change_visibility(&self.receipt, self.visibility)
            .map_err(queue_error("extending visibility"))?;
        Ok(())
    }
}

/// A producer on the embedded queue: publishes each message to the queue named by its
/// destination, in the file the sink was opened on, with its event id, and with its ordering key
/// as its message group (so a [`QueueSource`] hands a key's messages out in order). Headers are
/// not kept. A relay (`idemgate_consumer::Relay`) publishes an outbox through it.
///
/// ```
/// use std::time::Duration;
/// use idemgate_consumer::{Outgoing, Sink, Source, Delivery};
/// use idemgate_sqlite::{QueueSink, QueueSource, SqliteQueue};
///
/// # let dir = tempfile::tempdir().unwrap();
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let path = dir.path().join("queue.db");
/// let sink = QueueSink::open(&path);
/// sink.publish(&Outgoing::new("invoices", "invoice 7").with_ordering_key("customer-1")).await?;
/// let mut source = QueueSource::new(SqliteQueue::open(&path, "invoices")?, Duration::from_secs(30));
/// let delivery = source.recv().await?.unwrap();
/// assert!(delivery.message().event_id.is_some());
/// # Ok::<(), idemgate_consumer::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct QueueSink {
    path: std::path::PathBuf,
    queues: Mutex<std::collections::HashMap<String, SqliteQueue>>,
}

impl QueueSink {
    /// A sink on the queue file at `path` (created if missing).
    pub fn open(path: impl AsRef<std::path::Path>) -> Self {
        QueueSink {
            path: path.as_ref().to_owned(),
            queues: Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl Sink for QueueSink {
    async fn publish(&self, msg: &Outgoing) -> Result<()> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let queue = match queues.entry(msg.destination.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // an invalid queue name is the message's fault: retrying cannot help
                let q = SqliteQueue::open(&self.path, &msg.destination).map_err(|e| match e {
                    idemgate_core::Error::Config { message } => Error::Refused {
                        broker: "embedded",
                        message,
                    },
                    e => Error::broker("embedded", "opening the queue", e),
                })?;
                e.insert(q)
            }
        };
        queue
            .send_event(&msg.payload, &msg.event_id, msg.ordering_key.as_deref())
            .map_err(queue_error("publishing"))?;
        Ok(())
    }
}

//! An in-process broker with at-least-once semantics, for tests (yours and ours) and examples.
//!
//! A delivery dropped without being settled is redelivered, as a broker redelivers the unacked
//! messages of a dead connection; `nack` redelivers after its delay; `dead_letter` moves the
//! message, with its reason, to [`MemoryBroker::dead_letters`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{Delivery, Message, Outgoing, Result, Sink, Source};

#[derive(Debug)]
struct Entry {
    msg: Message,
    not_before: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    queue: Mutex<VecDeque<Entry>>,
    dead: Mutex<Vec<(Message, String)>>,
    notify: Notify,
    in_flight: AtomicUsize,
    closed: AtomicBool,
}

impl Inner {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Entry>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, msg: Message, delay: Duration) {
        self.queue().push_back(Entry {
            msg,
            not_before: Instant::now() + delay,
        });
        self.notify.notify_waiters();
    }

    fn settled(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }
}

/// An in-process at-least-once broker. Cheap to clone; clones share the queue.
#[derive(Debug, Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enqueues a message.
    pub fn send(&self, msg: Message) {
        self.inner.push(msg, Duration::ZERO);
    }

    /// A consumer of the queue. Several sources share it, as competing consumers.
    pub fn source(&self) -> MemorySource {
        MemorySource {
            inner: Arc::clone(&self.inner),
        }
    }

    /// No more messages will be sent: sources end once the queue is empty and every delivery is
    /// settled.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.notify.notify_waiters();
    }

    /// The dead-lettered messages and their reasons.
    pub fn dead_letters(&self) -> Vec<(Message, String)> {
        self.inner
            .dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Messages waiting, delayed ones included.
    pub fn queued(&self) -> usize {
        self.inner.queue().len()
    }

    /// Deliveries handed out and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }
}

impl Sink for MemoryBroker {
    async fn publish(&self, out: &Outgoing) -> Result<()> {
        let mut msg = Message::new(out.destination.clone(), out.payload.clone())
            .with_event_id(out.event_id.clone());
        msg.headers.clone_from(&out.headers);
        msg.ordering_key.clone_from(&out.ordering_key);
        self.send(msg);
        Ok(())
    }
}

/// A consumer of a [`MemoryBroker`].
#[derive(Debug)]
pub struct MemorySource {
    inner: Arc<Inner>,
}

impl Source for MemorySource {
    type Delivery = MemoryDelivery;

    async fn recv(&mut self) -> Result<Option<MemoryDelivery>> {
        loop {
            let notified = self.inner.notify.notified();
            let wake = {
                let mut q = self.inner.queue();
                let now = Instant::now();
                if let Some(i) = q.iter().position(|e| e.not_before <= now) {
                    let mut msg = q.remove(i).map(|e| e.msg).unwrap_or_default();
                    self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
                    let n = msg.deliveries.unwrap_or(0) + 1;
                    msg.deliveries = Some(n);
                    msg.redelivered = n > 1;
                    return Ok(Some(MemoryDelivery {
                        msg,
                        inner: Some(Arc::clone(&self.inner)),
                    }));
                }
                if q.is_empty()
                    && self.inner.closed.load(Ordering::Acquire)
                    && self.inner.in_flight.load(Ordering::Acquire) == 0
                {
                    return Ok(None);
                }
                q.iter().map(|e| e.not_before).min()
            };
            match wake {
                Some(at) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// A delivery from a [`MemoryBroker`]; dropped unsettled, it is redelivered.
#[derive(Debug)]
pub struct MemoryDelivery {
    msg: Message,
    inner: Option<Arc<Inner>>,
}

impl MemoryDelivery {
    fn settle(&mut self, then: impl FnOnce(&Inner, Message)) {
        if let Some(inner) = self.inner.take() {
            then(&inner, std::mem::take(&mut self.msg));
            inner.settled();
        }
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        // the consumer died with it: the broker redelivers
        self.settle(|inner, msg| inner.push(msg, Duration::ZERO));
    }
}

impl Delivery for MemoryDelivery {
    fn message(&self) -> &Message {
        &self.msg
    }

    async fn ack(mut self) -> Result<()> {
        self.settle(|_, _| {});
        Ok(())
    }

    async fn nack(mut self, delay: Duration) -> Result<()> {
        self.settle(|inner, msg| inner.push(msg, delay));
        Ok(())
    }

    async fn dead_letter(mut self, reason: &str) -> Result<()> {
        self.settle(|inner, msg| {
            inner
                .dead
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((msg, reason.to_owned()));
        });
        Ok(())
    }
}

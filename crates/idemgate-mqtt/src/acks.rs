//! Acks in arrival order: the broker's PUBACK/SUBACK waiters and the in-order PUBACKs a
//! connection sends.

use super::*;

/// Waits for a PUBACK or SUBACK: `Ok(false)` for a publish the broker took but no subscriber
/// matched (reason `NoMatchingSubscribers`: the message is dropped).
pub(crate) type Waiter = oneshot::Sender<std::result::Result<bool, String>>;

/// Waiters for the broker's acks: publishes and subscribes are sent in request order, so the
/// event loop's `Outgoing` events name their packet ids in that order.
#[derive(Default)]
pub(crate) struct Acks {
    pub(crate) publishes: VecDeque<Waiter>,
    pub(crate) subscribes: VecDeque<Waiter>,
    pub(crate) by_pkid: HashMap<u16, Waiter>,
    pub(crate) subs_by_pkid: HashMap<u16, Waiter>,
}

pub(crate) struct Link {
    pub(crate) client: AsyncClient,
    pub(crate) acks: Mutex<Acks>,
    // publishes and subscribes are queued to the event loop in the order their waiters are
    pub(crate) order: tokio::sync::Mutex<()>,
    // PUBACKs in arrival order, unless the session allows any order
    pub(crate) in_order: Option<Mutex<Outbox>>,
    // wakes `disconnect` when the drain task is done
    pub(crate) drained: tokio::sync::Notify,
    // what this connection subscribed to: subscribed again when the broker lost the session
    pub(crate) filters: Mutex<Vec<String>>,
}

/// What a PUBACK needs of its PUBLISH: the QoS and the packet id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ack(pub(crate) QoS, pub(crate) u16);

impl Ack {
    pub(crate) fn of(p: &Publish) -> Self {
        Ack(p.qos, p.pkid)
    }

    /// A PUBLISH with nothing but what `AsyncClient::ack` reads.
    pub(crate) fn publish(self) -> Publish {
        Publish {
            qos: self.0,
            pkid: self.1,
            ..Publish::default()
        }
    }
}

/// PUBACKs in arrival order ([MQTT-4.6.0-2]): a settled message's ack waits here until every
/// message that arrived before it is settled and its ack has gone out.
///
/// [MQTT-4.6.0-2]: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901240
#[derive(Debug)]
pub(crate) struct InOrder<T> {
    /// The arrival number of the oldest message whose ack has not gone out.
    pub(crate) next: u64,
    /// Settled messages whose acks have not gone out.
    pub(crate) held: BTreeMap<u64, T>,
}

impl<T> InOrder<T> {
    pub(crate) fn new() -> Self {
        InOrder {
            next: 0,
            held: BTreeMap::new(),
        }
    }

    /// The message that arrived `arrival`th is settled. An arrival already acked or void is
    /// ignored.
    pub(crate) fn settled(&mut self, arrival: u64, ack: T) {
        if arrival >= self.next {
            self.held.insert(arrival, ack);
        }
    }

    /// The ack that may go out next, if its message and every earlier one are settled.
    pub(crate) fn ready(&self) -> Option<&T> {
        self.held
            .first_key_value()
            .filter(|(arrival, _)| **arrival == self.next)
            .map(|(_, ack)| ack)
    }

    /// Takes the ack that may go out next (it is going out).
    pub(crate) fn take(&mut self) -> Option<T> {
        self.ready()?;
        self.next += 1;
        self.held.pop_first().map(|(_, ack)| ack)
    }

    /// The connection dropped after `arrived` messages: the held acks, and those of every
    /// message still in flight, are void (the broker redelivers those messages).
    pub(crate) fn lost(&mut self, arrived: u64) {
        self.held.clear();
        self.next = self.next.max(arrived);
    }
}

/// The in-order PUBACKs of a connection. An ack that may go out is queued to the event loop at
/// once, under the lock, so acks enter its queue in arrival order; when that queue is full, one
/// task takes over and queues the ready acks in order, waiting for room (`draining`).
pub(crate) struct Outbox {
    pub(crate) order: InOrder<Ack>,
    pub(crate) draining: bool,
}

/// Locks `m`. A poisoned lock only means another thread panicked while holding it; every
/// update under these locks is a single step, so the state is consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Request};

    use super::{Ack, InOrder, Link, Outbox};

    /// A link whose client queues to a channel of `room` requests, read by the test.
    fn link(room: usize) -> (Arc<Link>, flume::Receiver<Request>) {
        let (tx, rx) = flume::bounded(room);
        let link = Link {
            client: AsyncClient::from_senders(tx),
            acks: Mutex::default(),
            order: tokio::sync::Mutex::new(()),
            in_order: Some(Mutex::new(Outbox {
                order: InOrder::new(),
                draining: false,
            })),
            drained: tokio::sync::Notify::new(),
            filters: Mutex::default(),
        };
        (Arc::new(link), rx)
    }

    /// Settles the message that arrived `arrival`th, whose packet id is `arrival + 1`.
    /// Settles `arrival` and takes every ack that may go out now, in order.
    fn release<T>(order: &mut InOrder<T>, arrival: u64, ack: T) -> Vec<T> {
        order.settled(arrival, ack);
        std::iter::from_fn(|| order.take()).collect()
    }

    fn settle(link: &Arc<Link>, arrival: u16) {
        let outbox = link.in_order.as_ref().unwrap();
        link.settled(outbox, arrival.into(), Ack(QoS::AtLeastOnce, arrival + 1));
    }

    fn pkid(r: Request) -> u16 {
        match r {
            Request::PubAck(ack) => ack.pkid,
            other => panic!("not a PUBACK: {other:?}"),
        }
    }

    #[tokio::test]
    async fn pubacks_that_overflow_the_event_loop_queue_wait_their_turn() {
        let (link, queue) = link(2);
        // 1..=9 settle first and wait for 0; then 0 releases all ten at once, into room for two
        for n in (1..10).rev() {
            settle(&link, n);
        }
        assert!(queue.is_empty());
        settle(&link, 0);
        // 10 and 11 settle while the backlog drains: they go behind it
        settle(&link, 10);
        settle(&link, 11);
        let mut seen = Vec::new();
        while seen.len() < 12 {
            let r = tokio::time::timeout(Duration::from_secs(5), queue.recv_async()).await;
            seen.push(pkid(r.expect("a PUBACK").unwrap()));
        }
        assert_eq!(seen, (1..=12).collect::<Vec<u16>>());
        // the backlog is empty and the drain done
        tokio::time::timeout(Duration::from_secs(5), link.flushed())
            .await
            .unwrap();
        settle(&link, 12);
        assert_eq!(pkid(queue.recv_async().await.unwrap()), 13);
    }

    #[tokio::test]
    async fn a_lost_connection_empties_the_backlog() {
        let (link, queue) = link(1);
        for n in (0..4).rev() {
            settle(&link, n);
        }
        link.lost(4);
        tokio::time::timeout(Duration::from_secs(5), link.flushed())
            .await
            .unwrap();
        // one went out before the loss; the ones behind it were void
        let sent: Vec<_> = queue.drain().map(pkid).collect();
        assert_eq!(sent, [1]);
        settle(&link, 4);
        assert_eq!(pkid(queue.recv_async().await.unwrap()), 5);
    }

    #[test]
    fn acks_go_out_in_arrival_order() {
        let mut order = InOrder::new();
        assert!(release(&mut order, 2, 'c').is_empty());
        assert!(release(&mut order, 1, 'b').is_empty());
        assert_eq!(release(&mut order, 0, 'a'), ['a', 'b', 'c']);
        assert_eq!(release(&mut order, 3, 'd'), ['d']);
        assert!(order.held.is_empty());
    }

    #[test]
    fn a_settled_message_waits_for_every_earlier_one() {
        let mut order = InOrder::new();
        for n in (1..100).rev() {
            assert!(
                release(&mut order, n, n).is_empty(),
                "{n} went out before 0"
            );
        }
        assert_eq!(release(&mut order, 0, 0), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_lost_connection_voids_the_held_acks_and_those_in_flight() {
        let mut order = InOrder::new();
        assert_eq!(release(&mut order, 0, 0), [0]);
        assert!(release(&mut order, 2, 2).is_empty());
        // the connection dropped after 4 arrivals: 1, 2 and 3 come again, under new numbers
        order.lost(4);
        assert!(order.held.is_empty());
        // a settlement from the old connection is ignored
        assert!(release(&mut order, 1, 1).is_empty());
        assert!(release(&mut order, 3, 3).is_empty());
        assert!(order.held.is_empty());
        assert_eq!(release(&mut order, 4, 4), [4]);
        // an ack settled twice goes out once
        assert!(release(&mut order, 4, 4).is_empty());
    }
}

//! MQTT 5 for idemgate consumers and producers, on [`rumqttc`] at QoS 1.
//!
//! - [`MqttSink`] publishes at QoS 1 with the event id as the `idemgate-event-id` user property,
//!   and waits for the broker's `PUBACK`.
//! - [`MqttSource`] receives at QoS 1 with manual acks: the `PUBACK` is sent only when the
//!   runtime acks, after the effect is recorded. With a persistent session
//!   ([`Session::persistent`]) the broker keeps the subscription and the unacknowledged messages
//!   while the consumer is away, and redelivers them (with the DUP flag, a hint only) when it
//!   connects again. MQTT has no negative ack: `nack` hands the message back to this source after
//!   the delay, and `dead_letter` publishes it, with the reason as a user property, to a
//!   dead-letter topic and then acks it. MQTT keeps nothing for a topic nobody subscribes to:
//!   a dead letter the broker answers `NoMatchingSubscribers` is an error, and the original
//!   comes back to the source after a second. Keep a persistent session (or a bridge)
//!   subscribed to the dead-letter topic.
//! - A reconnection that finds no session on the broker (a restart without persistence, an
//!   expired session, another client that took the client id with a clean start) subscribes
//!   again; what was published meanwhile is gone, and a warning says so.
//! - The source's horizon ([`Source::horizon`]): the session expiry interval, as long as the
//!   broker may redeliver.
//!
//! PUBACKs go out in the order the PUBLISHes arrived, as MQTT 5 requires of clients
//! ([MQTT-4.6.0-2]), although with more than one handler at a time messages are settled in
//! another order: a settled message's PUBACK waits until every message that arrived before it
//! on the connection is settled. A message being retried (MQTT has no negative ack) holds the
//! PUBACKs behind it, and with them the broker's in-flight window, until it is settled or
//! dead-lettered. Mosquitto, EMQX and VerneMQ match acks by packet id and accept them in any
//! order; [`Session::with_acks_in_any_order`] sends each as soon as its message is settled.
//!
//! [MQTT-4.6.0-2]: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901240
//!
//! A broker keeps a bounded queue per session: Mosquitto drops QoS 1 messages beyond
//! `max_queued_messages` (default 1000) plus the client's receive maximum while the consumer is
//! away or behind. That loss happens before any consumer sees the message; raise the limit for
//! consumers that may fall far behind.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use idemgate_consumer::{
    DEAD_LETTER_REASON, DEAD_LETTER_RETRY, Delivery, EVENT_ID, Error, Horizon, Message,
    ORDERING_KEY, Outgoing, Result, Sink, Source,
};
use rumqttc::Outgoing as Sent;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const BROKER: &str = "mqtt";

fn err<E: Into<idemgate_consumer::BoxError>>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::broker(BROKER, what, e)
}

/// How the broker keeps this client's session.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Session {
    /// Keep the subscriptions and unacknowledged messages across disconnects.
    pub persistent: bool,
    /// How long the broker keeps a persistent session after a disconnect (default 1 day).
    pub expiry: Duration,
    /// Unacknowledged QoS 1 messages the broker sends at once (default 64).
    pub receive_maximum: u16,
    /// PUBACKs in the order the PUBLISHes arrived, as MQTT 5 requires (default `true`).
    pub ordered_acks: bool,
}

impl Session {
    /// A session the broker forgets on disconnect (a producer's).
    pub fn clean() -> Self {
        Session {
            persistent: false,
            expiry: Duration::ZERO,
            receive_maximum: 64,
            ordered_acks: true,
        }
    }

    /// A session the broker keeps for `expiry` after a disconnect (a consumer's).
    pub fn persistent(expiry: Duration) -> Self {
        Session {
            persistent: true,
            expiry,
            receive_maximum: 64,
            ordered_acks: true,
        }
    }

    /// Sets the receive maximum.
    pub fn with_receive_maximum(mut self, n: u16) -> Self {
        self.receive_maximum = n.max(1);
        self
    }

    /// Sends each PUBACK as soon as its message is settled, not in arrival order: no message
    /// being retried holds the others' acks. MQTT 5 asks for arrival order ([MQTT-4.6.0-2]);
    /// use this only with a broker that matches acks by packet id (Mosquitto, EMQX, VerneMQ do).
    ///
    /// [MQTT-4.6.0-2]: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901240
    pub fn with_acks_in_any_order(mut self) -> Self {
        self.ordered_acks = false;
        self
    }
}

/// Waits for a PUBACK or SUBACK: `Ok(false)` for a publish the broker took but no subscriber
/// matched (reason `NoMatchingSubscribers`: the message is dropped).
type Waiter = oneshot::Sender<std::result::Result<bool, String>>;

/// Waiters for the broker's acks: publishes and subscribes are sent in request order, so the
/// event loop's `Outgoing` events name their packet ids in that order.
#[derive(Default)]
struct Acks {
    publishes: VecDeque<Waiter>,
    subscribes: VecDeque<Waiter>,
    by_pkid: HashMap<u16, Waiter>,
    subs_by_pkid: HashMap<u16, Waiter>,
}

struct Link {
    client: AsyncClient,
    acks: Mutex<Acks>,
    // publishes and subscribes are queued to the event loop in the order their waiters are
    order: tokio::sync::Mutex<()>,
    // PUBACKs in arrival order, unless the session allows any order
    in_order: Option<Mutex<Outbox>>,
    // wakes `disconnect` when the drain task is done
    drained: tokio::sync::Notify,
    // what this connection subscribed to: subscribed again when the broker lost the session
    filters: Mutex<Vec<String>>,
}

/// What a PUBACK needs of its PUBLISH: the QoS and the packet id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ack(QoS, u16);

impl Ack {
    fn of(p: &Publish) -> Self {
        Ack(p.qos, p.pkid)
    }

    /// A PUBLISH with nothing but what `AsyncClient::ack` reads.
    fn publish(self) -> Publish {
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
struct InOrder<T> {
    /// The arrival number of the oldest message whose ack has not gone out.
    next: u64,
    /// Settled messages whose acks have not gone out.
    held: BTreeMap<u64, T>,
}

impl<T> InOrder<T> {
    fn new() -> Self {
        InOrder {
            next: 0,
            held: BTreeMap::new(),
        }
    }

    /// The message that arrived `arrival`th is settled. An arrival already acked or void is
    /// ignored.
    fn settled(&mut self, arrival: u64, ack: T) {
        if arrival >= self.next {
            self.held.insert(arrival, ack);
        }
    }

    /// The ack that may go out next, if its message and every earlier one are settled.
    fn ready(&self) -> Option<&T> {
        self.held
            .first_key_value()
            .filter(|(arrival, _)| **arrival == self.next)
            .map(|(_, ack)| ack)
    }

    /// Takes the ack that may go out next (it is going out).
    fn take(&mut self) -> Option<T> {
        self.ready()?;
        self.next += 1;
        self.held.pop_first().map(|(_, ack)| ack)
    }

    /// The connection dropped after `arrived` messages: the held acks, and those of every
    /// message still in flight, are void (the broker redelivers those messages).
    fn lost(&mut self, arrived: u64) {
        self.held.clear();
        self.next = self.next.max(arrived);
    }
}

/// The in-order PUBACKs of a connection. An ack that may go out is queued to the event loop at
/// once, under the lock, so acks enter its queue in arrival order; when that queue is full, one
/// task takes over and queues the ready acks in order, waiting for room (`draining`).
struct Outbox {
    order: InOrder<Ack>,
    draining: bool,
}

/// Locks `m`. A poisoned lock only means another thread panicked while holding it; every
/// update under these locks is a single step, so the state is consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Link {
    fn acks(&self) -> MutexGuard<'_, Acks> {
        lock(&self.acks)
    }

    /// The message that arrived `arrival`th is settled: queues the PUBACKs that may go out now.
    fn settled(self: &Arc<Self>, outbox: &Mutex<Outbox>, arrival: u64, ack: Ack) {
        let mut out = lock(outbox);
        out.order.settled(arrival, ack);
        if out.draining {
            return;
        }
        while let Some(ack) = out.order.ready() {
            if self.client.try_ack(&ack.publish()).is_err() {
                // the event loop's queue is full (or gone): one task waits for room, in order
                out.draining = true;
                tokio::spawn(Arc::clone(self).drain());
                return;
            }
            out.order.take();
        }
    }

    /// Queues the ready PUBACKs in order, waiting for room, until none is ready.
    async fn drain(self: Arc<Self>) {
        let Some(outbox) = &self.in_order else {
            return;
        };
        // the next ready ack, or the end of the drain (under the same lock)
        let take = || {
            let mut out = lock(outbox);
            let next = out.order.take();
            out.draining = next.is_some();
            next
        };
        while let Some(next) = take() {
            if let Err(e) = self.client.ack(&next.publish()).await {
                // the event loop is gone for good (its connection was dropped): no ack can go
                // out any more, and the broker redelivers what was not acked
                tracing::debug!(error = %e, "could not queue a PUBACK");
                let mut out = lock(outbox);
                out.order.lost(u64::MAX);
                out.draining = false;
                break;
            }
        }
        self.drained.notify_waiters();
    }

    /// The connection dropped after `arrived` messages: the broker redelivers every message it
    /// has not had a PUBACK for, so the held and ready PUBACKs are void.
    fn lost(&self, arrived: u64) {
        if let Some(outbox) = &self.in_order {
            lock(outbox).order.lost(arrived);
        }
    }

    /// Waits until every PUBACK that may go out has been queued to the event loop.
    async fn flushed(&self) {
        let Some(outbox) = &self.in_order else {
            return;
        };
        loop {
            let drained = self.drained.notified();
            if !lock(outbox).draining {
                return;
            }
            drained.await;
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK; `Ok(false)` when no subscriber matched.
    async fn publish(&self, topic: &str, payload: Bytes, props: PublishProperties) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        {
            let _order = self.order.lock().await;
            self.acks().publishes.push_back(tx);
            if let Err(e) = self
                .client
                .publish_bytes_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
                .await
            {
                self.acks().publishes.pop_back();
                return Err(Error::broker(BROKER, "publishing", e));
            }
        }
        match rx.await {
            Ok(Ok(routed)) => Ok(routed),
            Ok(Err(e)) => Err(Error::broker(BROKER, format!("publishing to {topic}"), e)),
            Err(_) => Err(Error::broker(
                BROKER,
                "publishing",
                "the connection closed before the PUBACK",
            )),
        }
    }

    async fn subscribe(&self, filter: &str) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        {
            let _order = self.order.lock().await;
            self.acks().subscribes.push_back(tx);
            if let Err(e) = self.client.subscribe(filter, QoS::AtLeastOnce).await {
                self.acks().subscribes.pop_back();
                return Err(Error::broker(BROKER, "subscribing", e));
            }
        }
        rx.await
            .map_err(|_| "the connection closed before the SUBACK".to_owned())
            .and_then(|r| r)
            .map_err(|e| Error::broker(BROKER, format!("subscribing to {filter}"), e))?;
        lock(&self.filters).push(filter.to_owned());
        Ok(())
    }

    /// The broker reconnected us without our session (a restart without persistence, an
    /// expired session, a clean-start client id): nothing arrives until we subscribe again.
    fn subscribe_again(&self) {
        let filters = lock(&self.filters).clone();
        if filters.is_empty() {
            return;
        }
        tracing::warn!(
            ?filters,
            "the broker has no session for this client: subscribing again (what was sent while disconnected is gone)"
        );
        for f in filters {
            if let Err(e) = self.client.try_subscribe(f, QoS::AtLeastOnce) {
                tracing::warn!(error = %e, "subscribing again failed");
            }
        }
    }

    /// Fails every waiting publish and subscribe (the connection dropped).
    fn fail_all(&self, why: &str) {
        let mut acks = self.acks();
        let acks = &mut *acks;
        let waiting = acks.publishes.drain(..).chain(acks.subscribes.drain(..));
        let sent = acks.by_pkid.drain().chain(acks.subs_by_pkid.drain());
        for w in waiting.chain(sent.map(|(_, w)| w)) {
            let _ = w.send(Err(why.to_owned()));
        }
    }
}

/// A connection to an MQTT 5 broker, driven by its own task: the [`MqttSink`] and
/// [`MqttSource`] made from it share it.
pub struct Mqtt {
    link: Arc<Link>,
    incoming: Mutex<Option<mpsc::UnboundedReceiver<(Publish, u64)>>>,
    driver: JoinHandle<()>,
    session: Session,
}

impl fmt::Debug for Mqtt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mqtt")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Mqtt {
    /// Connects to `host:port` as `client_id` (a persistent session is found again by its
    /// client id) and waits for the broker's `CONNACK`.
    pub async fn connect(host: &str, port: u16, client_id: &str, session: Session) -> Result<Self> {
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_keep_alive(Duration::from_secs(10))
            .set_clean_start(!session.persistent)
            .set_manual_acks(true)
            .set_receive_maximum(Some(session.receive_maximum));
        if session.persistent {
            let secs = u32::try_from(session.expiry.as_secs()).unwrap_or(u32::MAX);
            opts.set_session_expiry_interval(Some(secs));
        }
        let (client, mut events) = AsyncClient::new(opts, 256);
        // the first event is the CONNACK, or the reason there is none
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(Error::broker(
                        BROKER,
                        format!("connecting to {host}:{port}"),
                        e,
                    ));
                }
            }
        }
        let in_order = session.ordered_acks.then(|| {
            Mutex::new(Outbox {
                order: InOrder::new(),
                draining: false,
            })
        });
        let link = Arc::new(Link {
            client,
            acks: Mutex::default(),
            order: tokio::sync::Mutex::new(()),
            in_order,
            drained: tokio::sync::Notify::new(),
            filters: Mutex::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(Arc::clone(&link), events, tx));
        Ok(Mqtt {
            link,
            incoming: Mutex::new(Some(rx)),
            driver,
            session,
        })
    }

    /// A producer on this connection.
    pub fn sink(&self) -> MqttSink {
        MqttSink {
            link: Arc::clone(&self.link),
        }
    }

    /// Subscribes to `filter` at QoS 1 (waiting for the `SUBACK`) and returns the source of
    /// this connection's messages (once per connection). Dead letters go to
    /// `idemgate-dead/<topic>` unless [`MqttSource::with_dead_letter_topic`] says otherwise.
    pub async fn source(&self, filter: &str) -> Result<MqttSource> {
        let incoming = lock(&self.incoming)
            .take()
            .ok_or_else(|| Error::Config("this connection's source was already taken".into()))?;
        if !self.session.persistent {
            tracing::warn!(
                filter,
                "a clean-session source: messages published while it is disconnected are not kept for it, and unacked ones are not redelivered"
            );
        }
        self.link.subscribe(filter).await?;
        let (again_tx, again_rx) = mpsc::unbounded_channel();
        Ok(MqttSource {
            link: Arc::clone(&self.link),
            incoming,
            again_tx,
            again_rx,
            dead_letter_topic: None,
            horizon: Horizon {
                broker: BROKER,
                redelivery: self.session.expiry,
                basis: format!("session expiry interval {:?}", self.session.expiry),
            },
        })
    }

    /// Disconnects cleanly (a persistent session stays on the broker), after the PUBACKs of the
    /// messages settled so far. A PUBACK held behind an unsettled message is not sent: the broker
    /// redelivers both.
    pub async fn disconnect(self) -> Result<()> {
        self.link.flushed().await;
        self.link
            .client
            .disconnect()
            .await
            .map_err(err("disconnecting"))?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

impl Drop for Mqtt {
    /// Dropping the connection closes it without a `DISCONNECT`, as a crash would.
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Drives the event loop: incoming publishes to the source, numbered in arrival order, acks to
/// their waiters; reconnects after a failure (a persistent session resumes where it was).
async fn drive(
    link: Arc<Link>,
    mut events: EventLoop,
    incoming: mpsc::UnboundedSender<(Publish, u64)>,
) {
    let mut arrived = 0;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = incoming.send((p, arrived));
                arrived += 1;
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let w = link.acks().by_pkid.remove(&ack.pkid);
                if let Some(w) = w {
                    let r = match ack.reason {
                        PubAckReason::Success => Ok(true),
                        PubAckReason::NoMatchingSubscribers => Ok(false),
                        other => Err(format!("the broker refused the publish: {other:?}")),
                    };
                    let _ = w.send(r);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let w = link.acks().subs_by_pkid.remove(&ack.pkid);
                if let Some(w) = w {
                    let refused = ack.return_codes.iter().find(|c| {
                        !matches!(
                            c,
                            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                        )
                    });
                    let _ = w.send(match refused {
                        None => Ok(true),
                        Some(c) => Err(format!("the broker refused the subscription: {c:?}")),
                    });
                }
            }
            Ok(Event::Outgoing(Sent::Publish(pkid))) => {
                let mut acks = link.acks();
                if let Some(w) = acks.publishes.pop_front() {
                    acks.by_pkid.insert(pkid, w);
                }
            }
            Ok(Event::Outgoing(Sent::Subscribe(pkid))) => {
                let mut acks = link.acks();
                if let Some(w) = acks.subscribes.pop_front() {
                    acks.subs_by_pkid.insert(pkid, w);
                }
            }
            // a reconnection (the first CONNACK was read by `connect`)
            Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                link.subscribe_again();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "mqtt connection failed; reconnecting");
                link.fail_all(&e.to_string());
                link.lost(arrived);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

fn properties(event_id: Option<&str>, headers: &[(String, Bytes)]) -> PublishProperties {
    let mut user_properties = Vec::with_capacity(headers.len() + 1);
    if let Some(id) = event_id {
        user_properties.push((EVENT_ID.to_owned(), id.to_owned()));
    }
    user_properties.extend(
        headers
            .iter()
            .filter(|(k, _)| k != EVENT_ID)
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned())),
    );
    PublishProperties {
        user_properties,
        ..PublishProperties::default()
    }
}

/// A QoS 1 producer: see the [crate docs](crate).
#[derive(Clone)]
pub struct MqttSink {
    link: Arc<Link>,
}

impl fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSink").finish_non_exhaustive()
    }
}

impl Sink for MqttSink {
    async fn publish(&self, msg: &Outgoing) -> Result<()> {
        let mut props = properties(Some(&msg.event_id), &msg.headers);
        if let Some(k) = &msg.ordering_key {
            props
                .user_properties
                .push((ORDERING_KEY.to_owned(), k.clone()));
        }
        // a topic nobody subscribes to yet is the application's business (MQTT has no queues)
        self.link
            .publish(&msg.destination, msg.payload.clone(), props)
            .await
            .map(drop)
    }
}

/// A QoS 1 subscription with manual acks: see the [crate docs](crate).
pub struct MqttSource {
    link: Arc<Link>,
    incoming: mpsc::UnboundedReceiver<(Publish, u64)>,
    again_tx: mpsc::UnboundedSender<Again>,
    again_rx: mpsc::UnboundedReceiver<Again>,
    dead_letter_topic: Option<String>,
    horizon: Horizon,
}

impl fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSource")
            .field("dead_letter_topic", &self.dead_letter_topic)
            .finish_non_exhaustive()
    }
}

impl MqttSource {
    /// Dead letters go to `topic` instead of `idemgate-dead/<topic>`.
    pub fn with_dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    fn delivery(&self, (publish, arrival, msg): Again) -> MqttDelivery {
        MqttDelivery {
            link: Arc::clone(&self.link),
            again: Some(self.again_tx.clone()),
            dead_letter_topic: self.dead_letter_topic.clone(),
            publish,
            arrival,
            msg,
        }
    }
}

fn message(p: &Publish) -> Message {
    let mut msg = Message::new(String::from_utf8_lossy(&p.topic), p.payload.clone());
    if let Some(props) = &p.properties {
        for (k, v) in &props.user_properties {
            if k == EVENT_ID {
                msg.event_id = Some(v.clone());
            } else if k == ORDERING_KEY {
                msg.ordering_key = Some(v.clone());
            }
            msg.headers.push((k.clone(), Bytes::from(v.clone())));
        }
    }
    msg.redelivered = p.dup;
    msg
}

impl Source for MqttSource {
    type Delivery = MqttDelivery;

    /// How long the broker may redeliver an unacknowledged message: the session expiry.
    fn horizon(&self) -> Option<Horizon> {
        Some(self.horizon.clone())
    }

    async fn recv(&mut self) -> Result<Option<MqttDelivery>> {
        let next = tokio::select! {
            biased;
            Some(again) = self.again_rx.recv() => again,
            p = self.incoming.recv() => match p {
                Some((p, arrival)) => { let m = message(&p); (p, arrival, m) }
                None => return Ok(None),
            },
        };
        Ok(Some(self.delivery(next)))
    }
}

/// A message handed back to its source: the PUBLISH, its arrival number, the message.
type Again = (Publish, u64, Message);

/// One QoS 1 message, unacknowledged until settled.
pub struct MqttDelivery {
    link: Arc<Link>,
    again: Option<mpsc::UnboundedSender<Again>>,
    dead_letter_topic: Option<String>,
    publish: Publish,
    /// Its place in the connection's arrival order (for in-order PUBACKs).
    arrival: u64,
    msg: Message,
}

impl fmt::Debug for MqttDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttDelivery")
            .field("topic", &self.msg.source)
            .field("pkid", &self.publish.pkid)
            .finish_non_exhaustive()
    }
}

impl MqttDelivery {
    /// Hands the message back to its source as a redelivery.
    fn requeue(&mut self) {
        if let Some(again) = self.again.take() {
            let mut msg = std::mem::take(&mut self.msg);
            msg.redelivered = true;
            msg.deliveries = Some(msg.deliveries.unwrap_or(1) + 1);
            let _ = again.send((self.publish.clone(), self.arrival, msg));
        }
    }

    async fn puback(mut self) -> Result<()> {
        self.again = None;
        match &self.link.in_order {
            Some(outbox) => {
                self.link
                    .settled(outbox, self.arrival, Ack::of(&self.publish));
                Ok(())
            }
            None => self
                .link
                .client
                .ack(&self.publish)
                .await
                .map_err(err("acknowledging")),
        }
    }
}

impl Drop for MqttDelivery {
    /// Dropped unsettled (a cancelled handler): handed back, never lost. If the whole consumer
    /// is gone, the broker redelivers it when the session reconnects.
    fn drop(&mut self) {
        self.requeue();
    }
}

impl Delivery for MqttDelivery {
    fn message(&self) -> &Message {
        &self.msg
    }

    async fn ack(self) -> Result<()> {
        self.puback().await
    }

    async fn nack(mut self, delay: Duration) -> Result<()> {
        // MQTT has no negative ack: the message comes back here after the delay
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            self.requeue();
        });
        Ok(())
    }

    async fn dead_letter(self, reason: &str) -> Result<()> {
        let topic = match &self.dead_letter_topic {
            Some(t) => t.clone(),
            None => format!("idemgate-dead/{}", self.msg.source),
        };
        let mut props = properties(self.msg.event_id.as_deref(), &self.msg.headers);
        props
            .user_properties
            .push((DEAD_LETTER_REASON.to_owned(), reason.to_owned()));
        // acked only once a subscriber (a persistent session, a bridge) holds the dead letter:
        // otherwise the broker drops it, and the original comes back here after a pause
        let refused = match self
            .link
            .publish(&topic, self.msg.payload.clone(), props)
            .await
        {
            Ok(true) => return self.puback().await,
            Ok(false) => Error::broker(
                BROKER,
                format!("dead-lettering to {topic}"),
                "no subscriber matched the dead-letter topic: the broker dropped it",
            ),
            Err(e) => e,
        };
        self.nack(DEAD_LETTER_RETRY).await?;
        Err(refused)
    }
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

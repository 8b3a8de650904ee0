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
//! A topic's messages reach one session in publish order, between broker restarts: Mosquitto
//! 2.0.11 with persistence was seen handing a resumed session a message published after its
//! restart before older messages of the same topic that it had restored.
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

mod acks;
mod connection;
mod session;
mod sink;
mod source;

use self::acks::*;
pub use self::connection::Mqtt;
pub use self::session::Session;
pub use self::sink::MqttSink;
use self::sink::*;
pub use self::source::{MqttDelivery, MqttSource};

const BROKER: &str = "mqtt";

fn err<E: Into<idemgate_consumer::BoxError>>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::broker(BROKER, what, e)
}

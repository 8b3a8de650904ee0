//! Messages as the runtime sees them, and as producers send them.

use bytes::Bytes;
use idemgate_core::Position;

pub use idemgate_core::Outgoing;

/// The header that carries a message's event id when the broker has no native one.
pub const EVENT_ID: &str = "idemgate-event-id";

/// The header that carries a message's ordering key on brokers with no native one (RabbitMQ,
/// NATS, MQTT): the consumer handles the messages of one key one at a time, in order.
pub const ORDERING_KEY: &str = "idemgate-ordering-key";

/// The header a dead-lettered message carries with the reason it was dead-lettered.
pub const DEAD_LETTER_REASON: &str = "idemgate-dead-letter-reason";

/// How long an adapter waits before a message whose dead letter could not be stored comes back
/// to its source (kept, not acked, and not redelivered in a hot loop).
pub const DEAD_LETTER_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A received message: what the handler sees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// The queue, subject or topic it came from.
    pub source: String,
    /// The body.
    pub payload: Bytes,
    /// Headers (properties, user properties), in the broker's order.
    pub headers: Vec<(String, Bytes)>,
    /// The producer's event id: the broker's native message id, or the [`EVENT_ID`] header.
    pub event_id: Option<String>,
    /// The broker says it delivered this message before. A hint only: the store decides.
    pub redelivered: bool,
    /// How many times the broker has delivered it, this time included, where it counts.
    pub deliveries: Option<u32>,
    /// Messages with the same ordering key are handled one at a time, in order.
    pub ordering_key: Option<String>,
    /// Where the message sits in a partitioned log (Kafka), for an [`Inbox`](crate::Inbox) that
    /// keeps the consumer's position in the same transaction as the effect.
    pub position: Option<Position>,
}

impl Message {
    /// A message with a payload and nothing else, for adapters and tests to fill in.
    pub fn new(source: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Message {
            source: source.into(),
            payload: payload.into(),
            ..Message::default()
        }
    }

    /// The first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }

    /// Sets the event id.
    pub fn with_event_id(mut self, id: impl Into<String>) -> Self {
        self.event_id = Some(id.into());
        self
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

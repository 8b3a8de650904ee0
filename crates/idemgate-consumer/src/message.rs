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

/// A handler error that no retry can fix (a 4xx from the service a bridge delivers to, an
/// order the business rules refuse): the message is dead-lettered at once with this reason,
/// instead of being retried up to `max_attempts`. Return it as the handler's error, or boxed in
/// a [`BoxError`](crate::BoxError).
///
/// ```
/// use idemgate_consumer::{BoxError, Message, Permanent};
///
/// async fn handle(msg: Message) -> Result<(), BoxError> {
///     if msg.payload.is_empty() {
///         return Err(Permanent::new("an empty order").into());
///     }
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permanent(String);

impl Permanent {
    /// A permanent failure, with its reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Permanent(reason.into())
    }
}

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Permanent {}

/// Whether a handler's error is a [`Permanent`] one (itself, or boxed).
pub(crate) fn is_permanent<E: 'static>(e: &E) -> bool {
    let any = e as &dyn std::any::Any;
    any.is::<Permanent>()
        || any
            .downcast_ref::<crate::BoxError>()
            .is_some_and(|b| b.is::<Permanent>())
}

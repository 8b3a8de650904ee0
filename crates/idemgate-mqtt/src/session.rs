//! How the broker keeps a client's session.

use super::*;

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

//! The retention window check: a store must remember a key for as long as the broker may
//! redeliver its message, or a late redelivery runs the effect again.

use std::fmt;
use std::time::Duration;

use idemgate_core::Warning;

/// How long after a first delivery a broker may still redeliver a message, and how that was
/// worked out (for the warning).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Horizon {
    /// The broker.
    pub broker: &'static str,
    /// The longest time between a first delivery and a redelivery.
    pub redelivery: Duration,
    /// Where the figure comes from, as in `"AckWait 30s × MaxDeliver 5"`.
    pub basis: String,
}

/// The verdict of [`check_window`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowCheck {
    /// The store's retention of completed keys.
    pub retention: Duration,
    /// The broker's redelivery horizon.
    pub horizon: Horizon,
}

impl WindowCheck {
    /// Retention covers the horizon.
    pub fn is_ok(&self) -> bool {
        self.retention >= self.horizon.redelivery
    }

    /// The `"retention-window"` warning when the retention is shorter than the horizon.
    pub fn warning(&self) -> Option<Warning> {
        (!self.is_ok()).then(|| Warning::new("retention-window", self.to_string()))
    }
}

impl fmt::Display for WindowCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_ok() {
            "covers"
        } else {
            "is SHORTER than"
        };
        write!(
            f,
            "retention {:?} {verdict} the {} redelivery horizon {:?} ({})",
            self.retention, self.horizon.broker, self.horizon.redelivery, self.horizon.basis
        )?;
        if !self.is_ok() {
            f.write_str(": a redelivery after the key expires runs the effect again")?;
        }
        Ok(())
    }
}

/// Compares a store's retention with a broker's redelivery horizon.
///
/// ```
/// use std::time::Duration;
/// use idemgate_consumer::{Horizon, check_window};
///
/// let nats = Horizon { broker: "nats", redelivery: Duration::from_secs(150), basis: "AckWait 30s × MaxDeliver 5".into() };
/// assert!(check_window(Duration::from_secs(3600), nats.clone()).is_ok());
/// assert!(!check_window(Duration::from_secs(60), nats).is_ok());
/// ```
pub fn check_window(retention: Duration, horizon: Horizon) -> WindowCheck {
    WindowCheck { retention, horizon }
}

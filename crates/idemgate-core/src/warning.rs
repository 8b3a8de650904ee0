//! Warnings: settings that weaken a guarantee without stopping the work.

use std::fmt;

/// A setting that weakens a guarantee without stopping the work: a Redis server that forgets
/// its keys on restart, a retention shorter than the broker's redelivery window.
///
/// The check that finds one returns it (and logs it at `warn` through `tracing`), so a program
/// without a `tracing` subscriber can print it: `for w in warnings { eprintln!("warning: {w}") }`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Warning {
    /// A stable name for the condition (`"redis-no-aof"`, `"redis-eviction"`,
    /// `"retention-window"`), to match on.
    pub code: &'static str,
    /// What is wrong, what it risks and how to fix it.
    pub message: String,
}

impl Warning {
    /// A warning.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Warning {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

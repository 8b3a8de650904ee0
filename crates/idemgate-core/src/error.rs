//! The error type shared by every idemgate crate.

use std::time::SystemTime;

/// A boxed error from a backend or a codec.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with idemgate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a store, a key or the Gate's own bookkeeping.
///
/// A duplicate, an in-progress key and a fingerprint mismatch are not errors: they are
/// [`Claim`](crate::Claim) values. Errors are for the backend failing, bad input, bad
/// configuration and lost leases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lease is stale: another claim took the key over, or the record was completed or
    /// released. Nothing was changed.
    #[error("lease lost: the key was taken over, completed or released by a newer claim")]
    LeaseLost,

    /// A bounded store is full of live records (or of stored outcomes' bytes) and refuses a
    /// new key or outcome rather than forget one.
    #[error("store is at capacity (limit {limit})")]
    Capacity {
        /// The configured number of records, or of outcome bytes.
        limit: usize,
    },

    /// A payload lacks what its key or fingerprint is taken from (see `JsonFields`), or is not
    /// the format expected.
    #[error("invalid payload: {reason}")]
    InvalidPayload {
        /// What was wrong.
        reason: String,
    },
    /// A key, scope or event id is not acceptable.
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// Why the key was refused.
        reason: String,
    },

    /// The backend could not be reached, or the operation timed out; retrying may succeed.
    #[error("{backend} store unavailable")]
    Unavailable {
        /// Which backend (`"sqlite"`, `"postgres"`, ...).
        backend: &'static str,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },

    /// The backend answered with an error that retrying will not fix.
    #[error("{backend} store failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },

    /// Stored data could not be read back: a foreign or damaged database, a schema from a newer
    /// version, or an undecodable stored outcome.
    #[error("{backend} data is corrupt or foreign: {reason}")]
    Corrupt {
        /// Which backend.
        backend: &'static str,
        /// What was wrong.
        reason: String,
    },

    /// A configuration value is wrong (a URL, a duration, a path).
    #[error("invalid configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },

    /// A value could not be encoded to, or decoded from, a stored outcome.
    #[error("outcome codec failed")]
    Codec {
        /// The serde failure.
        #[source]
        source: BoxError,
    },

    /// A compare-and-set of a consumer position found another value than expected: another
    /// consumer owns the partition now, or this one is replaying. Nothing was changed.
    #[error(
        "position of {topic}/{partition} for group {group} is {found:?}, not the expected {expected:?}"
    )]
    Fenced {
        /// The consumer group.
        group: String,
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// What the writer expected (`None`: no position yet).
        expected: Option<i64>,
        /// What is stored.
        found: Option<i64>,
    },

    /// The operation waited for an in-progress key until its deadline.
    #[error("timed out waiting for an in-progress key (lease until {lease_until:?})")]
    Timeout {
        /// The lease of the running claim when the wait gave up.
        lease_until: SystemTime,
    },
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Timeout { .. })
    }

    pub(crate) fn invalid_key(reason: impl Into<String>) -> Self {
        Error::InvalidKey {
            reason: reason.into(),
        }
    }
}

//! Leases, records and claim results.

use std::time::{Duration, SystemTime};

use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::outcome::Outcome;

/// Proof of ownership of an in-progress key.
///
/// Carries a **fencing token**: a per-key counter that every successful claim (including a
/// take-over after expiry) increments. `complete`, `release` and `renew` with a token that is no
/// longer current fail with [`Error::LeaseLost`](crate::Error::LeaseLost) and change nothing.
///
/// Tokens never go backwards, even across a purge: a record that starts afresh (no stored row
/// for the key) takes [`first_token`] of the store's clock, the clock's milliseconds times
/// [`TOKENS_PER_MS`], and every later claim of the same record adds one. A zombie of an earlier
/// generation of the key holds a token below the new generation's, unless that generation took
/// more than [`TOKENS_PER_MS`] claims per millisecond of its life, which no store serves (each
/// claim is a write serialized on the key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    key: Key,
    token: u64,
    expires_at: SystemTime,
    attempt: u32,
}

impl Lease {
    /// A lease as a store hands it out. Stores call this; applications receive leases.
    pub fn new(key: Key, token: u64, expires_at: SystemTime, attempt: u32) -> Self {
        Lease {
            key,
            token,
            expires_at,
            attempt,
        }
    }

    /// The key this lease owns.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The fencing token.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// When the lease runs out unless renewed.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// Which execution of this key this is: 1 for the first, more after take-overs and releases.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// How many tokens one millisecond of a store's clock makes room for (see [`Lease`]).
pub const TOKENS_PER_MS: u64 = 1000;

/// The token of a record that starts afresh at `now` on the store's clock: the clock's
/// milliseconds times [`TOKENS_PER_MS`] (at least 1).
pub fn first_token(now: SystemTime) -> u64 {
    crate::clock::to_millis(now)
        .saturating_mul(TOKENS_PER_MS)
        .max(1)
}

/// The latest time a store writes: the end of year 9999. Every stored time, and any sum of two
/// of them, fits a signed 64-bit count of milliseconds.
pub const END_OF_TIME_MS: u64 = 253_402_300_799_999;

/// `t + d`, saturating at [`END_OF_TIME_MS`] instead of overflowing: lease and retention
/// arithmetic on arbitrary durations never panics.
pub fn later(t: SystemTime, d: Duration) -> SystemTime {
    let end = crate::clock::from_millis(END_OF_TIME_MS);
    t.checked_add(d).map_or(end, |t| t.min(end))
}

/// The state of a stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// A claim holds the key (or held it, if `lease_until` has passed: then it may be taken over).
    InProgress {
        /// The current fencing token.
        token: u64,
        /// When the current lease runs out.
        lease_until: SystemTime,
    },
    /// The handler finished; `outcome` is replayed to duplicates until the record expires.
    Completed {
        /// The token of the lease that completed the record.
        token: u64,
        /// The stored result.
        outcome: Outcome,
        /// When `complete` was called.
        completed_at: SystemTime,
    },
}

/// One key's stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The key.
    pub key: Key,
    /// The fingerprint of the request that claimed the key, if one was given.
    pub fingerprint: Option<Fingerprint>,
    /// In progress or completed.
    pub state: State,
    /// When the key was first claimed.
    pub created_at: SystemTime,
    /// When the record stops counting and the key is free again (and may be purged).
    pub expires_at: SystemTime,
    /// How many executions were started (1 + take-overs + claims after a release).
    pub attempts: u32,
}

impl Record {
    /// The last fencing token issued for this key.
    pub fn token(&self) -> u64 {
        match self.state {
            State::InProgress { token, .. } | State::Completed { token, .. } => token,
        }
    }

    /// The stored outcome, if completed.
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.state {
            State::Completed { outcome, .. } => Some(outcome),
            State::InProgress { .. } => None,
        }
    }
}

/// What a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum Claim {
    /// The key was free (new, expired, released or its lease ran out): run the handler, then
    /// `complete` or `release`.
    Acquired(Lease),
    /// Another claim holds a live lease: retry later or wait.
    InProgress {
        /// When that lease runs out.
        lease_until: SystemTime,
        /// How many executions were started.
        attempts: u32,
    },
    /// The key was completed: replay its outcome, do not run the handler.
    Completed(Record),
    /// The key is known with another fingerprint: the same key was reused for a different
    /// request.
    Mismatch {
        /// The fingerprint stored with the key.
        stored: Fingerprint,
    },
}

/// What [`Store::forget`](crate::Store::forget) did.
///
/// A forgotten record is not deleted but left as a *tombstone*: in progress, with no outcome
/// and no fingerprint, its lease ended and its token one past the last lease handed out. The
/// next claim takes it over (a fresh run, for any request), and every earlier lease holder stays
/// fenced: its `complete`, `release` and `renew` fail with
/// [`Error::LeaseLost`](crate::Error::LeaseLost). The tombstone goes at the record's expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Forgotten {
    /// The key had no live record: nothing to forget.
    Absent,
    /// The completed record's outcome was dropped: the next claim runs the handler again.
    Removed {
        /// The tombstone's token; the next claim gets a larger one.
        token: u64,
    },
    /// The in-progress record's lease was ended: the next claim runs the handler again.
    Tombstoned {
        /// The tombstone's token; the next claim gets a larger one.
        token: u64,
    },
    /// A live lease holds the key and `force` was not given: nothing changed.
    Held {
        /// When that lease runs out.
        lease_until: SystemTime,
    },
}

/// Options of one claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimOptions {
    /// How long the lease lasts before another claim may take the key over.
    pub lease: Duration,
    /// How long an abandoned in-progress record is kept after its lease runs out, so that a
    /// late, stale lease holder is still fenced (its token stays known).
    pub retention: Duration,
}

impl ClaimOptions {
    /// 30 s leases, records of abandoned claims kept for a day.
    pub const DEFAULT: ClaimOptions = ClaimOptions {
        lease: Duration::from_secs(30),
        retention: Duration::from_secs(86_400),
    };

    /// Options with this lease and the default retention.
    pub fn with_lease(lease: Duration) -> Self {
        ClaimOptions {
            lease,
            ..Self::DEFAULT
        }
    }
}

impl Default for ClaimOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

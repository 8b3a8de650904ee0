//! The flat row shape every SQL backend stores a record in.

use crate::clock::from_millis;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::outcome::Outcome;
use crate::record::{Record, State};

/// A record as SQL backends store it: times in milliseconds since the Unix epoch, the state as
/// `0` (in progress) or `1` (completed), the outcome in [`Outcome::encode`]'s layout.
///
/// For backend authors: read the columns into this, then [`RecordRow::into_record`] checks
/// them; a damaged row is [`Error::Corrupt`], never a panic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordRow {
    /// 32 bytes, or none.
    pub fingerprint: Option<Vec<u8>>,
    /// 0 in progress, 1 completed.
    pub state: i64,
    /// The fencing token.
    pub token: i64,
    /// Set while in progress.
    pub lease_until: Option<i64>,
    /// Set once completed.
    pub outcome: Option<Vec<u8>>,
    /// Set once completed.
    pub completed_at: Option<i64>,
    /// First claim.
    pub created_at: i64,
    /// Expiry of the record.
    pub expires_at: i64,
    /// Executions started.
    pub attempts: i64,
}

/// Reads a stored millisecond count; negative values (never written) count as the epoch.
pub fn time_from_ms(ms: i64) -> std::time::SystemTime {
    from_millis(u64::try_from(ms).unwrap_or(0))
}

impl RecordRow {
    /// Whether the record is live at `now_ms` and its lease (if in progress) still runs.
    pub fn is_held_at(&self, now_ms: i64) -> bool {
        self.expires_at > now_ms
            && (self.state == 1 || self.lease_until.is_some_and(|l| l > now_ms))
    }

    /// What a claim that found the key taken answers, from the stored row at `now_ms`: a
    /// mismatch, the completed record, or the live lease; `None` when the record expired or its
    /// lease ran out (claim again, or take it over).
    pub fn taken(
        self,
        key: &Key,
        fp: Option<&Fingerprint>,
        now_ms: i64,
        backend: &'static str,
    ) -> Result<Option<crate::record::Claim>> {
        use crate::record::Claim;
        if self.expires_at <= now_ms {
            return Ok(None);
        }
        let held = self.is_held_at(now_ms);
        let rec = self.into_record(key, backend)?;
        if let (Some(s), Some(g)) = (rec.fingerprint, fp)
            && s != *g
        {
            return Ok(Some(Claim::Mismatch { stored: s }));
        }
        if !held {
            return Ok(None);
        }
        Ok(Some(match rec.state {
            State::Completed { .. } => Claim::Completed(rec),
            State::InProgress { lease_until, .. } => Claim::InProgress {
                lease_until,
                attempts: rec.attempts,
            },
        }))
    }

    /// What [`Store::forget`](crate::Store::forget) does to this row at `now_ms`. SQL backends
    /// read the row, then write the step only if the row still has the state and token read.
    pub fn forget_step(&self, now_ms: i64, force: bool) -> ForgetStep {
        match self.lease_until {
            _ if self.expires_at <= now_ms => ForgetStep::Absent,
            Some(until) if self.state == 0 && until > now_ms && !force => {
                ForgetStep::Held { lease_until: until }
            }
            until => ForgetStep::Tombstone {
                token: self.token.saturating_add(1),
                lease_until: until.map_or(now_ms, |u| u.min(now_ms)),
                completed: self.state == 1,
            },
        }
    }

    /// The record of `key` this row describes; `backend` names the store in errors.
    pub fn into_record(self, key: &Key, backend: &'static str) -> Result<Record> {
        let corrupt = |reason: String| Error::Corrupt { backend, reason };
        let fingerprint = self
            .fingerprint
            .as_deref()
            .map(Fingerprint::try_from)
            .transpose()?;
        let token = u64::try_from(self.token)
            .map_err(|_| corrupt(format!("record {key} has token {}", self.token)))?;
        let state = match (
            self.state,
            self.lease_until,
            self.outcome,
            self.completed_at,
        ) {
            (0, Some(until), _, _) => State::InProgress {
                token,
                lease_until: time_from_ms(until),
            },
            (1, _, Some(bytes), Some(at)) => State::Completed {
                token,
                outcome: Outcome::decode(&bytes)?,
                completed_at: time_from_ms(at),
            },
            (s, ..) => return Err(corrupt(format!("record {key} has an impossible state {s}"))),
        };
        Ok(Record {
            key: key.clone(),
            fingerprint,
            state,
            created_at: time_from_ms(self.created_at),
            expires_at: time_from_ms(self.expires_at),
            attempts: u32::try_from(self.attempts).unwrap_or(u32::MAX),
        })
    }
}

/// A step of [`RecordRow::forget_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForgetStep {
    /// No live record: change nothing.
    Absent,
    /// Make the row a tombstone: in progress (state 0), no outcome, no fingerprint, this
    /// `token` and `lease_until`.
    Tombstone {
        /// The new token, one past the last lease handed out.
        token: i64,
        /// The lease's new end: now, or earlier.
        lease_until: i64,
        /// Whether the row was completed (its outcome is dropped).
        completed: bool,
    },
    /// A live lease and no `force`: change nothing.
    Held {
        /// The lease's end.
        lease_until: i64,
    },
}

impl ForgetStep {
    /// What `forget` answers once the step is applied.
    pub fn answer(self) -> crate::record::Forgotten {
        use crate::record::Forgotten;
        match self {
            ForgetStep::Absent => Forgotten::Absent,
            ForgetStep::Tombstone {
                token, completed, ..
            } => {
                let token = u64::try_from(token).unwrap_or(0);
                if completed {
                    Forgotten::Removed { token }
                } else {
                    Forgotten::Tombstoned { token }
                }
            }
            ForgetStep::Held { lease_until } => Forgotten::Held {
                lease_until: time_from_ms(lease_until),
            },
        }
    }
}

/// The result of appending to an idempotent event log (`PgEventLog`, `MySqlEventLog`,
/// `SqliteEventLog`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The event's position in its stream (1, 2, 3, … without gaps).
    pub seq: i64,
    /// `false` when the event id was already in the stream: nothing was written.
    pub fresh: bool,
}

/// One event read back from an event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedEvent {
    /// Position in the stream.
    pub seq: i64,
    /// The producer's event id.
    pub event_id: String,
    /// The payload.
    pub payload: Vec<u8>,
}

//! A reference model of the `Store` contract and a proptest that checks a store against it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use idemgate_core::{
    Claim, ClaimOptions, Error, Fingerprint, Forgotten, Key, Lease, ManualClock, Outcome, State,
    Store,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// One step of a generated sequence. Indices pick among a few keys, fingerprints and the leases
/// handed out so far (stale ones included).
#[derive(Clone, Debug)]
pub enum Op {
    /// Claim key `key` with fingerprint `fp` (0 = none) and a lease of `lease_ms`.
    Claim {
        /// Key index.
        key: u8,
        /// Fingerprint index, 0 for none.
        fp: u8,
        /// Lease length.
        lease_ms: u16,
        /// Retention of an abandoned claim.
        retention_ms: u16,
    },
    /// Complete a lease handed out earlier.
    Complete {
        /// Lease index.
        lease: u8,
        /// Retention.
        retention_ms: u16,
    },
    /// Release a lease handed out earlier.
    Release {
        /// Lease index.
        lease: u8,
    },
    /// Renew a lease handed out earlier.
    Renew {
        /// Lease index.
        lease: u8,
        /// New lease length.
        extend_ms: u16,
    },
    /// Read a key.
    Get {
        /// Key index.
        key: u8,
    },
    /// Purge expired records.
    Purge {
        /// Limit.
        limit: u8,
    },
    /// Forget a key, forced or not.
    Forget {
        /// Key index.
        key: u8,
        /// Whether a live lease is taken away too.
        force: bool,
    },
    /// Let time pass.
    Advance {
        /// Milliseconds.
        ms: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..3, 1u16..300, 0u16..300).prop_map(|(key, fp, lease_ms, retention_ms)| Op::Claim { key, fp, lease_ms, retention_ms }),
        3 => (any::<u8>(), 1u16..400).prop_map(|(lease, retention_ms)| Op::Complete { lease, retention_ms }),
        1 => any::<u8>().prop_map(|lease| Op::Release { lease }),
        1 => (any::<u8>(), 1u16..300).prop_map(|(lease, extend_ms)| Op::Renew { lease, extend_ms }),
        2 => (0u8..3).prop_map(|key| Op::Get { key }),
        1 => (3u8..6).prop_map(|limit| Op::Purge { limit }),
        1 => (0u8..3, any::<bool>()).prop_map(|(key, force)| Op::Forget { key, force }),
        3 => (1u16..250).prop_map(|ms| Op::Advance { ms }),
    ]
}

#[derive(Clone, Debug)]
struct MRec {
    fp: Option<Fingerprint>,
    token: u64,
    lease_until: Option<u64>, // Some = in progress
    outcome: Option<Outcome>,
    expires_at: u64,
    attempts: u32,
}

/// The reference model: the contract written as plainly as possible, in milliseconds.
#[derive(Default, Debug)]
struct Model {
    now: u64,
    recs: BTreeMap<u8, MRec>,
}

/// What a step returned, in a form both sides can be compared by.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Acquired { token: u64, attempt: u32 },
    InProgress { attempts: u32 },
    Completed { token: u64, body: Vec<u8> },
    Mismatch,
    Ok,
    LeaseLost,
    Get(Option<(u64, bool, u32)>),
    Purged(u64),
    Forgotten(&'static str, Option<u64>),
    Nothing,
}

impl Model {
    fn claim(&mut self, k: u8, fp: Option<Fingerprint>, lease: u64, retention: u64) -> Seen {
        let now = self.now;
        let fresh = |token: u64| MRec {
            fp,
            token,
            lease_until: Some(now + lease),
            outcome: None,
            expires_at: now + lease + retention,
            attempts: 1,
        };
        match self.recs.get_mut(&k) {
            None => {
                // a record that starts afresh takes its token from the clock (rule 9)
                let token =
                    idemgate_core::backend::first_token(idemgate_core::backend::from_millis(now));
                self.recs.insert(k, fresh(token));
                Seen::Acquired { token, attempt: 1 }
            }
            Some(r) if r.expires_at <= now => {
                *r = fresh(r.token + 1);
                Seen::Acquired {
                    token: r.token,
                    attempt: 1,
                }
            }
            Some(r) => {
                if let (Some(s), Some(g)) = (r.fp, fp)
                    && s != g
                {
                    return Seen::Mismatch;
                }
                match r.lease_until {
                    None => Seen::Completed {
                        token: r.token,
                        body: r.outcome.clone().unwrap().body.to_vec(),
                    },
                    Some(until) if until > now => Seen::InProgress {
                        attempts: r.attempts,
                    },
                    Some(_) => {
                        r.token += 1;
                        r.attempts += 1;
                        r.fp = r.fp.or(fp);
                        r.lease_until = Some(now + lease);
                        r.expires_at = now + lease + retention;
                        Seen::Acquired {
                            token: r.token,
                            attempt: r.attempts,
                        }
                    }
                }
            }
        }
    }

    fn held(&mut self, k: u8, token: u64) -> Option<&mut MRec> {
        self.recs
            .get_mut(&k)
            .filter(|r| r.token == token && r.lease_until.is_some())
    }
}

fn seen_claim(c: Result<Claim, Error>) -> Seen {
    match c.expect("claim must not fail") {
        Claim::Acquired(l) => Seen::Acquired {
            token: l.token(),
            attempt: l.attempt(),
        },
        Claim::InProgress { attempts, .. } => Seen::InProgress { attempts },
        Claim::Completed(r) => match r.state {
            State::Completed { token, outcome, .. } => Seen::Completed {
                token,
                body: outcome.body.to_vec(),
            },
            State::InProgress { .. } => panic!("Completed claim with an in-progress record"),
        },
        Claim::Mismatch { .. } => Seen::Mismatch,
    }
}

fn seen_unit<T>(r: Result<T, Error>) -> Seen {
    match r {
        Ok(_) => Seen::Ok,
        Err(Error::LeaseLost) => Seen::LeaseLost,
        Err(e) => panic!("store failed: {e}"),
    }
}

/// Runs `cases` random sequences of up to 60 operations against stores made by `make` (each
/// with a fresh [`ManualClock`]) and the reference model, and panics at the first difference,
/// with proptest's shrunk sequence.
pub fn check_against_model<S, F>(cases: u32, make: F)
where
    S: Store,
    F: Fn(ManualClock) -> S,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let keys: Vec<Key> = (0..3)
        .map(|i| Key::new("model", format!("k{i}")).unwrap())
        .collect();
    let fps = [
        None,
        Some(Fingerprint::of(b"one")),
        Some(Fingerprint::of(b"two")),
    ];
    let result = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        let clock = ManualClock::new();
        let store = make(clock.clone());
        let mut model = Model {
            now: idemgate_core::backend::to_millis(idemgate_core::Clock::now(&clock)),
            ..Model::default()
        };
        let mut leases: Vec<(u8, Lease)> = Vec::new();
        rt.block_on(async {
            for (step, op) in ops.iter().enumerate() {
                let pick =
                    |i: u8| (!leases.is_empty()).then(|| leases[i as usize % leases.len()].clone());
                let (want, got) = match *op {
                    Op::Claim {
                        key,
                        fp,
                        lease_ms,
                        retention_ms,
                    } => {
                        let o = ClaimOptions {
                            lease: ms(lease_ms),
                            retention: ms(retention_ms),
                        };
                        let got = store
                            .claim(&keys[key as usize], fps[fp as usize].as_ref(), &o)
                            .await;
                        if let Ok(Claim::Acquired(l)) = &got {
                            leases.push((key, l.clone()));
                        }
                        (
                            model.claim(
                                key,
                                fps[fp as usize],
                                lease_ms.into(),
                                retention_ms.into(),
                            ),
                            seen_claim(got),
                        )
                    }
                    Op::Complete {
                        lease,
                        retention_ms,
                    } => match pick(lease) {
                        None => (Seen::Nothing, Seen::Nothing),
                        Some((k, l)) => {
                            let body = format!("{k}:{}", l.token());
                            let got = store
                                .complete(&l, &Outcome::new(0, body.clone()), ms(retention_ms))
                                .await;
                            let now = model.now;
                            let want = match model.held(k, l.token()) {
                                Some(r) => {
                                    r.lease_until = None;
                                    r.outcome = Some(Outcome::new(0, body));
                                    r.expires_at = now + u64::from(retention_ms);
                                    Seen::Ok
                                }
                                None => Seen::LeaseLost,
                            };
                            (want, seen_unit(got))
                        }
                    },
                    Op::Release { lease } => match pick(lease) {
                        None => (Seen::Nothing, Seen::Nothing),
                        Some((k, l)) => {
                            let now = model.now;
                            let want = match model.held(k, l.token()) {
                                Some(r) => {
                                    r.lease_until = r.lease_until.map(|u| u.min(now));
                                    r.fp = None;
                                    Seen::Ok
                                }
                                None => Seen::LeaseLost,
                            };
                            (want, seen_unit(store.release(l).await))
                        }
                    },
                    Op::Renew { lease, extend_ms } => match pick(lease) {
                        None => (Seen::Nothing, Seen::Nothing),
                        Some((k, l)) => {
                            let now = model.now;
                            let want = match model.held(k, l.token()) {
                                Some(r) => {
                                    let old = r.lease_until.unwrap();
                                    let tail = r.expires_at.saturating_sub(old);
                                    let until = now + u64::from(extend_ms);
                                    r.lease_until = Some(until);
                                    r.expires_at = r.expires_at.max(until + tail);
                                    Seen::Ok
                                }
                                None => Seen::LeaseLost,
                            };
                            (want, seen_unit(store.renew(&l, ms(extend_ms)).await))
                        }
                    },
                    Op::Get { key } => {
                        let now = model.now;
                        let want = model
                            .recs
                            .get(&key)
                            .filter(|r| r.expires_at > now)
                            .map(|r| (r.token, r.lease_until.is_none(), r.attempts));
                        let got = store
                            .get(&keys[key as usize])
                            .await
                            .expect("get failed")
                            .map(|r| {
                                (
                                    r.token(),
                                    matches!(r.state, State::Completed { .. }),
                                    r.attempts,
                                )
                            });
                        (Seen::Get(want), Seen::Get(got))
                    }
                    Op::Purge { limit } => {
                        // the limit is at least the number of keys, so every expired record
                        // goes and the model knows which (the conformance suite checks limits)
                        let now = model.now;
                        let before = model.recs.len();
                        model.recs.retain(|_, r| r.expires_at > now);
                        let want = (before - model.recs.len()) as u64;
                        let got = store
                            .purge_expired(limit.into())
                            .await
                            .expect("purge failed");
                        (Seen::Purged(want), Seen::Purged(got))
                    }
                    Op::Forget { key, force } => {
                        let now = model.now;
                        let want = match model.recs.get_mut(&key).filter(|r| r.expires_at > now) {
                            None => Seen::Forgotten("absent", None),
                            Some(r) if !force && r.lease_until.is_some_and(|l| l > now) => {
                                Seen::Forgotten("held", None)
                            }
                            Some(r) => {
                                let done = r.outcome.take().is_some();
                                r.token += 1;
                                r.lease_until = Some(r.lease_until.map_or(now, |l| l.min(now)));
                                r.fp = None;
                                let what = if done { "removed" } else { "tombstoned" };
                                Seen::Forgotten(what, Some(r.token))
                            }
                        };
                        let got = match store.forget(&keys[key as usize], force).await {
                            Ok(Forgotten::Absent) => Seen::Forgotten("absent", None),
                            Ok(Forgotten::Held { .. }) => Seen::Forgotten("held", None),
                            Ok(Forgotten::Removed { token }) => {
                                Seen::Forgotten("removed", Some(token))
                            }
                            Ok(Forgotten::Tombstoned { token }) => {
                                Seen::Forgotten("tombstoned", Some(token))
                            }
                            Err(e) => panic!("forget failed: {e}"),
                        };
                        (want, got)
                    }
                    Op::Advance { ms: d } => {
                        model.now += u64::from(d);
                        clock.advance(ms(d));
                        (Seen::Nothing, Seen::Nothing)
                    }
                };
                if want != got {
                    return Err(TestCaseError::fail(format!(
                        "step {step} {op:?}: model says {want:?}, store says {got:?}"
                    )));
                }
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("store diverges from the reference model: {e}");
    }
}

fn ms(v: u16) -> Duration {
    Duration::from_millis(v.into())
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

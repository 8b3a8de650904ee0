//! "Send the same event twice", done properly, for a service's own test suite.
//!
//! [`check_exactly_once`] runs a handler through a [`Gate`] against the same event several ways
//! and asks a probe, supplied by the test, how many times the effect really happened:
//!
//! 1. **sequentially**: three deliveries, one after the other;
//! 2. **concurrently**: eight deliveries at once (those refused as in progress are delivered
//!    again, as a broker would);
//! 3. **crash between the effect and the completion**: the handler runs and its process "dies"
//!    before `complete`; after the lease expires the event is delivered again. Only a handler
//!    that passes `lease.key().derive(..)` to the downstream system as *its* idempotency key
//!    survives this one.
//!
//! Each scenario uses its own key (the event's key with a suffix), and the probe is asked about
//! that key. It fails with a readable explanation of what went wrong.
//!
//! ```
//! use std::collections::HashSet;
//! use std::sync::{Arc, Mutex};
//! use idemgate_core::{Key, MemoryStore};
//! use idemgate_testkit::exactly_once::check_exactly_once;
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! // a downstream service that honours idempotency keys, and counts what it really did
//! let sent: Arc<Mutex<HashSet<String>>> = Arc::default();
//! let (s, p) = (Arc::clone(&sent), Arc::clone(&sent));
//! let key = Key::new("emails", "user-7/welcome").unwrap();
//! check_exactly_once(
//!     MemoryStore::new(),
//!     &key,
//!     move |lease: idemgate_core::Lease| {
//!         let s = Arc::clone(&s);
//!         async move {
//!             s.lock().unwrap().insert(lease.key().derive("send").to_string());
//!             Ok::<(), String>(())
//!         }
//!     },
//!     move |k: Key| {
//!         let n = p.lock().unwrap().contains(&k.derive("send").to_string()) as u64;
//!         async move { n }
//!     },
//! )
//! .await
//! .unwrap();
//! # });
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idemgate_core::{Claim, ClaimOptions, EventId, Gate, GateError, Key, Lease, Store};

/// A handler that is not exactly-once, and in which scenario it showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotExactlyOnce {
    /// The scenario: `"sequentially"`, `"concurrently"` or `"crash between the effect and the
    /// completion"`.
    pub scenario: &'static str,
    /// The key the scenario used.
    pub key: String,
    /// How many effects the probe reported (1 is right).
    pub effects: u64,
    /// What it means and what to do.
    pub explanation: String,
}

impl fmt::Display for NotExactlyOnce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not exactly-once {}: the probe reports {} effect(s) for {}. {}",
            self.scenario, self.effects, self.key, self.explanation
        )
    }
}

impl std::error::Error for NotExactlyOnce {}

/// The lease the scenarios use: short, so the crash scenario's redelivery comes quickly.
const LEASE: Duration = Duration::from_millis(300);

/// Runs the three scenarios of the [module docs](self) for `event` and checks, after each, that
/// `probe(key)` reports exactly one effect for the scenario's key.
///
/// `handler` is the service's handler as the Gate calls it: it receives the [`Lease`] (whose
/// key is the scenario's key). `probe` asks the system under test how many times the effect of
/// a key happened (rows written, emails the stub sent, charges the card network made).
///
/// # Errors
/// The first scenario that does not end with exactly one effect, or a handler that fails.
pub async fn check_exactly_once<S, H, Fut, E, P, PFut>(
    store: S,
    event: &Key,
    handler: H,
    probe: P,
) -> Result<(), NotExactlyOnce>
where
    S: Store,
    H: Fn(Lease) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
    P: Fn(Key) -> PFut,
    PFut: Future<Output = u64>,
{
    let gate = Gate::new(store).with_lease(LEASE);
    let handler = Arc::new(handler);
    let run = {
        let (gate, handler) = (gate.clone(), Arc::clone(&handler));
        move |key: Key| {
            let (gate, handler) = (gate.clone(), Arc::clone(&handler));
            async move {
                gate.run(&key, None, |lease| async move {
                    handler(lease).await.map_err(|e| e.to_string())
                })
                .await
                .map(drop)
            }
        }
    };
    let fresh = |what: &str| {
        Key::new(
            event.scope(),
            format!("{}~{what}-{}", event.id(), EventId::new()),
        )
        .expect("a valid key stays valid with a suffix")
    };
    let verdict = |scenario: &'static str, key: &Key, effects: u64, explanation: &str| {
        if effects == 1 {
            Ok(())
        } else {
            Err(NotExactlyOnce {
                scenario,
                key: key.to_string(),
                effects,
                explanation: explanation.to_owned(),
            })
        }
    };
    let failed = |scenario: &'static str, key: &Key, e: String| NotExactlyOnce {
        scenario,
        key: key.to_string(),
        effects: 0,
        explanation: format!("the handler failed: {e}"),
    };

    // 1. three deliveries, one after the other
    let key = fresh("sequential");
    for _ in 0..3 {
        run(key.clone())
            .await
            .map_err(|e| failed("sequentially", &key, e.to_string()))?;
    }
    verdict(
        "sequentially",
        &key,
        probe(key.clone()).await,
        "Each delivery after the first must be replayed, not run: is the effect keyed by \
         something other than the Gate's key, or written twice within one run?",
    )?;

    // 2. eight at once; those refused as in progress come back, as from a broker
    let key = fresh("concurrent");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        tasks.spawn(run(key.clone()));
    }
    let mut busy = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(GateError::InProgress { .. })) => busy += 1,
            Ok(Err(e)) => return Err(failed("concurrently", &key, e.to_string())),
            Err(e) => return Err(failed("concurrently", &key, e.to_string())),
        }
    }
    for _ in 0..busy {
        redeliver(&run, &key)
            .await
            .map_err(|e| failed("concurrently", &key, e))?;
    }
    verdict(
        "concurrently",
        &key,
        probe(key.clone()).await,
        "Concurrent deliveries must run the handler once: the effect happened outside the \
         Gate's claim.",
    )?;

    // 3. the effect happens, the process dies before `complete`, the event comes back
    let key = fresh("crash");
    let opts = ClaimOptions {
        lease: LEASE,
        retention: Duration::from_secs(3600),
    };
    let lease = match gate.store().claim(&key, None, &opts).await {
        Ok(Claim::Acquired(lease)) => lease,
        other => {
            return Err(failed(
                "crash between the effect and the completion",
                &key,
                format!("a fresh key could not be claimed: {other:?}"),
            ));
        }
    };
    handler(lease).await.map_err(|e| {
        failed(
            "crash between the effect and the completion",
            &key,
            e.to_string(),
        )
    })?;
    // ...and nothing is completed or released: the lease runs out
    tokio::time::sleep(LEASE + Duration::from_millis(50)).await;
    redeliver(&run, &key)
        .await
        .map_err(|e| failed("crash between the effect and the completion", &key, e))?;
    verdict(
        "crash between the effect and the completion",
        &key,
        probe(key.clone()).await,
        "The handler ran again after a crash between its effect and `complete`, and the effect \
         happened again. Pass `lease.key().derive(\"step\")` to the downstream system as its \
         idempotency key (or write the effect in the same transaction as the key: the inbox).",
    )
}

/// Delivers `key` again until the Gate runs or replays it (an in-progress claim is waited out).
async fn redeliver<R, Fut>(run: &R, key: &Key) -> Result<(), String>
where
    R: Fn(Key) -> Fut + Sync,
    Fut: Future<Output = Result<(), GateError<String>>> + Send,
{
    for _ in 0..100 {
        match run(key.clone()).await {
            Ok(()) => return Ok(()),
            Err(GateError::InProgress { .. }) => tokio::time::sleep(LEASE / 4).await,
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("the key stayed in progress".into())
}

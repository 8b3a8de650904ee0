//! The Gate runner: heartbeats, policies, replays, panics, cancellation and lost leases.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use idemgate_core::{
    Clock, Error, ErrorPolicy, Gate, GateError, InProgressPolicy, Key, MemoryStore, Run, Store,
};
use idemgate_testkit::fault::{Fault, FaultStore, Op};

/// A clock that follows tokio's (paused) time, so store expiry and Gate timers agree.
#[derive(Debug)]
struct TokioClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

fn store() -> MemoryStore {
    MemoryStore::builder()
        .with_clock(TokioClock {
            base: SystemTime::now(),
            start: tokio::time::Instant::now(),
        })
        .build()
        .unwrap()
}

fn key(id: &str) -> Key {
    Key::new("gate-test", id).unwrap()
}

const LEASE: Duration = Duration::from_millis(300);

#[tokio::test(start_paused = true)]
async fn heartbeat_keeps_a_long_handler_exclusive() {
    let gate = Gate::new(store())
        .with_lease(LEASE)
        .with_in_progress_policy(InProgressPolicy::Reject);
    let runs = Arc::new(AtomicU32::new(0));
    let slow = {
        let (gate, runs) = (gate.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            gate.run(&key("slow"), None, |_| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(LEASE * 5).await;
                Ok::<_, String>(1)
            })
            .await
        })
    };
    for _ in 0..8 {
        tokio::time::sleep(LEASE / 2).await;
        let r = gate
            .run(&key("slow"), None, |_| async { Ok::<_, String>(2) })
            .await;
        assert!(matches!(r, Err(GateError::InProgress { .. })), "got {r:?}");
    }
    assert_eq!(slow.await.unwrap().unwrap(), Run::Fresh(1));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        gate.run(&key("slow"), None, |_| async { Ok::<_, String>(3) })
            .await
            .unwrap(),
        Run::Replayed(1)
    );
}

#[tokio::test(start_paused = true)]
async fn release_policy_runs_again_after_an_error() {
    let gate = Gate::new(store());
    let r = gate
        .run(&key("e"), None, |_| async { Err::<u8, _>("declined") })
        .await;
    assert!(matches!(r, Err(GateError::Handler("declined"))));
    let r = gate
        .run(&key("e"), None, |_| async { Ok::<u8, &str>(7) })
        .await;
    assert_eq!(r.unwrap(), Run::Fresh(7));
}

#[tokio::test(start_paused = true)]
async fn store_policy_replays_the_failure() {
    let gate = Gate::new(store()).with_error_policy(ErrorPolicy::Store);
    let r = gate
        .run(&key("e"), None, |_| async { Err::<u8, _>("card declined") })
        .await;
    assert!(matches!(r, Err(GateError::Handler(_))));
    let r = gate
        .run(&key("e"), None, |_| async { Ok::<u8, &str>(7) })
        .await;
    match r {
        Err(GateError::Failed { message }) => assert_eq!(message, "card declined"),
        other => panic!("expected the stored failure, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn wait_policy_returns_the_running_calls_result() {
    let gate = Gate::new(store())
        .with_lease(LEASE)
        .with_in_progress_policy(InProgressPolicy::Wait {
            timeout: Duration::from_secs(5),
        });
    let first = {
        let gate = gate.clone();
        tokio::spawn(async move {
            gate.run(&key("w"), None, |_| async {
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok::<_, String>("first".to_string())
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = gate
        .run(&key("w"), None, |_| async {
            Ok::<_, String>("second".to_string())
        })
        .await;
    assert_eq!(second.unwrap(), Run::Replayed("first".to_string()));
    assert_eq!(
        first.await.unwrap().unwrap(),
        Run::Fresh("first".to_string())
    );

    // a wait that outlasts its timeout reports the key in progress
    let short = gate
        .clone()
        .with_in_progress_policy(InProgressPolicy::Wait {
            timeout: Duration::from_millis(50),
        });
    let busy = {
        let gate = gate.clone();
        tokio::spawn(async move {
            gate.run(&key("w2"), None, |_| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, String>(0)
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let r = short
        .run(&key("w2"), None, |_| async { Ok::<_, String>(1) })
        .await;
    assert!(matches!(r, Err(GateError::InProgress { .. })), "got {r:?}");
    assert_eq!(busy.await.unwrap().unwrap(), Run::Fresh(0));
}

async fn eventually_fresh(gate: &Gate<MemoryStore>, k: &Key) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match gate.run(k, None, |_| async { Ok::<_, String>(9) }).await {
            Ok(Run::Fresh(9)) => return,
            Err(GateError::InProgress { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::task::yield_now().await;
            }
            other => panic!("key stuck after an abandoned run: {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_leaves_no_key_stuck() {
    let gate = Gate::new(store()).with_lease(Duration::from_secs(3600));
    let g = gate.clone();
    let r = tokio::spawn(async move {
        g.run(&key("p"), None, |_| async {
            panic!("handler bug") as Result<u8, String>
        })
        .await
    })
    .await;
    assert!(r.unwrap_err().is_panic());
    eventually_fresh(&gate, &key("p")).await;
    assert_eq!(
        gate.store().get(&key("p")).await.unwrap().unwrap().attempts,
        2
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_run_releases_its_key() {
    let gate = Gate::new(store()).with_lease(Duration::from_secs(3600));
    let r = tokio::time::timeout(
        Duration::from_millis(50),
        gate.run(&key("c"), None, |_| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, String>(0)
        }),
    )
    .await;
    assert!(r.is_err(), "the run should have been cancelled");
    eventually_fresh(&gate, &key("c")).await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_reported_and_fenced() {
    // every renewal fails: the lease runs out while the handler is still working
    let faulty = FaultStore::new(store());
    faulty.add(Op::Renew, Fault::FailBefore, 0, None);
    let gate = Gate::new(faulty).with_lease(LEASE);
    let zombie = {
        let gate = gate.clone();
        tokio::spawn(async move {
            gate.run(&key("z"), None, |_| async {
                tokio::time::sleep(LEASE * 4).await;
                Ok::<_, String>("zombie".to_string())
            })
            .await
        })
    };
    tokio::time::sleep(LEASE * 2).await;
    let taker = gate
        .run(&key("z"), None, |_| async {
            Ok::<_, String>("owner".to_string())
        })
        .await;
    assert_eq!(taker.unwrap(), Run::Fresh("owner".to_string()));
    let r = zombie.await.unwrap();
    assert!(
        matches!(r, Err(GateError::Store(Error::LeaseLost))),
        "got {r:?}"
    );
    let rec = gate.store().get(&key("z")).await.unwrap().unwrap();
    assert_eq!(rec.outcome().unwrap().body.as_ref(), b"\"owner\"");
    assert!(gate.store().injected() > 0);
}

#[tokio::test(start_paused = true)]
async fn store_failures_surface_as_typed_errors() {
    let gate = Gate::new(FaultStore::new(store()).inject(Op::Claim, Fault::FailBefore, 1));
    let r = gate
        .run(&key("f"), None, |_| async { Ok::<_, String>(1) })
        .await;
    match r {
        Err(GateError::Store(e)) => assert!(e.is_retryable()),
        other => panic!("got {other:?}"),
    }
    // the answer to complete is lost after the write: the retry replays instead of re-running
    let gate = Gate::new(FaultStore::new(store()).inject(Op::Complete, Fault::FailAfter, 1));
    assert!(
        gate.run(&key("f"), None, |_| async { Ok::<_, String>(1) })
            .await
            .is_err()
    );
    assert_eq!(
        gate.run(&key("f"), None, |_| async { Ok::<_, String>(2) })
            .await
            .unwrap(),
        Run::Replayed(1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_reported_lost_is_never_completed() {
    // the first renewal reaches the store only after the lease ran out and another run took the
    // key over: the store answers it `LeaseLost`
    let faulty = FaultStore::new(store());
    faulty.add(Op::Renew, Fault::Delay(LEASE * 2), 0, Some(1));
    // every completion after the owner's fails loudly: a zombie that tried one would show it
    faulty.add(Op::Complete, Fault::FailBefore, 1, None);
    let gate = Gate::new(faulty).with_lease(LEASE);
    let zombie = {
        let gate = gate.clone();
        tokio::spawn(async move {
            gate.run(&key("lost"), None, |_| async {
                tokio::time::sleep(LEASE * 4).await;
                Ok::<_, String>("zombie".to_string())
            })
            .await
        })
    };
    tokio::time::sleep(LEASE * 3 / 2).await;
    let taker = gate
        .run(&key("lost"), None, |_| async {
            Ok::<_, String>("owner".to_string())
        })
        .await;
    assert_eq!(taker.unwrap(), Run::Fresh("owner".to_string()));
    let r = zombie.await.unwrap();
    assert!(
        matches!(r, Err(GateError::Store(Error::LeaseLost))),
        "the gate tried to complete a lease its heartbeat had lost: {r:?}"
    );
    let rec = gate.store().get(&key("lost")).await.unwrap().unwrap();
    assert_eq!(rec.outcome().unwrap().body.as_ref(), b"\"owner\"");
}

/// The default: ten concurrent callers with one key run the handler once, and the nine others
/// wait for its result instead of getting `InProgress`.
#[tokio::test(start_paused = true)]
async fn concurrent_callers_wait_for_the_result_by_default() {
    let gate = Gate::new(store());
    let runs = Arc::new(AtomicU32::new(0));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..10 {
        let (gate, runs) = (gate.clone(), Arc::clone(&runs));
        calls.spawn(async move {
            gate.run(&key("ten"), None, |_| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, String>(format!("receipt from caller {i}"))
            })
            .await
        });
    }
    let (mut fresh, mut replayed) = (Vec::new(), Vec::new());
    while let Some(joined) = calls.join_next().await {
        match joined.unwrap() {
            Ok(Run::Fresh(r)) => fresh.push(r),
            Ok(Run::Replayed(r)) => replayed.push(r),
            Err(e) => panic!("a caller got {e:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!((fresh.len(), replayed.len()), (1, 9));
    assert!(replayed.iter().all(|r| *r == fresh[0]), "{replayed:?}");
}

/// A store failure prints its cause once: in the message, not again as the source.
#[tokio::test]
async fn a_store_failure_prints_its_cause_once() {
    let gate = Gate::new(FaultStore::new(store()).inject(Op::Claim, Fault::FailBefore, 1));
    let err = gate
        .run(&key("cause"), None, |_| async { Ok::<_, String>(1) })
        .await
        .unwrap_err();
    let shown = err.to_string();
    let inner = match &err {
        GateError::Store(e) => e.to_string(),
        other => panic!("got {other:?}"),
    };
    assert!(shown.starts_with("idempotency store failed: "), "{shown}");
    assert!(shown.ends_with(&inner), "{shown}");
    let mut chain = Vec::new();
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        chain.push(e.to_string());
        source = e.source();
    }
    assert!(chain.iter().all(|c| *c != inner), "{chain:?}");
}

//! The exactly-once checker passes a handler that is, and explains why one is not.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use idemgate_core::{Key, Lease, MemoryStore};
use idemgate_testkit::exactly_once::check_exactly_once;

/// A downstream service: applies each request, and honours idempotency keys when given one.
#[derive(Default)]
struct Downstream {
    // effects per event key
    effects: Mutex<HashMap<String, u64>>,
    seen: Mutex<HashSet<String>>,
}

impl Downstream {
    fn apply(&self, event: &Key, idempotency_key: Option<String>) {
        if let Some(k) = idempotency_key
            && !self.seen.lock().unwrap().insert(k)
        {
            return;
        }
        *self
            .effects
            .lock()
            .unwrap()
            .entry(event.to_string())
            .or_default() += 1;
    }

    fn probe(self: &Arc<Self>) -> impl Fn(Key) -> std::future::Ready<u64> + use<> {
        let this = Arc::clone(self);
        move |k: Key| {
            let n = this
                .effects
                .lock()
                .unwrap()
                .get(&k.to_string())
                .copied()
                .unwrap_or(0);
            std::future::ready(n)
        }
    }
}

fn event() -> Key {
    Key::new("payments", "pay_1/capture").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_passes_the_derived_key_downstream_is_exactly_once() {
    let down = Arc::new(Downstream::default());
    let d = Arc::clone(&down);
    let handler = move |lease: Lease| {
        d.apply(lease.key(), Some(lease.key().derive("charge").to_string()));
        async { Ok::<(), String>(()) }
    };
    check_exactly_once(MemoryStore::new(), &event(), handler, down.probe())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_without_a_downstream_key_fails_the_crash_scenario_with_the_remedy() {
    let down = Arc::new(Downstream::default());
    let d = Arc::clone(&down);
    let handler = move |lease: Lease| {
        d.apply(lease.key(), None);
        async { Ok::<(), String>(()) }
    };
    let err = check_exactly_once(MemoryStore::new(), &event(), handler, down.probe())
        .await
        .unwrap_err();
    assert_eq!(err.scenario, "crash between the effect and the completion");
    assert_eq!(err.effects, 2);
    assert!(err.to_string().contains("derive"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_applies_its_effect_twice_fails_at_once() {
    let down = Arc::new(Downstream::default());
    let d = Arc::clone(&down);
    let handler = move |lease: Lease| {
        d.apply(lease.key(), None);
        d.apply(lease.key(), None);
        async { Ok::<(), String>(()) }
    };
    let err = check_exactly_once(MemoryStore::new(), &event(), handler, down.probe())
        .await
        .unwrap_err();
    assert_eq!((err.scenario, err.effects), ("sequentially", 2), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_is_reported_as_such() {
    let down = Arc::new(Downstream::default());
    let handler = |_lease: Lease| async { Err::<(), String>("card network down".into()) };
    let err = check_exactly_once(MemoryStore::new(), &event(), handler, down.probe())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("card network down"), "{err}");
}

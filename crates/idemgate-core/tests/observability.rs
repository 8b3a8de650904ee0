//! The Gate's metrics: one counter per outcome, take-overs, store latency.
#![cfg(feature = "metrics")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemgate_core::{Fingerprint, Gate, GateError, Key, ManualClock, MemoryStore};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, KeyName, Metadata, Recorder, SharedString,
    Unit,
};

/// Counts every counter increment and histogram sample by `name{labels}`.
#[derive(Clone, Default, Debug)]
struct Tally(Arc<Mutex<HashMap<String, u64>>>);

struct Cell(String, Tally);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        *self.1.0.lock().unwrap().entry(self.0.clone()).or_default() += value;
    }
    fn absolute(&self, _: u64) {}
}

impl HistogramFn for Cell {
    fn record(&self, _: f64) {
        self.increment(1);
    }
}

fn name(key: &metrics::Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorder for Tally {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &metrics::Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Cell(name(key), self.clone())))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &metrics::Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::new(Cell(name(key), self.clone())))
    }
}

#[test]
fn gate_counts_every_outcome() {
    let tally = Tally::default();
    metrics::with_local_recorder(&tally, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let clock = ManualClock::new();
            let store = MemoryStore::builder()
                .with_clock(clock.clone())
                .build()
                .unwrap();
            let gate = Gate::new(store)
                .with_lease(Duration::from_secs(10))
                .with_in_progress_policy(idemgate_core::InProgressPolicy::Reject);
            let key = Key::new("m", "k").unwrap();
            let fp = Fingerprint::of(b"a");
            assert!(
                !gate
                    .run(&key, Some(&fp), |_| async { Ok::<_, String>(1) })
                    .await
                    .unwrap()
                    .is_replayed()
            );
            assert!(
                gate.run(&key, Some(&fp), |_| async { Ok::<_, String>(1) })
                    .await
                    .unwrap()
                    .is_replayed()
            );
            let other = Fingerprint::of(b"b");
            assert!(matches!(
                gate.run(&key, Some(&other), |_| async { Ok::<_, String>(1) })
                    .await,
                Err(GateError::Mismatch { .. })
            ));
            let _ = gate
                .run(&Key::new("m", "err").unwrap(), None, |_| async {
                    Err::<u8, _>("no")
                })
                .await;

            // an abandoned claim, taken over after its lease
            let stuck = Key::new("m", "stuck").unwrap();
            let _ =
                idemgate_core::StoreExt::claim_for(gate.store(), &stuck, Duration::from_secs(10))
                    .await
                    .unwrap();
            assert!(matches!(
                gate.run(&stuck, None, |_| async { Ok::<_, String>(2) })
                    .await,
                Err(GateError::InProgress { .. })
            ));
            clock.advance(Duration::from_secs(11));
            assert!(
                !gate
                    .run(&stuck, None, |_| async { Ok::<_, String>(2) })
                    .await
                    .unwrap()
                    .is_replayed()
            );
        });
    });
    let t = tally.0.lock().unwrap();
    let get = |k: &str| t.get(k).copied().unwrap_or(0);
    assert_eq!(get("idemgate_gate_total{outcome=fresh}"), 2, "{t:?}");
    assert_eq!(get("idemgate_gate_total{outcome=replayed}"), 1, "{t:?}");
    assert_eq!(get("idemgate_gate_total{outcome=mismatch}"), 1, "{t:?}");
    assert_eq!(get("idemgate_gate_total{outcome=failed}"), 1, "{t:?}");
    assert_eq!(get("idemgate_gate_total{outcome=in_progress}"), 1, "{t:?}");
    assert_eq!(get("idemgate_takeovers_total{}"), 1, "{t:?}");
    assert!(get("idemgate_store_seconds{op=claim}") >= 6, "{t:?}");
    assert_eq!(get("idemgate_store_seconds{op=complete}"), 2, "{t:?}");
    assert_eq!(get("idemgate_store_seconds{op=release}"), 1, "{t:?}");
}

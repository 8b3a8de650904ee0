//! The conformance suite and the model test on `MemoryStore`.

use idemgate_core::{ManualClock, MemoryStore};
use idemgate_testkit::conformance::{self, Ctx};

fn store(clock: &ManualClock) -> MemoryStore {
    MemoryStore::builder()
        .with_clock(clock.clone())
        .build()
        .unwrap()
}

idemgate_testkit::conformance_tests!(async {
    let clock = ManualClock::new();
    Ctx::manual(store(&clock), clock)
});

#[tokio::test]
async fn capacity() {
    let clock = ManualClock::new();
    let bounded = MemoryStore::builder()
        .with_clock(clock.clone())
        .with_capacity(5)
        .with_shards(3)
        .build()
        .unwrap();
    conformance::capacity(&Ctx::manual(bounded, clock), 5).await;
}

#[test]
fn matches_reference_model() {
    idemgate_testkit::model::check_against_model(256, |clock| store(&clock));
}

#[test]
fn zero_shards_is_a_config_error() {
    assert!(matches!(
        MemoryStore::builder().with_shards(0).build(),
        Err(idemgate_core::Error::Config { .. })
    ));
}

//! The conformance suite and the model test on `SqliteStore`, each test on its own file.

use idemgate_core::ManualClock;
use idemgate_sqlite::SqliteStore;
use idemgate_testkit::conformance::Ctx;

idemgate_testkit::conformance_tests!(async {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new();
    let store = SqliteStore::builder()
        .with_path(dir.path().join("store.db"))
        .with_clock(clock.clone())
        .build()
        .unwrap();
    Ctx::manual(store, clock).keep(dir)
});

#[test]
fn matches_reference_model() {
    idemgate_testkit::model::check_against_model(128, |clock| {
        SqliteStore::builder()
            .with_path(":memory:")
            .with_clock(clock)
            .build()
            .unwrap()
    });
}

#[test]
fn matches_reference_model_without_group_commit() {
    idemgate_testkit::model::check_against_model(32, |clock| {
        SqliteStore::builder()
            .with_path(":memory:")
            .with_max_batch(1)
            .with_clock(clock)
            .build()
            .unwrap()
    });
}

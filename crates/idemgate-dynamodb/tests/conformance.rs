//! The conformance suite and the reference model against moto's DynamoDB endpoint (started by
//! `scripts/brokers dynamodb`, on :4567), one table per test binary and a key scope per test. The store judges
//! expiry by the host's clock, so the tests move a manual clock instead of sleeping.

use std::sync::atomic::{AtomicU32, Ordering};

use idemgate_core::ManualClock;
use idemgate_dynamodb::DynamoStore;
use idemgate_testkit::conformance::Ctx;
use idemgate_testkit::service;

static N: AtomicU32 = AtomicU32::new(0);

fn endpoint() -> String {
    service::url("IDEMGATE_DYNAMODB_ENDPOINT", "http://127.0.0.1:4567")
}

async fn store(clock: &ManualClock) -> Option<DynamoStore> {
    let table = format!(
        "idemgate_t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let store = DynamoStore::local(&endpoint(), table).with_clock(clock.clone());
    service::connect("DynamoDB (moto)", async {
        store.migrate().await.map(|()| store)
    })
    .await
}

idemgate_testkit::conformance_tests!(async {
    let clock = ManualClock::new();
    store(&clock).await.map(|s| Ctx::manual(s, clock))
});

#[test]
fn matches_reference_model() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(base) = rt.block_on(store(&ManualClock::new())) else {
        return;
    };
    let table = base.table().to_owned();
    // every case starts on an empty table: the model's three keys are deleted first
    idemgate_testkit::model::check_against_model(24, move |clock| {
        rt.block_on(async {
            for i in 0..3 {
                base.client()
                    .delete_item()
                    .table_name(&table)
                    .key(
                        "pk",
                        aws_sdk_dynamodb::types::AttributeValue::S(format!("5:model/k{i}")),
                    )
                    .send()
                    .await
                    .unwrap();
            }
        });
        DynamoStore::local(&endpoint(), table.clone()).with_clock(clock)
    });
}

#[test]
fn urls_name_a_table_and_refuse_what_they_do_not_know() {
    assert!(DynamoStore::from_url("dynamodb://records?endpoint=http://127.0.0.1:4567").is_ok());
    for bad in [
        "dynamodb://",
        "dynamodb://?region=eu-west-1",
        "dynamodb://t?colour=blue",
        "redis://x",
    ] {
        assert!(
            matches!(
                DynamoStore::from_url(bad),
                Err(idemgate_core::Error::Config { .. })
            ),
            "{bad} was accepted"
        );
    }
}

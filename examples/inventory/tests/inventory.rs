//! Duplicates (fresh and same event ids) and a crash before the ack, through RabbitMQ and the
//! PostgreSQL inbox: every order line reserved once, stock never oversold.

use idemgate_example_inventory::{Inventory, run};
use idemgate_testkit::service;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_a_crash_never_oversell() {
    let Some(pool) = service::connect(
        "PostgreSQL",
        sqlx::PgPool::connect(&service::url(
            "IDEMGATE_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        )),
    )
    .await
    else {
        return;
    };
    let prefix = format!("inventory_test_{}", std::process::id());
    // scarce stock: some lines must be refused, and none may be reserved twice
    let skus = ["apple", "pear", "plum"];
    let inventory = Inventory::setup(pool, &prefix, &skus.map(|s| (s, 90)))
        .await
        .unwrap();
    let rabbit = service::url("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let (published, first, second) = run(&rabbit, &inventory, &prefix, 60, &skus).await.unwrap();
    let report = inventory.report().await.unwrap();
    // 60 orders of 1-3 lines: 120 lines
    report
        .check(120)
        .unwrap_or_else(|e| panic!("{e}\n{report}"));
    assert!(
        published > 120 + 40,
        "duplicates were published: {published}"
    );
    // the report is the witness of exactly once: a crash loses the counts of what it
    // committed last, so the counts can only fall short of it
    assert!(
        first.handled + second.handled <= 120,
        "{first:?} {second:?}"
    );
    assert!(
        second.handled >= 120 - first.received,
        "{first:?} {second:?}"
    );
    assert!(
        second.duplicates > 0 && second.received > 0,
        "the crashed consumer's messages came back: {second:?}"
    );
    let out_of_stock = report
        .skus
        .iter()
        .any(|(_, _, available, _)| *available < 5);
    assert!(out_of_stock, "the stock ran short: {report}");
}

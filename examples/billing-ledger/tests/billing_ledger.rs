//! One Kafka stream, two services on two databases, re-publishes and crashes before the acks:
//! the billed totals, the ledger balances and the true totals are the same.

use idemgate_example_billing_ledger::{Billing, Ledger, kafka, publish, run_services};
use idemgate_testkit::service;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_and_ledger_agree_under_duplicates_and_crashes() {
    let kafka = kafka(&service::url("KAFKA_BOOTSTRAP", "127.0.0.1:9092"));
    let prefix = format!("billing_test_{}", std::process::id());
    let topic = prefix.replace('_', "-");
    let Some(()) = service::connect("Kafka", kafka.create_topic(&topic, 3)).await else {
        return;
    };
    let pg = sqlx::PgPool::connect(&service::url(
        "IDEMGATE_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    ))
    .await
    .expect("PostgreSQL");
    let my = sqlx::MySqlPool::connect(&service::url(
        "IDEMGATE_MYSQL_URL",
        "mysql://root@127.0.0.1:3306/test",
    ))
    .await
    .expect("MariaDB");
    let billing = Billing::setup(pg, &prefix).await.unwrap();
    let ledger = Ledger::setup(my, &prefix).await.unwrap();
    let (published, expected) = publish(&kafka.sink().unwrap(), &topic, 300, 12)
        .await
        .unwrap();
    assert_eq!(published, 360);
    let [b, l] = run_services(&kafka, &topic, &billing, &ledger)
        .await
        .unwrap();
    for (first, then) in [b, l] {
        assert!(
            first.handled >= 1,
            "the first instance committed before dying: {first:?}"
        );
        // a crash loses the counts of what it committed last: the totals below are the
        // witness of exactly once; the counts can only fall short of them
        assert!(first.handled + then.handled <= 300, "{first:?} {then:?}");
        assert!(then.handled >= 300 - first.received, "{first:?} {then:?}");
        assert!(
            then.received + first.handled + first.duplicates <= 360,
            "nothing committed was consumed again: {first:?} {then:?}"
        );
    }
    assert_eq!(billing.totals().await.unwrap(), expected);
    assert_eq!(ledger.totals().await.unwrap(), expected);
}

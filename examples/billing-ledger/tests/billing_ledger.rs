//! Charges, billing (inbox + outbox), a relay, invoices, ledger: re-publishes and crashes
//! before the acks, and the billed totals, the ledger balances and the true totals are the same.

use idemgate_example_billing_ledger::{Billing, Ledger, kafka, publish, run_services};
use idemgate_testkit::service;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_and_ledger_agree_under_duplicates_and_crashes() {
    let kafka = kafka(&service::url("KAFKA_BOOTSTRAP", "127.0.0.1:9092"));
    let prefix = format!("billing_test_{}", std::process::id());
    let topic = prefix.replace('_', "-");
    let invoices = format!("{topic}-invoices");
    let Some(()) = service::connect("Kafka", kafka.create_topic(&topic, 3)).await else {
        return;
    };
    kafka.create_topic(&invoices, 3).await.unwrap();
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
    let billing = Billing::setup(pg, &prefix, &invoices).await.unwrap();
    let ledger = Ledger::setup(my, &prefix).await.unwrap();
    let (published, expected) = publish(&kafka.sink().unwrap(), &topic, 300, 12)
        .await
        .unwrap();
    assert_eq!(published, 360);
    let [b, l] = run_services(&kafka, &topic, &invoices, &billing, &ledger)
        .await
        .unwrap();
    // every invoice left the outbox, and the ledger handled each once (an invoice is one
    // charge: the ledger's handled counts can only fall short of the charges)
    assert_eq!(billing.pending_invoices().await.unwrap(), 0);
    let (first, then) = l;
    assert!(first.handled + then.handled <= 300, "{first:?} {then:?}");
    let (first, then) = b;
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
    assert_eq!(billing.totals().await.unwrap(), expected);
    // one entry per charge, through the invoices: nothing lost, nothing booked twice
    assert_eq!(ledger.totals().await.unwrap(), expected);
}

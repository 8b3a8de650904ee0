//! Runs the chain (charges, billing with its outbox, a relay, invoices, ledger) against the
//! local Kafka-protocol broker (`scripts/brokers kafka`), PostgreSQL and MariaDB: charges with
//! re-publishes, both services crashing before their acks and resuming, then the totals side
//! by side. `KAFKA_BOOTSTRAP`, `IDEMGATE_POSTGRES_URL`,
//! `IDEMGATE_MYSQL_URL` override the local defaults.

use idemgate_example_billing_ledger::{Billing, BoxError, Ledger, kafka, publish, run_services};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let prefix = format!("billing_demo_{}", std::process::id());
    let pg = sqlx::PgPool::connect(&env(
        "IDEMGATE_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    ))
    .await?;
    let my = sqlx::MySqlPool::connect(&env(
        "IDEMGATE_MYSQL_URL",
        "mysql://root@127.0.0.1:3306/test",
    ))
    .await?;
    let kafka = kafka(&env("KAFKA_BOOTSTRAP", "127.0.0.1:9092"));
    let topic = prefix.replace('_', "-");
    let invoices = format!("{topic}-invoices");
    kafka.create_topic(&topic, 3).await?;
    kafka.create_topic(&invoices, 3).await?;
    let (billing, ledger) = (
        Billing::setup(pg, &prefix, &invoices).await?,
        Ledger::setup(my, &prefix).await?,
    );
    let (published, expected) = publish(&kafka.sink()?, &topic, 1000, 25).await?;
    println!("{published} messages published for 1000 charges (every fifth twice)");
    let [b, l] = run_services(&kafka, &topic, &invoices, &billing, &ledger).await?;
    println!("billing: first {:?}\n         then  {:?}", b.0, b.1);
    println!("ledger:  first {:?}\n         then  {:?}", l.0, l.1);
    let (billed, booked) = (billing.totals().await?, ledger.totals().await?);
    println!(
        "{:<8} {:>10} {:>10} {:>10}",
        "customer", "charged", "billed", "ledger"
    );
    for (customer, cents) in &expected {
        println!(
            "{customer:<8} {cents:>10} {:>10} {:>10}",
            billed.get(customer).copied().unwrap_or_default(),
            booked.get(customer).copied().unwrap_or_default()
        );
    }
    if billed == expected && booked == expected && billing.pending_invoices().await? == 0 {
        println!("billing and ledger agree with every charge, each counted once");
        Ok(())
    } else {
        Err("the totals drifted".into())
    }
}

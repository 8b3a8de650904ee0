//! Runs the inventory service against the local RabbitMQ and PostgreSQL: publishes order lines
//! with duplicates, crashes a first consumer after its first commit, drains with a second, and prints the
//! stock. `RABBITMQ_URL`, `IDEMGATE_POSTGRES_URL` override the local defaults.

use idemgate_example_inventory::{BoxError, Inventory, run};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let pool = sqlx::PgPool::connect(&env(
        "IDEMGATE_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    ))
    .await?;
    let skus = ["apple", "pear", "plum", "fig"];
    let prefix = format!("inventory_demo_{}", std::process::id());
    let inventory = Inventory::setup(pool, &prefix, &skus.map(|s| (s, 120))).await?;
    let rabbit = env("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let (published, first, second) = run(&rabbit, &inventory, &prefix, 150, &skus).await?;
    let report = inventory.report().await?;
    println!("{published} messages published for 300 order lines (with duplicates)");
    println!("first consumer (crashed after its first commit): {first:?}");
    println!("second consumer: {second:?}");
    println!("{report}");
    match report.check(300) {
        Ok(()) => println!("every line reserved once; nothing oversold"),
        Err(e) => {
            eprintln!("FAILED: {e}");
            std::process::exit(1);
        }
    }
    Ok(())
}

//! The payments API: `cargo run -p idemgate-example-payments --bin payments`.
use idemgate::postgres::PostgresStore;
use idemgate_example_payments::{app, card_network, migrate};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("IDEMGATE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = sqlx::PgPool::connect(&url).await?;
    migrate(&pool, "payments").await?;
    let store = PostgresStore::builder()
        .with_pool(pool.clone())
        .with_table("payments_idempotency")
        .build()?;
    store.migrate().await?;
    // the stub card network, on its own port
    let network = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    tokio::spawn(async move { axum::serve(network, card_network()).await });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("payments API on http://127.0.0.1:3000, card network on http://127.0.0.1:3001");
    axum::serve(
        listener,
        app(pool, "payments", store, "http://127.0.0.1:3001"),
    )
    .await?;
    Ok(())
}

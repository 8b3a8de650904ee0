//! The payments service on `ADDR` (default 127.0.0.1:50051), keys in the store at `STORE`
//! (default `memory:`), scoped by the `x-tenant` metadata.

use std::sync::Arc;

use idemgate::http::IdempotencyLayer;
use idemgate_example_grpc_payments::{Ledger, PaymentsService};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let store =
        idemgate::open(&std::env::var("STORE").unwrap_or_else(|_| "memory:".into())).await?;
    let layer = IdempotencyLayer::new(store, |parts| {
        parts
            .headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
    .for_grpc();
    let service = PaymentsService::new(Arc::new(Ledger::default()));
    eprintln!("payments on {addr}");
    tonic::transport::Server::builder()
        .layer(layer)
        .add_service(service.into_server())
        .serve_with_shutdown(addr.parse()?, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

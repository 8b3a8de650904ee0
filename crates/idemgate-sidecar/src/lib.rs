//! idemgate for services in any language.
//!
//! [`Bridge`] is the other half, behind `idemgate bridge`: it consumes from any broker the
//! consumer runtime supports and POSTs each event to the service with its event id as the
//! `Idempotency-Key`.
//!
//! [`Proxy`] is the `Idempotency-Key` reverse proxy behind `idemgate proxy`: put it in front
//! of a service written in Python, Node, Java or anything else that speaks HTTP, and a retried
//! POST gets the first response replayed instead of a second run, with the store, the lease
//! renewal, the fencing and the problem documents of the Rust
//! [`IdempotencyLayer`](idemgate::http::IdempotencyLayer).
//!
//! ```no_run
//! use idemgate_sidecar::{Proxy, ProxyOptions, Routes};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = idemgate::open("redis://127.0.0.1:6379").await?;
//! let opts = ProxyOptions::new("http://127.0.0.1:8000".parse()?, Some("x-user-id".parse()?));
//! let proxy = Proxy::new(store, Routes::from_file("routes.toml")?, opts)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! proxy.serve(listener, async { tokio::signal::ctrl_c().await.unwrap_or(()) }).await?;
//! # Ok(()) }
//! ```

mod bridge;
mod metrics;
mod proxy;
mod routes;

pub use bridge::{Bridge, BridgeOptions};
pub use metrics::{serve_metrics, serve_recorded};
pub use proxy::{Proxy, ProxyError, ProxyOptions, install_prometheus};
pub use routes::{ConfigError, Route, Routes};

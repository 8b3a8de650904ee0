//! The HTTP `Idempotency-Key` layer for tower and axum.
//!
//! [`IdempotencyLayer`] implements the IETF draft "The Idempotency-Key HTTP Header Field" over
//! any idemgate [`Store`](idemgate_core::Store): a retried POST gets the first response
//! replayed, a concurrent retry gets 409, the same key with another body gets 422, and every
//! error is an RFC 9457 problem with a stable type.
//!
//! ```
//! use axum::{Router, routing::post};
//! use idemgate_core::MemoryStore;
//! use idemgate_http::IdempotencyLayer;
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { "created" }))
//!     .layer(IdempotencyLayer::new(MemoryStore::new(), |parts| {
//!         // the authenticated principal; here a header set by an auth proxy
//!         parts.headers.get("x-user").and_then(|v| v.to_str().ok()).map(str::to_owned)
//!     }));
//! ```

mod header;
mod layer;
mod problem;

pub use header::{KeyError, format_key, parse_key};
pub use layer::{BoxError, Idempotency, IdempotencyLayer, Profile, RequestKey, ScopeFn};
pub use problem::Problem;

/// The layer's response future.
pub mod future {
    use std::future::Future;
    use std::pin::Pin;

    /// The future of [`Idempotency`](crate::Idempotency)'s `call`.
    pub type ResponseFuture<E> =
        Pin<Box<dyn Future<Output = Result<http::Response<axum::body::Body>, E>> + Send>>;
}

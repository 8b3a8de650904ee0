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
//!
//! The layer wraps any tower service whose request body is generic (axum's `Router` is): it
//! hands on a [`GuardedBody`] (the buffered bytes of a guarded request, or the original body)
//! and answers with a [`ResponseBody`], whatever `http_body::Body` the service returns. It does
//! not depend on axum.

mod body;
mod grpc;
mod header;
mod layer;
mod problem;

pub use body::{GuardedBody, ResponseBody};

pub use header::{KeyError, format_key, parse_key};
pub use layer::{
    BodyFingerprintFn, BodyKeyFn, BoxError, Final, Idempotency, IdempotencyLayer, Oversized,
    Profile, RequestKey, ScopeFn, UNSTORED_HEADERS,
};
pub use problem::Problem;

/// The layer's response future.
pub mod future {
    use std::fmt;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio_util::task::TaskTracker;

    use crate::ResponseBody;

    type Boxed<E> = Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>, E>> + Send>>;

    /// The future of [`Idempotency`](crate::Idempotency)'s `call`.
    ///
    /// A guarded request's future is *detached* when dropped unfinished (its client went away,
    /// and the server dropped the connection's work): the rest of it runs on the runtime, so a
    /// claimed key's handler runs to its end, its response is stored, and a retry gets the
    /// replay instead of a second run. Other requests are cancelled as usual.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<E: Send + 'static> {
        fut: Option<Boxed<E>>,
        // where a dropped, unfinished future goes on (guarded requests only)
        detach: Option<TaskTracker>,
    }

    impl<E: Send + 'static> ResponseFuture<E> {
        pub(crate) fn attached(fut: Boxed<E>) -> Self {
            ResponseFuture {
                fut: Some(fut),
                detach: None,
            }
        }

        pub(crate) fn detached(fut: Boxed<E>, running: TaskTracker) -> Self {
            ResponseFuture {
                fut: Some(fut),
                detach: Some(running),
            }
        }
    }

    impl<E: Send + 'static> Future for ResponseFuture<E> {
        type Output = Result<http::Response<ResponseBody>, E>;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let Some(fut) = self.fut.as_mut() else {
                panic!("ResponseFuture polled after it completed");
            };
            let out = fut.as_mut().poll(cx);
            if out.is_ready() {
                self.fut = None;
            }
            out
        }
    }

    impl<E: Send + 'static> Drop for ResponseFuture<E> {
        fn drop(&mut self) {
            if let (Some(running), Some(fut)) = (self.detach.take(), self.fut.take())
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                // with no runtime left, the lease guard inside lets the lease run out
                rt.spawn(running.track_future(async move {
                    let _ = fut.await;
                }));
            }
        }
    }

    impl<E: Send + 'static> fmt::Debug for ResponseFuture<E> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ResponseFuture")
                .field("done", &self.fut.is_none())
                .field("detach", &self.detach.is_some())
                .finish()
        }
    }
}

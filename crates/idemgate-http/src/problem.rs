//! RFC 9457 problem details for every error the layer answers with.

use http::{HeaderValue, Response, StatusCode, header};

/// The cases the layer answers itself, each with a stable problem `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// 400: the request needs an `Idempotency-Key` and has none. Terminal.
    MissingKey,
    /// 400: the key is empty, too long or malformed. Terminal.
    InvalidKey,
    /// 400: the scope function found no principal for the request. Terminal.
    MissingScope,
    /// 409: the first request with this key is still running. Retryable (`Retry-After`).
    InProgress,
    /// 413: the body is over the layer's buffer limit. Terminal.
    BodyTooLarge,
    /// 400: the request body could not be read (the client went away mid-body). Retryable.
    UnreadableBody,
    /// 400: the body lacks what the key or the fingerprint is taken from
    /// ([`IdempotencyLayer::with_key`](crate::IdempotencyLayer::with_key),
    /// [`with_fingerprint`](crate::IdempotencyLayer::with_fingerprint)). Terminal.
    InvalidPayload,
    /// 422: the key was used with a different request. Terminal.
    Mismatch,
    /// 503: the idempotency store failed. Retryable.
    StoreUnavailable,
    /// 410: the first request with this key completed, but its response was over the layer's
    /// limit and was not stored ([`Oversized::Complete`](crate::Oversized::Complete)); the
    /// handler does not run again. Terminal.
    ResponseNotStored,
    /// 502: a proxy could not reach its upstream, or lost it before the response (the
    /// sidecar's `idemgate proxy`); the key is released. Retryable.
    UpstreamUnavailable,
    /// 504: a proxy's upstream did not answer in time; the key is released. Retryable.
    UpstreamTimeout,
}

impl Problem {
    /// The problem's stable `type` URI.
    pub fn type_uri(self) -> &'static str {
        match self {
            Problem::MissingKey => "https://idemgate.dev/problems/missing-idempotency-key",
            Problem::InvalidKey => "https://idemgate.dev/problems/invalid-idempotency-key",
            Problem::MissingScope => "https://idemgate.dev/problems/missing-scope",
            Problem::InProgress => "https://idemgate.dev/problems/request-in-progress",
            Problem::BodyTooLarge => "https://idemgate.dev/problems/body-too-large",
            Problem::UnreadableBody => "https://idemgate.dev/problems/unreadable-body",
            Problem::InvalidPayload => "https://idemgate.dev/problems/invalid-payload",
            Problem::Mismatch => "https://idemgate.dev/problems/idempotency-key-reused",
            Problem::StoreUnavailable => "https://idemgate.dev/problems/store-unavailable",
            Problem::ResponseNotStored => "https://idemgate.dev/problems/response-not-stored",
            Problem::UpstreamUnavailable => "https://idemgate.dev/problems/upstream-unavailable",
            Problem::UpstreamTimeout => "https://idemgate.dev/problems/upstream-timeout",
        }
    }

    /// The status code.
    pub fn status(self) -> StatusCode {
        match self {
            Problem::MissingKey
            | Problem::InvalidKey
            | Problem::MissingScope
            | Problem::UnreadableBody
            | Problem::InvalidPayload => StatusCode::BAD_REQUEST,
            Problem::InProgress => StatusCode::CONFLICT,
            Problem::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Problem::ResponseNotStored => StatusCode::GONE,
            Problem::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Problem::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `grpc-status` a gRPC call gets instead ([`IdempotencyLayer::for_grpc`]), after the
    /// gRPC status-code guide (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>: use
    /// `ABORTED` when the client should retry at a higher level, `FAILED_PRECONDITION` when it
    /// should not retry until the system state is fixed): a missing or invalid key or payload is `INVALID_ARGUMENT` (3), no principal
    /// `UNAUTHENTICATED` (16), a running first call `ABORTED` (10: retry the call later, with
    /// `google.rpc.RetryInfo`), a key reused with another request `FAILED_PRECONDITION` (9: do
    /// not retry until the request is fixed), a request over the size limit
    /// `RESOURCE_EXHAUSTED` (8), a completed call whose response was not stored
    /// `ALREADY_EXISTS` (6), an unreadable body, a store or an upstream that failed
    /// `UNAVAILABLE` (14), an upstream timeout `DEADLINE_EXCEEDED` (4).
    ///
    /// [`IdempotencyLayer::for_grpc`]: crate::IdempotencyLayer::for_grpc
    pub fn grpc_code(self) -> u16 {
        use crate::grpc::code;
        match self {
            Problem::MissingKey | Problem::InvalidKey | Problem::InvalidPayload => {
                code::INVALID_ARGUMENT
            }
            Problem::MissingScope => code::UNAUTHENTICATED,
            Problem::InProgress => code::ABORTED,
            Problem::BodyTooLarge => code::RESOURCE_EXHAUSTED,
            Problem::Mismatch => code::FAILED_PRECONDITION,
            Problem::ResponseNotStored => code::ALREADY_EXISTS,
            Problem::UnreadableBody | Problem::StoreUnavailable | Problem::UpstreamUnavailable => {
                code::UNAVAILABLE
            }
            Problem::UpstreamTimeout => code::DEADLINE_EXCEEDED,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Problem::MissingKey => "This request requires an Idempotency-Key header",
            Problem::InvalidKey => "The Idempotency-Key header is invalid",
            Problem::MissingScope => "The request has no principal to scope its Idempotency-Key",
            Problem::InProgress => "A request with this Idempotency-Key is still being processed",
            Problem::BodyTooLarge => "The request body is too large to be made idempotent",
            Problem::UnreadableBody => "The request body could not be read",
            Problem::InvalidPayload => {
                "The request body lacks what its idempotency key or fingerprint is taken from"
            }
            Problem::Mismatch => "This Idempotency-Key was already used with a different request",
            Problem::StoreUnavailable => "The idempotency store is unavailable",
            Problem::ResponseNotStored => {
                "The request with this Idempotency-Key completed, but its response was not stored"
            }
            Problem::UpstreamUnavailable => "The upstream service could not be reached",
            Problem::UpstreamTimeout => "The upstream service did not answer in time",
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Problem::InProgress
                | Problem::StoreUnavailable
                | Problem::UnreadableBody
                | Problem::UpstreamUnavailable
                | Problem::UpstreamTimeout
        )
    }

    /// The `application/problem+json` response, with `detail`.
    pub fn response(self, detail: &str) -> Response<crate::ResponseBody> {
        let body = serde_json::json!({
            "type": self.type_uri(),
            "title": self.title(),
            "status": self.status().as_u16(),
            "detail": detail,
            "retryable": self.is_retryable(),
        });
        let mut res = Response::new(crate::body::full(body.to_string()));
        *res.status_mut() = self.status();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        res
    }
}

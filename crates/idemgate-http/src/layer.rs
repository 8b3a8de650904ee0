//! `IdempotencyLayer` and the `Idempotency` service.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use idemgate_core::{
    Claim, ClaimOptions, Fingerprint, Key, Lease, LeaseGuard, Outcome, Store, keep_alive,
};
use tower::{Layer, Service};

use crate::future::ResponseFuture;
use crate::header::parse_key;
use crate::problem::Problem;

/// The idempotency key of the request being handled, in the request's extensions: pass
/// `key.derive("step")` to downstream systems so a re-run after a crash is harmless there too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestKey(pub Key);

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A boxed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Picks the principal a key belongs to from the request (an authenticated user or tenant in
/// the request extensions, an API key's owner); `None` when the request has none.
pub type ScopeFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// Which responses are stored and replayed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Profile {
    /// 2xx and 4xx except 408, 409, 425 and 429 are stored; a 5xx (or one of those) releases the
    /// key so a retry runs again. The default, after the IETF draft.
    #[default]
    Ietf,
    /// Every response is stored once the handler has started, 5xx included (Stripe's behaviour).
    Stripe,
}

impl Profile {
    fn stores(self, status: StatusCode) -> bool {
        match self {
            Profile::Stripe => true,
            Profile::Ietf => {
                status.is_success()
                    || (status.is_client_error()
                        && !matches!(status.as_u16(), 408 | 409 | 425 | 429))
            }
        }
    }
}

impl<St> Clone for Config<St> {
    fn clone(&self) -> Self {
        Config {
            store: Arc::clone(&self.store),
            scope: self.scope.clone(),
            methods: self.methods.clone(),
            required: self.required,
            max_body: self.max_body,
            max_response: self.max_response,
            lease: self.lease,
            retention: self.retention,
            profile: self.profile,
            wait: self.wait,
            fingerprint_headers: self.fingerprint_headers.clone(),
        }
    }
}

struct Config<St> {
    store: Arc<St>,
    scope: Option<ScopeFn>,
    methods: Vec<Method>,
    required: bool,
    max_body: usize,
    max_response: usize,
    lease: Duration,
    retention: Duration,
    profile: Profile,
    wait: Option<Duration>,
    fingerprint_headers: Vec<HeaderName>,
}

/// A tower [`Layer`] that makes POST and PATCH (by default) idempotent by their
/// `Idempotency-Key` header: the first request runs, a retry gets the stored response replayed
/// byte for byte (with `Idempotent-Replayed: true`), a retry while the first still runs gets 409
/// with `Retry-After`, and the same key with a different request gets 422. Errors are RFC 9457
/// `application/problem+json` with a stable `type` per case ([`Problem`]).
///
/// Keys are scoped by a [`ScopeFn`] (the authenticated principal), so one client can never
/// receive another's stored response; running without a scope is an explicit opt-in
/// ([`IdempotencyLayer::unscoped`]).
///
/// # Clone
/// Cheap: clones share the configuration and the store.
pub struct IdempotencyLayer<St> {
    config: Arc<Config<St>>,
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            config: Arc::clone(&self.config),
        }
    }
}

impl<St> std::fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("methods", &self.config.methods)
            .field("required", &self.config.required)
            .field("profile", &self.config.profile)
            .finish_non_exhaustive()
    }
}

impl<St: Store> IdempotencyLayer<St> {
    /// A layer over `store`, scoping every key by `scope` (the request's principal).
    pub fn new(
        store: St,
        scope: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self::build(store, Some(Arc::new(scope)))
    }

    /// A layer whose keys share one scope: any client can replay any key's response. Only for
    /// services where every caller is the same principal.
    pub fn unscoped(store: St) -> Self {
        Self::build(store, None)
    }

    fn build(store: St, scope: Option<ScopeFn>) -> Self {
        IdempotencyLayer {
            config: Arc::new(Config {
                store: Arc::new(store),
                scope,
                methods: vec![Method::POST, Method::PATCH],
                required: true,
                max_body: 1 << 20,
                max_response: 1 << 20,
                lease: Duration::from_secs(30),
                retention: Duration::from_secs(86_400),
                profile: Profile::Ietf,
                wait: None,
                fingerprint_headers: Vec::new(),
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config<St>)) -> Self {
        // a layer configured after it was cloned gets its own copy of the configuration
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The guarded methods (default POST and PATCH).
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with(|c| c.methods = methods)
    }

    /// Whether a guarded request without a key is refused with 400 (default `true`) or passed
    /// through without idempotency.
    pub fn with_key_required(self, required: bool) -> Self {
        self.with(|c| c.required = required)
    }

    /// The largest request body buffered for the fingerprint (default 1 MiB; larger: 413).
    pub fn with_max_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_body = bytes)
    }

    /// The largest response stored (default 1 MiB); a larger one is returned but not stored, and
    /// the key is released.
    pub fn with_max_response(self, bytes: usize) -> Self {
        self.with(|c| c.max_response = bytes)
    }

    /// The lease of a running request (default 30 s), renewed while the handler runs.
    pub fn with_lease(self, lease: Duration) -> Self {
        self.with(|c| c.lease = lease)
    }

    /// How long responses are replayed (default 24 h).
    pub fn with_retention(self, retention: Duration) -> Self {
        self.with(|c| c.retention = retention)
    }

    /// Which responses are stored ([`Profile::Ietf`] by default).
    pub fn with_profile(self, profile: Profile) -> Self {
        self.with(|c| c.profile = profile)
    }

    /// A retry of a running request waits up to `timeout` for the first one's response instead
    /// of getting 409.
    pub fn with_wait(self, timeout: Duration) -> Self {
        self.with(|c| c.wait = Some(timeout))
    }

    /// Request headers that take part in the fingerprint (besides method, path, query, body).
    pub fn with_fingerprint_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.with(|c| c.fingerprint_headers = headers)
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around another.
pub struct Idempotency<S, St> {
    inner: S,
    config: Arc<Config<St>>,
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: std::fmt::Debug, St> std::fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St, B, ResB> Service<Request<B>> for Idempotency<S, St>
where
    S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: HttpBody<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    St: Store,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        // what needs no waiting is decided here: the request's future is only as large as the
        // path it takes
        let key = match admit(&self.config, &parts) {
            Admit::Refuse(response) => return Box::pin(std::future::ready(Ok(response))),
            Admit::Pass => None,
            Admit::Guard(key) => Some(key),
        };
        // the ready service serves this call; a clone takes its place for the next
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        match key {
            None => Box::pin(pass(inner, Request::from_parts(parts, Body::new(body)))),
            Some(key) => Box::pin(handle(Arc::clone(&self.config), inner, key, parts, body)),
        }
    }
}

/// Counts one outcome: `fresh`, `replayed`, `conflict`, `mismatch`, `missing_key`,
/// `invalid_key`, `released`, `store_unavailable`. A literal, so the metric's key is a static
/// (no allocation per request).
macro_rules! count {
    ($outcome:literal) => {{
        tracing::debug!(outcome = $outcome, "idempotency-key request");
        metrics::counter!("idemgate_http_total", "outcome" => $outcome).increment(1);
    }};
}

/// Why a body could not be read whole.
enum ReadError {
    TooLarge,
    Body,
}

/// Reads a whole body, refusing one over `limit` bytes. A body of one data frame (the usual
/// case) is returned as it is, without a copy; more frames are joined. Trailers are dropped.
async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ReadError>
where
    B: HttpBody<Data = Bytes>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| ReadError::Body)?.into_data() else {
            continue;
        };
        len = len.saturating_add(data.len());
        if len > limit {
            return Err(ReadError::TooLarge);
        }
        match (&first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut all = BytesMut::with_capacity(len);
                all.extend_from_slice(f);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
            (Some(_), Some(all)) => all.extend_from_slice(&data),
        }
    }
    Ok(match joined {
        Some(all) => all.freeze(),
        None => first.unwrap_or_default(),
    })
}

async fn pass<S, ResB>(mut inner: S, req: Request<Body>) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<ResB>>,
    ResB: HttpBody<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    Ok(inner.call(req).await?.map(Body::new))
}

/// What a request gets before anything is awaited.
enum Admit {
    /// Not guarded (another method, or no key where none is required): straight to the service.
    Pass,
    /// Refused: a missing or invalid key, or no principal.
    Refuse(Response<Body>),
    /// Guarded by this key.
    Guard(Key),
}

fn admit<St>(config: &Config<St>, parts: &Parts) -> Admit {
    if !config.methods.contains(&parts.method) {
        return Admit::Pass;
    }
    let id = match parts
        .headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| parse_key(v.as_bytes()))
    {
        Some(Ok(id)) => id,
        Some(Err(e)) => {
            count!("invalid_key");
            return Admit::Refuse(Problem::InvalidKey.response(&e.to_string()));
        }
        None if config.required => {
            count!("missing_key");
            return Admit::Refuse(
                Problem::MissingKey.response("send an Idempotency-Key header with this request"),
            );
        }
        None => return Admit::Pass,
    };
    let scope = match &config.scope {
        None => String::new(),
        Some(f) => match f(parts) {
            Some(s) => s,
            None => {
                return Admit::Refuse(
                    Problem::MissingScope.response("the request carries no principal"),
                );
            }
        },
    };
    // the principal and the client's key, length-prefixed: no two principals share a key
    match Key::compose("http", [scope.as_bytes(), id.as_bytes()]) {
        Ok(key) => Admit::Guard(key),
        Err(_) => Admit::Refuse(Problem::InvalidKey.response("the key cannot be stored")),
    }
}

/// The guarded path: an `async` block over the arguments, not an `async fn`. An async fn's
/// future keeps every argument twice (as passed, and moved into its body); this one is boxed for
/// every guarded request, and under about 1 KiB it comes from the allocator's per-thread cache.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn handle<S, St, B, ResB>(
    config: Arc<Config<St>>,
    mut inner: S,
    key: Key,
    parts: Parts,
    body: B,
) -> impl Future<Output = Result<Response<Body>, S::Error>>
where
    S: Service<Request<Body>, Response = Response<ResB>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: HttpBody<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    St: Store,
{
    async move {
        let bytes = match read_body(body, config.max_body).await {
            Ok(bytes) => bytes,
            Err(ReadError::TooLarge) => {
                return Ok(Problem::BodyTooLarge
                    .response(&format!("the body is over {} bytes", config.max_body)));
            }
            Err(ReadError::Body) => {
                return Ok(Problem::UnreadableBody.response("the request body could not be read"));
            }
        };
        // the fingerprint lives only as long as the claim
        let lease = {
            let fp = Fingerprint::of_parts(
                [
                    parts.method.as_str().as_bytes(),
                    parts.uri.path().as_bytes(),
                    parts.uri.query().unwrap_or("").as_bytes(),
                    &bytes,
                ]
                .into_iter()
                .chain(config.fingerprint_headers.iter().flat_map(|h| {
                    let value = parts.headers.get(h).map_or(&b""[..], HeaderValue::as_bytes);
                    [h.as_str().as_bytes(), value]
                })),
            );
            match claim(&config, &key, &fp).await {
                Ok(lease) => lease,
                Err(response) => return Ok(response),
            }
        };
        let mut guard = LeaseGuard::new(&config.store, lease.clone());
        let req = {
            let mut req = Request::from_parts(parts, Body::from(bytes));
            // the handler can derive downstream keys from it (`RequestKey(key).0.derive("charge")`)
            req.extensions_mut().insert(RequestKey(key));
            req
        };
        let (result, _lost) =
            keep_alive(&*config.store, &lease, config.lease, inner.call(req)).await;
        // an error of the service itself leaves the guard armed: dropping it releases the key
        let response = result?;
        let (rparts, rbody) = response.into_parts();
        let body = match read_body(rbody, usize::MAX).await {
            Ok(b) => b,
            Err(_) => {
                let lease = guard.disarm();
                let _ = config.store.release(lease).await;
                let mut res = Response::new(Body::from("the response body failed"));
                *res.status_mut() = StatusCode::BAD_GATEWAY;
                return Ok(res);
            }
        };
        let lease = guard.disarm();
        if config.profile.stores(rparts.status) && body.len() <= config.max_response {
            let outcome = Outcome {
                status: rparts.status.as_u16(),
                meta: rparts.headers.iter().collect(),
                body: body.clone(),
            };
            if let Err(e) = config
                .store
                .complete(&lease, &outcome, config.retention)
                .await
            {
                tracing::warn!(error = %e, "could not store the response; a retry will run again");
            }
            count!("fresh");
        } else {
            let _ = config.store.release(lease).await;
            count!("released");
        }
        Ok(Response::from_parts(rparts, Body::from(body)))
    }
}

/// Claims `key` for a request with fingerprint `fp`, waiting for a running first request under
/// the `Wait` policy; `Err` is the response the request gets instead (a replay, a conflict, a
/// mismatch). Its own future, so the guarded path's future does not hold the loop's state while
/// the handler runs.
async fn claim<St: Store>(
    config: &Config<St>,
    key: &Key,
    fp: &Fingerprint,
) -> Result<Lease, Response<Body>> {
    let opts = ClaimOptions {
        lease: config.lease,
        retention: config.retention,
    };
    let deadline = config.wait.map(|w| tokio::time::Instant::now() + w);
    let mut backoff = Duration::from_millis(10);
    loop {
        // the claim's answer is not kept while a `Wait` sleeps
        let lease_until = match config.store.claim(key, Some(fp), &opts).await {
            Err(e) => {
                count!("store_unavailable");
                return Err(Problem::StoreUnavailable.response(&e.to_string()));
            }
            Ok(Claim::Acquired(lease)) => return Ok(lease),
            Ok(Claim::Completed(record)) => {
                count!("replayed");
                return Err(match record.outcome() {
                    Some(o) => replay(o),
                    None => {
                        Problem::StoreUnavailable.response("a completed record has no response")
                    }
                });
            }
            Ok(Claim::Mismatch { .. }) => {
                count!("mismatch");
                return Err(Problem::Mismatch.response(
                    "the method, path, query or body differ from the first request with this key",
                ));
            }
            Ok(Claim::InProgress { lease_until, .. }) => lease_until,
        };
        let now = tokio::time::Instant::now();
        if let Some(deadline) = deadline.filter(|d| *d > now) {
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
            continue;
        }
        count!("conflict");
        let secs = lease_until
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .as_secs()
            .max(1);
        let mut res = Problem::InProgress
            .response("the first request with this key is still running; retry later");
        res.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        return Err(res);
    }
}

/// The stored response, byte for byte, marked as a replay.
fn replay(o: &Outcome) -> Response<Body> {
    let mut res = Response::new(Body::from(o.body.clone()));
    *res.status_mut() = StatusCode::from_u16(o.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in o.meta.iter_shared() {
        // the value shares the stored buffer: no copy
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value),
        ) {
            res.headers_mut().append(n, v);
        }
    }
    res.headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    res
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use idemgate_core::MemoryStore;

    use super::*;

    /// The guarded path's future is boxed for every request. glibc serves allocations up to
    /// 1,032 bytes from a per-thread cache and larger ones from its bins, several hundred
    /// instructions more each time: keep the future under that line (the service's own future,
    /// here a small one, comes on top).
    #[test]
    fn the_guarded_future_stays_under_the_allocator_cache_line() {
        let layer = IdempotencyLayer::unscoped(MemoryStore::new());
        let inner = tower::service_fn(|_: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let (parts, body) = Request::post("/").body(Body::empty()).unwrap().into_parts();
        let key = Key::new("http", "k").unwrap();
        let fut = handle(Arc::clone(&layer.config), inner, key, parts, body);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1032 - 64, "the guarded future is {size} bytes");
    }
}

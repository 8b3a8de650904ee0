//! `IdempotencyLayer` and the `Idempotency` service.

use std::borrow::Cow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use idemgate_core::backend::{LeaseGuard, keep_alive};
use idemgate_core::{Claim, ClaimOptions, Fingerprint, Key, Lease, Outcome, Store};
use tokio_util::task::TaskTracker;
use tower::{Layer, Service};

use crate::body::{GuardedBody, ResponseBody, boxed, full};
use crate::future::ResponseFuture;
use crate::grpc;
use crate::header::parse_key;
use crate::problem::Problem;

/// The idempotency key of the request being handled, in the request's extensions: pass
/// `key.derive("step")` to downstream systems so a re-run after a crash is harmless there too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestKey(pub Key);

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub use idemgate_core::BoxError;

/// Picks the principal a key belongs to from the request (an authenticated user or tenant in
/// the request extensions, an API key's owner); `None` when the request has none.
pub type ScopeFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// Takes a request's key from its body when it has no `Idempotency-Key` header: `Ok(Some(id))`
/// guards it under `id` (scoped by the principal as a header's key is), `Ok(None)` treats it as
/// a request without a key, `Err` refuses it with 400 `invalid-payload`.
pub type BodyKeyFn = Arc<dyn Fn(&Parts, &[u8]) -> Result<Option<String>, String> + Send + Sync>;

/// Computes a request's fingerprint from its head and body instead of the default (method,
/// path, query, body and the chosen headers); `Err` refuses it with 400 `invalid-payload`.
pub type BodyFingerprintFn =
    Arc<dyn Fn(&Parts, &[u8]) -> Result<Fingerprint, String> + Send + Sync>;

/// Which responses are stored and replayed.
///
/// Under both profiles a response marked [`Final`] is stored whatever its status, and these
/// are not stored unless so marked, so that a request refused before the handler did anything
/// does not use up its key: 400, 401, 403, 404, 405, 406, 411, 413, 414, 415, 422 and 431
/// ([`Profile::is_rejection`]). A client that fixes its credentials or its body retries with
/// the same key. A handler that answers one of these after it had an effect marks it
/// [`Final`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Profile {
    /// 2xx and 4xx except 408, 409, 425, 429 and the rejections are stored; a 5xx (or one of
    /// those) releases the key so a retry runs again. The default, after the IETF draft.
    #[default]
    Ietf,
    /// Every response but the rejections is stored once the handler has started, 5xx included
    /// (Stripe's behaviour).
    Stripe,
}

impl Profile {
    /// Whether `status` says the request was refused before any effect (a malformed body,
    /// missing credentials, an unknown route): such a response is stored only when marked
    /// [`Final`].
    pub fn is_rejection(status: StatusCode) -> bool {
        matches!(
            status.as_u16(),
            400 | 401 | 403 | 404 | 405 | 406 | 411 | 413 | 414 | 415 | 422 | 431
        )
    }

    /// Whether a response with `status` is stored (`marked`: it carries [`Final`]).
    pub fn stores(self, status: StatusCode, marked: bool) -> bool {
        if marked {
            return true;
        }
        if Self::is_rejection(status) {
            return false;
        }
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

/// A response extension that marks the response as the key's final answer: it is stored and
/// replayed whatever its status (a 400 or 422 the handler gave after it had an effect).
///
/// ```
/// use axum::{Extension, http::StatusCode, response::IntoResponse};
/// use idemgate_http::Final;
///
/// async fn handler() -> impl IntoResponse {
///     // the stock was reserved, then the order refused: a retry must not reserve again
///     (StatusCode::UNPROCESSABLE_ENTITY, Extension(Final), "over the order limit")
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Final;

/// What happens to a response over [`IdempotencyLayer::with_max_response`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Oversized {
    /// The response streams through to the client, and the key is completed with a record that
    /// says its response was not stored: a retry gets 410 with the problem type
    /// `response-not-stored` (and the first response's status), and the handler never runs
    /// again. The default.
    #[default]
    Complete,
    /// The response streams through and the key is released: a retry runs the handler again.
    /// Only for handlers whose effects are idempotent downstream.
    Release,
}

/// Response headers that are neither stored nor replayed by default: cookies belong to the
/// first client's session, and hop-by-hop headers to its connection.
pub const UNSTORED_HEADERS: [HeaderName; 9] = [
    http::header::SET_COOKIE,
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// The stored metadata name of a record whose response was over the limit: not a valid header
/// name, so it never comes from a response, and a replay never sends it.
const NOT_STORED: &str = ":not-stored";

/// The prefix of a stored trailer's name: not valid in a header name either, so a replay tells
/// trailers from headers.
const TRAILER: &str = ":trailer:";

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
            body_key: self.body_key.clone(),
            body_fingerprint: self.body_fingerprint.clone(),
            unstored_headers: self.unstored_headers.clone(),
            retry_after: self.retry_after,
            oversized: self.oversized,
            grpc: self.grpc,
            running: self.running.clone(),
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
    body_key: Option<BodyKeyFn>,
    body_fingerprint: Option<BodyFingerprintFn>,
    unstored_headers: Vec<HeaderName>,
    retry_after: Duration,
    oversized: Oversized,
    // gRPC calls: refusals as gRPC statuses, trailers stored, the status decides what is
    grpc: bool,
    // the guarded requests whose clients went away, and the pumps of large responses: what
    // outlives the server's connections, for `drain`
    running: TaskTracker,
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
/// # What a client sees
/// - Once a key is claimed, its handler runs to its end whatever the client does: a client that
///   disconnects and retries gets 409 (with `Retry-After`, 1 s by default) while the handler
///   runs, or waits for it under [`with_wait`](Self::with_wait), and the stored response once
///   it finished. The handler never runs twice for one key, unless its attempt failed.
/// - A failed attempt releases the key, so a retry runs again: a 5xx under [`Profile::Ietf`],
///   a panic (the client gets 500), a response body that fails, and a refusal before any
///   effect ([`Profile::is_rejection`]: 400, 401, 403, 404, ...) unless marked [`Final`].
///   A released key forgets the request's fingerprint, so a corrected request may reuse it.
/// - `Set-Cookie` and hop-by-hop headers go to the first client only ([`UNSTORED_HEADERS`]).
/// - At most [`with_max_response`](Self::with_max_response) bytes of a response are held in
///   memory. A larger response streams through while the lease is renewed, and the key
///   records that it ran without its response: a retry gets 410 `response-not-stored`
///   ([`Oversized`]). The same record stands in when the store refuses a response for its
///   size (a bounded [`MemoryStore`](idemgate_core::MemoryStore) that is full).
///
/// # Shutdown
/// Handlers whose clients went away, and the streams of large responses, run on the runtime,
/// outside the server's connections. After the server's graceful shutdown returned, wait for
/// them with [`drain`](Self::drain), bounded:
///
/// ```
/// # use std::time::Duration;
/// # use idemgate_core::MemoryStore;
/// # use idemgate_http::IdempotencyLayer;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let layer = IdempotencyLayer::unscoped(MemoryStore::new());
/// let app: axum::Router = axum::Router::new().layer(layer.clone());
/// // axum::serve(listener, app).with_graceful_shutdown(signal).await?;
/// assert!(layer.drain(Duration::from_secs(30)).await, "handlers still running");
/// # });
/// ```
///
/// A handler still running when the runtime stops is dropped mid-way: its key stays in
/// progress until its lease runs out, then the next retry runs it again. Pass
/// [`RequestKey`]`.0.derive(..)` downstream so that second run is harmless there.
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
                body_key: None,
                body_fingerprint: None,
                unstored_headers: UNSTORED_HEADERS.to_vec(),
                retry_after: Duration::from_secs(1),
                oversized: Oversized::Complete,
                grpc: false,
                running: TaskTracker::new(),
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

    /// The largest response buffered and stored (default 1 MiB). A larger one streams through
    /// to the client with at most this much of it in memory, and [`Oversized`] says what the
    /// key records.
    pub fn with_max_response(self, bytes: usize) -> Self {
        self.with(|c| c.max_response = bytes)
    }

    /// What a response over the limit leaves behind ([`Oversized::Complete`] by default: a
    /// retry gets a `response-not-stored` problem and the handler does not run again).
    pub fn with_oversized(self, policy: Oversized) -> Self {
        self.with(|c| c.oversized = policy)
    }

    /// Response headers that are not stored nor replayed (default [`UNSTORED_HEADERS`]:
    /// `Set-Cookie` and the hop-by-hop headers). The first response still carries them.
    pub fn with_unstored_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.with(|c| c.unstored_headers = headers)
    }

    /// The `Retry-After` of a 409 for a key whose first request still runs (default 1 s,
    /// sent in whole seconds, rounded up). The lease left is no guide: it is renewed while
    /// the handler runs.
    pub fn with_retry_after(self, after: Duration) -> Self {
        self.with(|c| c.retry_after = after)
    }

    /// Waits up to `timeout` for the guarded requests that outlive their connections: handlers
    /// whose clients went away run to their end on the runtime, and so do the streams of
    /// responses over the limit. A server's graceful shutdown waits for its connections; call
    /// this after it returned and before the runtime stops. `true` when nothing is left
    /// running. A handler still running when the runtime stops is dropped: its key stays in
    /// progress until its lease runs out, and the next claim runs the handler again.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let running = &self.config.running;
        running.close();
        let done = tokio::time::timeout(timeout, running.wait()).await.is_ok();
        running.reopen();
        done
    }

    /// How many guarded requests run detached from their connections now.
    pub fn running(&self) -> usize {
        self.config.running.len()
    }

    /// The lease of a running request (default 30 s), renewed while the handler runs and while
    /// its response body is read.
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

    /// Guards gRPC calls (a tonic server's `layer`, say) instead of REST requests: the key comes
    /// from the `idempotency-key` metadata, every call is guarded (gRPC calls are POSTs), the
    /// trailers (`grpc-status`, `grpc-message`, the service's own) are stored with the response
    /// and replayed, and the layer's refusals are gRPC statuses ([`Problem::grpc_code`]): a
    /// running first call gets `ABORTED` with a `google.rpc.RetryInfo`, another request under
    /// the same key `FAILED_PRECONDITION`, a missing key `INVALID_ARGUMENT`. A call that ended
    /// OK, `NOT_FOUND`, `ALREADY_EXISTS`, `FAILED_PRECONDITION` or `OUT_OF_RANGE` is stored;
    /// any other status releases the key for a retry, unless the response is marked [`Final`].
    ///
    /// ```
    /// use idemgate_core::MemoryStore;
    /// use idemgate_http::IdempotencyLayer;
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new(), |parts| {
    ///     parts.headers.get("x-tenant").and_then(|v| v.to_str().ok()).map(str::to_owned)
    /// })
    /// .for_grpc();
    /// // tonic::transport::Server::builder().layer(layer).add_service(..)
    /// ```
    pub fn for_grpc(self) -> Self {
        self.with(|c| {
            c.grpc = true;
            c.methods = vec![Method::POST];
        })
    }

    /// Request headers that take part in the fingerprint (besides method, path, query, body).
    pub fn with_fingerprint_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.with(|c| c.fingerprint_headers = headers)
    }

    /// Takes the key from the body of a request that has no `Idempotency-Key` header (see
    /// [`BodyKeyFn`]); with [`JsonFields`](idemgate_core::JsonFields), a field of a JSON body:
    ///
    /// ```
    /// use idemgate_core::{JsonFields, MemoryStore};
    /// use idemgate_http::IdempotencyLayer;
    ///
    /// let payment = JsonFields::new(["/payment_id"]).unwrap();
    /// let layer = IdempotencyLayer::unscoped(MemoryStore::new()).with_key(move |_, body| {
    ///     let key = payment.key("payments", body).map_err(|e| e.to_string())?;
    ///     Ok(Some(key.id().to_owned()))
    /// });
    /// ```
    pub fn with_key(
        self,
        f: impl Fn(&Parts, &[u8]) -> Result<Option<String>, String> + Send + Sync + 'static,
    ) -> Self {
        let f: BodyKeyFn = Arc::new(f);
        self.with(|c| c.body_key = Some(f))
    }

    /// The fingerprint from the request's head and body instead of the default (see
    /// [`BodyFingerprintFn`]): with [`JsonFields`](idemgate_core::JsonFields), chosen fields, so
    /// a retry whose body differs only in a timestamp is replayed rather than refused with 422.
    ///
    /// ```
    /// use idemgate_core::{JsonFields, MemoryStore};
    /// use idemgate_http::IdempotencyLayer;
    ///
    /// let fields = JsonFields::new(["/amount", "/currency"]).unwrap();
    /// let layer = IdempotencyLayer::unscoped(MemoryStore::new())
    ///     .with_fingerprint(move |_, body| fields.fingerprint(body).map_err(|e| e.to_string()));
    /// ```
    pub fn with_fingerprint(
        self,
        f: impl Fn(&Parts, &[u8]) -> Result<Fingerprint, String> + Send + Sync + 'static,
    ) -> Self {
        let f: BodyFingerprintFn = Arc::new(f);
        self.with(|c| c.body_fingerprint = Some(f))
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
    S: Service<Request<GuardedBody<B>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: HttpBody<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    St: Store,
{
    type Response = Response<ResponseBody>;
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
            Admit::Refuse(response) => {
                return ResponseFuture::attached(Box::pin(std::future::ready(Ok(response))));
            }
            Admit::Pass => None,
            Admit::Guard(key) => Some(Some(key)),
            Admit::FromBody => Some(None),
        };
        // the ready service serves this call; a clone takes its place for the next
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        match key {
            None => ResponseFuture::attached(Box::pin(pass(
                inner,
                Request::from_parts(parts, GuardedBody::stream(body)),
            ))),
            // a guarded request runs to its end even if its client goes away
            Some(key) => ResponseFuture::detached(
                Box::pin(handle(Arc::clone(&self.config), inner, key, parts, body)),
                self.config.running.clone(),
            ),
        }
    }
}

/// Counts one outcome: `fresh`, `replayed`, `conflict`, `mismatch`, `missing_key`,
/// `invalid_key`, `released`, `not_stored`, `panicked`, `lease_lost`, `store_unavailable`. A
/// literal, so the metric's key is a static (no allocation per request).
macro_rules! count {
    ($outcome:literal) => {{
        tracing::debug!(outcome = $outcome, "idempotency-key request");
        metrics::counter!("idemgate_http_total", "outcome" => $outcome).increment(1);
    }};
}

/// What reading a body up to a limit found.
enum Read {
    /// The whole body, within the limit, and its trailers.
    Whole(Bytes, Option<Box<http::HeaderMap>>),
    /// The body goes past the limit: what was read so far (at most the limit and one frame).
    Over(Bytes),
    /// The body failed.
    Failed,
}

/// Reads a body up to `limit` bytes. A body of one data frame (the usual case) is returned as
/// it is, without a copy; more frames are joined. A body that announces more than `limit` is
/// not read at all.
async fn read_up_to<B>(body: &mut B, limit: usize) -> Read
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    if body.size_hint().lower() > limit as u64 {
        return Read::Over(Bytes::new());
    }
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut len = 0usize;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Read::Failed;
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(Box::new(t));
                }
                continue;
            }
        };
        len = len.saturating_add(data.len());
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
        if len > limit {
            return Read::Over(match joined {
                Some(all) => all.freeze(),
                None => first.unwrap_or_default(),
            });
        }
    }
    let all = match joined {
        Some(all) => all.freeze(),
        None => first.unwrap_or_default(),
    };
    Read::Whole(all, trailers)
}

/// `body`, followed by `trailers` where there are some.
fn with_trailers(body: Bytes, trailers: Option<Box<http::HeaderMap>>) -> ResponseBody {
    match trailers {
        None => full(body),
        Some(t) => http_body_util::Full::new(body)
            .map_err(|never| match never {})
            .with_trailers(async move { Some(Ok(*t)) })
            .boxed_unsync(),
    }
}

async fn pass<S, B, ResB>(
    mut inner: S,
    req: Request<GuardedBody<B>>,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<GuardedBody<B>>, Response = Response<ResB>>,
    ResB: HttpBody<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    Ok(inner.call(req).await?.map(boxed))
}

/// What a request gets before anything is awaited.
enum Admit {
    /// Not guarded (another method, or no key where none is required): straight to the service.
    Pass,
    /// Refused: a missing or invalid key, or no principal.
    Refuse(Response<ResponseBody>),
    /// Guarded by this key.
    Guard(Key),
    /// Guarded by a key taken from the body ([`IdempotencyLayer::with_key`]), once it is read.
    FromBody,
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
            return Admit::Refuse(answer(config, Problem::InvalidKey, &e.to_string()));
        }
        // the key is in the body: decided once it is read
        None if config.body_key.is_some() => {
            return match scope_of(config, parts) {
                Ok(_) => Admit::FromBody,
                Err(refused) => Admit::Refuse(refused.answer(config)),
            };
        }
        None if config.required => {
            count!("missing_key");
            return Admit::Refuse(answer(
                config,
                Problem::MissingKey,
                "send an Idempotency-Key header with this request",
            ));
        }
        None => return Admit::Pass,
    };
    match scope_of(config, parts).and_then(|scope| scoped(&scope, &id)) {
        Ok(key) => Admit::Guard(key),
        Err(refused) => Admit::Refuse(refused.answer(config)),
    }
}

/// Why a request's key could not be made: a problem and its detail.
struct Refused(Problem, &'static str);

impl Refused {
    fn answer<St>(self, config: &Config<St>) -> Response<ResponseBody> {
        answer(config, self.0, self.1)
    }
}

/// The request's principal (empty for an unscoped layer).
fn scope_of<St>(config: &Config<St>, parts: &Parts) -> Result<String, Refused> {
    match &config.scope {
        None => Ok(String::new()),
        Some(f) => f(parts).ok_or(Refused(
            Problem::MissingScope,
            "the request carries no principal",
        )),
    }
}

/// The principal and the client's key, length-prefixed: no two principals share a key.
fn scoped(scope: &str, id: &str) -> Result<Key, Refused> {
    Key::compose("http", [scope.as_bytes(), id.as_bytes()])
        .map_err(|_| Refused(Problem::InvalidKey, "the key cannot be stored"))
}

/// What the body of a request without a key header says its key is.
enum BodyKey {
    Guard(Key),
    Pass,
    Refuse(Response<ResponseBody>),
}

fn body_key<St>(config: &Config<St>, parts: &Parts, body: &[u8]) -> BodyKey {
    let Some(f) = &config.body_key else {
        return BodyKey::Pass;
    };
    let refuse = |problem, detail: &str| BodyKey::Refuse(answer(config, problem, detail));
    match f(parts, body) {
        Ok(Some(id)) if id.is_empty() => {
            count!("invalid_key");
            refuse(Problem::InvalidKey, "the key taken from the body is empty")
        }
        Ok(Some(id)) => match scope_of(config, parts).and_then(|s| scoped(&s, &id)) {
            Ok(key) => BodyKey::Guard(key),
            Err(refused) => BodyKey::Refuse(refused.answer(config)),
        },
        Ok(None) if config.required => {
            count!("missing_key");
            refuse(
                Problem::MissingKey,
                "send an Idempotency-Key header, or a body the key is taken from",
            )
        }
        Ok(None) => BodyKey::Pass,
        Err(reason) => {
            count!("invalid_payload");
            refuse(Problem::InvalidPayload, &reason)
        }
    }
}

/// The guarded path: an `async` block over the arguments, not an `async fn`. An async fn's
/// future keeps every argument twice (as passed, and moved into its body); this one is boxed for
/// every guarded request, so it is kept small (a unit test pins its size).
///
/// Once the key is claimed, the handler runs to its end and the key is settled whatever the
/// client does: the [`ResponseFuture`] hands this future to the runtime if the connection drops
/// it. The handler's panics are caught (a failed attempt: the key is released, the client gets
/// 500).
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn handle<S, St, B, ResB>(
    config: Arc<Config<St>>,
    mut inner: S,
    mut key: Option<Key>,
    parts: Parts,
    body: B,
) -> impl Future<Output = Result<Response<ResponseBody>, S::Error>>
where
    S: Service<Request<GuardedBody<B>>, Response = Response<ResB>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: HttpBody<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    St: Store,
{
    async move {
        let bytes = match read_up_to(&mut std::pin::pin!(body), config.max_body).await {
            Read::Whole(bytes, _) => bytes,
            Read::Over(_) => {
                let detail = format!("the body is over {} bytes", config.max_body);
                return Ok(answer(&config, Problem::BodyTooLarge, &detail));
            }
            Read::Failed => {
                let detail = "the request body could not be read";
                return Ok(answer(&config, Problem::UnreadableBody, detail));
            }
        };
        // a key in the body, or none: then the request goes on unguarded (the key is kept in
        // the argument's own slot: a second binding would grow this boxed future)
        if key.is_none() {
            match body_key(&config, &parts, &bytes) {
                BodyKey::Guard(k) => key = Some(k),
                BodyKey::Refuse(response) => return Ok(response),
                BodyKey::Pass => {
                    let req = Request::from_parts(parts, GuardedBody::full(bytes));
                    return Ok(inner.call(req).await?.map(boxed));
                }
            }
        }
        let Some(guarded) = &key else {
            return Ok(answer(&config, Problem::InvalidKey, "no key"));
        };
        // the fingerprint lives only as long as the claim
        let lease = {
            let fp = match &config.body_fingerprint {
                Some(f) => match f(&parts, &bytes) {
                    Ok(fp) => fp,
                    Err(reason) => {
                        count!("invalid_payload");
                        return Ok(answer(&config, Problem::InvalidPayload, &reason));
                    }
                },
                None => Fingerprint::of_parts(
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
                ),
            };
            match claim(&config, guarded, &fp).await {
                Ok(lease) => lease,
                Err(response) => return Ok(response),
            }
        };
        // released if this future is dropped unsettled (the runtime shuts down)
        let mut guard = LeaseGuard::new(&config.store, lease);
        let req = {
            let mut req = Request::from_parts(parts, GuardedBody::full(bytes));
            // the handler can derive downstream keys from it (`RequestKey(key).0.derive("charge")`)
            if let Some(key) = key.take() {
                req.extensions_mut().insert(RequestKey(key));
            }
            req
        };
        // the lease is renewed while the handler runs, and again while its body is read (two
        // futures one after the other: the guarded future holds the larger, not both)
        let (called, lost) = keep_alive(
            &*config.store,
            guard.lease().expect("armed"),
            config.lease,
            AssertUnwindSafe(inner.call(req)).catch_unwind(),
        )
        .await;
        let response = match called {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                release(&config, guard.disarm(), lost).await;
                return Err(e);
            }
            Err(_panic) => return Ok(panicked(&config, guard.disarm(), lost).await),
        };
        let (rparts, rbody) = response.into_parts();
        let mut rbody = boxed(rbody);
        let (head, lost_reading) = keep_alive(
            &*config.store,
            guard.lease().expect("armed"),
            config.lease,
            AssertUnwindSafe(read_up_to(&mut rbody, config.max_response)).catch_unwind(),
        )
        .await;
        let (lease, lost) = (guard.disarm(), lost || lost_reading);
        let Ok(head) = head else {
            return Ok(panicked(&config, lease, lost).await);
        };
        let marked = rparts.extensions.get::<Final>().is_some();
        match head {
            Read::Whole(body, trailers) => {
                let stored = Stored::Body(&body);
                let t = trailers.as_deref();
                settle(&config, lease, lost, &rparts, stored, t, marked).await;
                Ok(Response::from_parts(rparts, with_trailers(body, trailers)))
            }
            Read::Failed => {
                release(&config, lease, lost).await;
                Ok(failed(
                    &config,
                    StatusCode::BAD_GATEWAY,
                    "the response body failed",
                ))
            }
            Read::Over(head) => {
                // the rest streams through a small channel, so at most the limit and a few
                // frames are in memory; the key is settled once the body has ended
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let read = head.len() as u64;
                let status = rparts.status;
                let pumped = pump(
                    Arc::clone(&config),
                    lease,
                    lost,
                    status,
                    marked,
                    rbody,
                    tx,
                    read,
                );
                tokio::spawn(config.running.track_future(pumped));
                let relay = Relay {
                    head: Some(head).filter(|h| !h.is_empty()),
                    rx,
                };
                Ok(Response::from_parts(rparts, boxed(relay)))
            }
        }
    }
}

/// A response body: what was read before the limit, then what the pump forwards.
struct Relay {
    head: Option<Bytes>,
    rx: tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, BoxError>>,
}

impl HttpBody for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(head))));
        }
        self.rx.poll_recv(cx)
    }
}

/// Forwards the rest of a response over the limit to the client (or, once the client is gone,
/// reads it to its end), renewing the lease, then settles the key.
#[allow(clippy::too_many_arguments)]
async fn pump<St: Store>(
    config: Arc<Config<St>>,
    lease: Lease,
    lost: bool,
    status: StatusCode,
    marked: bool,
    mut body: ResponseBody,
    tx: tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, BoxError>>,
    read: u64,
) {
    let mut guard = LeaseGuard::new(&config.store, lease.clone());
    let forward = async {
        let (mut total, mut open, mut trailers) = (read, true, None);
        while let Some(frame) = body.frame().await {
            match frame {
                Err(e) => {
                    if open {
                        let _ = tx.send(Err(e)).await;
                    }
                    return None;
                }
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        total = total.saturating_add(data.len() as u64);
                    } else if let Some(t) = frame.trailers_ref() {
                        trailers = Some(t.clone());
                    }
                    // a client that went away no longer gets it, but the body is read on
                    open = open && tx.send(Ok(frame)).await.is_ok();
                }
            }
        }
        Some((total, trailers))
    };
    let (result, lost_now) = keep_alive(
        &*config.store,
        &lease,
        config.lease,
        AssertUnwindSafe(forward).catch_unwind(),
    )
    .await;
    let lease = guard.disarm();
    let lost = lost || lost_now;
    match result {
        Ok(Some((bytes, trailers))) if config.oversized == Oversized::Complete => {
            let parts = Response::builder()
                .status(status)
                .body(())
                .map(|r| r.into_parts().0);
            match parts {
                Ok(parts) => {
                    let stored = Stored::Not { bytes };
                    let t = trailers.as_ref();
                    settle(&config, lease, lost, &parts, stored, t, marked).await;
                }
                Err(_) => release(&config, lease, lost).await,
            }
        }
        _ => release(&config, lease, lost).await,
    }
}

/// What a settled key keeps of its response.
enum Stored<'a> {
    /// The whole body.
    Body(&'a Bytes),
    /// Nothing: the body of `bytes` was over the limit.
    Not { bytes: u64 },
}

/// Completes the key with the response when the profile stores it, else releases it; a lease
/// the heartbeat found lost is left alone (another claim holds the key).
async fn settle<St: Store>(
    config: &Config<St>,
    lease: Lease,
    lost: bool,
    parts: &http::response::Parts,
    stored: Stored<'_>,
    trailers: Option<&http::HeaderMap>,
    marked: bool,
) {
    if lost {
        count!("lease_lost");
        tracing::warn!("the lease was lost while the handler ran; its response is not stored");
        return;
    }
    let stores = if config.grpc {
        marked
            || (parts.status == StatusCode::OK
                && grpc::status_of(&parts.headers, trailers).is_some_and(grpc::stores))
    } else {
        config.profile.stores(parts.status, marked)
    };
    if !stores {
        let _ = config.store.release(lease).await;
        count!("released");
        return;
    }
    let marker = matches!(stored, Stored::Not { .. });
    let outcome =
        match stored {
            Stored::Body(body) => Outcome {
                status: parts.status.as_u16(),
                meta: parts
                    .headers
                    .iter()
                    .filter(|(name, _)| !config.unstored_headers.contains(name))
                    .map(|(n, v)| (Cow::Borrowed(n.as_str()), v.as_bytes()))
                    .chain(trailers.into_iter().flatten().map(|(n, v)| {
                        (Cow::Owned(format!("{TRAILER}{}", n.as_str())), v.as_bytes())
                    }))
                    .collect(),
                body: body.clone(),
            },
            Stored::Not { bytes } => not_stored(parts.status, bytes),
        };
    match config
        .store
        .complete(&lease, &outcome, config.retention)
        .await
    {
        Ok(()) if marker => count!("not_stored"),
        Ok(()) => count!("fresh"),
        Err(idemgate_core::Error::LeaseLost) => count!("lease_lost"),
        // a store full of responses still records that the request ran (in a task of its own:
        // a rare path, kept out of every request's future)
        Err(idemgate_core::Error::Capacity { .. }) if !marker => {
            let (store, retention) = (Arc::clone(&config.store), config.retention);
            let marker = not_stored(parts.status, outcome.body.len() as u64);
            tokio::spawn(async move {
                match store.complete(&lease, &marker, retention).await {
                    Ok(()) => count!("not_stored"),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not record a response that was not stored")
                    }
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not store the response; a retry after the lease will run again")
        }
    }
}

/// The record of a response that was not stored: its status and size, no body.
fn not_stored(status: StatusCode, bytes: u64) -> Outcome {
    Outcome::new(status.as_u16(), Bytes::new())
        .with_meta(NOT_STORED, itoa::Buffer::new().format(bytes))
}

/// A handler that panicked (in its call or its body) failed this attempt: its key is released
/// for a retry, and its client gets 500.
async fn panicked<St: Store>(
    config: &Config<St>,
    lease: Lease,
    lost: bool,
) -> Response<ResponseBody> {
    count!("panicked");
    release(config, lease, lost).await;
    failed(
        config,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the handler failed",
    )
}

/// Releases the key after a failed attempt, unless the lease was lost.
async fn release<St: Store>(config: &Config<St>, lease: Lease, lost: bool) {
    if lost {
        count!("lease_lost");
    } else {
        let _ = config.store.release(lease).await;
        count!("released");
    }
}

/// A failed attempt's answer: `status` with `text`, or for a gRPC call `INTERNAL` (500) or
/// `UNAVAILABLE`.
fn failed<St>(
    config: &Config<St>,
    status: StatusCode,
    text: &'static str,
) -> Response<ResponseBody> {
    if config.grpc {
        let code = if status == StatusCode::INTERNAL_SERVER_ERROR {
            grpc::code::INTERNAL
        } else {
            grpc::code::UNAVAILABLE
        };
        return grpc::status(code, text, None);
    }
    let mut res = Response::new(full(text));
    *res.status_mut() = status;
    res
}

/// The layer's own answer: a problem document, or for a gRPC call its status.
fn answer<St>(config: &Config<St>, problem: Problem, detail: &str) -> Response<ResponseBody> {
    if config.grpc {
        let retry = (problem == Problem::InProgress).then_some(config.retry_after);
        grpc::status(problem.grpc_code(), detail, retry)
    } else {
        problem.response(detail)
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
) -> Result<Lease, Response<ResponseBody>> {
    let opts = ClaimOptions {
        lease: config.lease,
        retention: config.retention,
    };
    let deadline = config.wait.map(|w| tokio::time::Instant::now() + w);
    let mut backoff = Duration::from_millis(10);
    loop {
        match config.store.claim(key, Some(fp), &opts).await {
            Err(e) => {
                count!("store_unavailable");
                return Err(answer(config, Problem::StoreUnavailable, &e.to_string()));
            }
            Ok(Claim::Acquired(lease)) => return Ok(lease),
            Ok(Claim::Completed(record)) => {
                count!("replayed");
                return Err(match record.outcome() {
                    Some(o) => replay(config, o),
                    None => answer(
                        config,
                        Problem::StoreUnavailable,
                        "a completed record has no response",
                    ),
                });
            }
            Ok(Claim::Mismatch { .. }) => {
                count!("mismatch");
                return Err(answer(
                    config,
                    Problem::Mismatch,
                    "the method, path, query or body differ from the first request with this key",
                ));
            }
            Ok(Claim::InProgress { .. }) => {}
        }
        let now = tokio::time::Instant::now();
        if let Some(deadline) = deadline.filter(|d| *d > now) {
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
            continue;
        }
        count!("conflict");
        let after = config.retry_after;
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        let mut res = answer(
            config,
            Problem::InProgress,
            "the first request with this key is still running; retry later",
        );
        res.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        return Err(res);
    }
}

/// The stored response, byte for byte, marked as a replay; or, for a response that was over the
/// limit, the `response-not-stored` problem.
fn replay<St>(config: &Config<St>, o: &Outcome) -> Response<ResponseBody> {
    // (a marker record has no body: a stored response skips the search)
    if o.body.is_empty()
        && let Some((_, bytes)) = o.meta.iter().find(|(name, _)| *name == NOT_STORED)
    {
        let detail = format!(
            "the first request with this key completed with status {}, but its response ({} bytes) was over the limit and was not stored",
            o.status,
            String::from_utf8_lossy(bytes)
        );
        let mut res = answer(config, Problem::ResponseNotStored, &detail);
        res.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        return res;
    }
    let mut headers = http::HeaderMap::new();
    let mut trailers: Option<Box<http::HeaderMap>> = None;
    for (name, value) in o.meta.iter_shared() {
        let (name, into) = match name.strip_prefix(TRAILER) {
            Some(n) => (n, &mut **trailers.get_or_insert_with(Box::default)),
            None => (name, &mut headers),
        };
        // the value shares the stored buffer: no copy
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value),
        ) {
            into.append(n, v);
        }
    }
    let mut res = Response::new(with_trailers(o.body.clone(), trailers));
    *res.status_mut() = StatusCode::from_u16(o.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    *res.headers_mut() = headers;
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
    /// instructions more each time. Around a small service the future is 1,064 bytes: it also
    /// renews the lease while the response body is read, catches the handler's panics and
    /// settles oversized responses. Keep it from growing further (the service's own future
    /// comes on top).
    #[test]
    fn the_guarded_future_stays_small() {
        let layer = IdempotencyLayer::unscoped(MemoryStore::new());
        type Empty = http_body_util::Empty<Bytes>;
        let inner = tower::service_fn(|_: Request<GuardedBody<Empty>>| async {
            Ok::<_, Infallible>(Response::new(Empty::new()))
        });
        let (parts, body) = Request::post("/").body(Empty::new()).unwrap().into_parts();
        let key = Key::new("http", "k").unwrap();
        let fut = handle(Arc::clone(&layer.config), inner, Some(key), parts, body);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1064, "the guarded future is {size} bytes");
    }
}

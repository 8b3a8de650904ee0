//! The reverse proxy: the routes' layers in front of one upstream, on hyper.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemgate::BoxStore;
use idemgate::http::{BoxError, Idempotency, IdempotencyLayer, Problem, ResponseBody};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

use crate::routes::Routes;

/// What the proxy needs besides its store and routes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxyOptions {
    /// The service behind the proxy: `http://host:port`, with an optional path prefix.
    pub upstream: Uri,
    /// The trusted header that carries the principal (set by the auth gateway in front of the
    /// proxy); `None` runs unscoped: every caller shares one key space.
    pub principal_header: Option<HeaderName>,
    /// How long the upstream has to start its response (default 30 s; a route may set its own).
    pub timeout: Duration,
    /// How long a connection to the upstream may take to open (default 5 s).
    pub connect_timeout: Duration,
    /// Idle upstream connections kept per host (default 64).
    pub pool_idle: usize,
    /// How long a graceful shutdown waits for running requests (default 30 s).
    pub drain: Duration,
    /// Where `/metrics` renders from; `None`: `/metrics` goes upstream like any path.
    pub metrics: Option<PrometheusHandle>,
}

impl ProxyOptions {
    /// The defaults, in front of `upstream`, scoped by `principal_header`.
    pub fn new(upstream: Uri, principal_header: Option<HeaderName>) -> Self {
        ProxyOptions {
            upstream,
            principal_header,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            pool_idle: 64,
            drain: Duration::from_secs(30),
            metrics: None,
        }
    }

    /// Sets `/metrics`' source.
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Sets the upstream's response timeout.
    pub fn with_timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Sets the graceful shutdown's bound.
    pub fn with_drain(mut self, d: Duration) -> Self {
        self.drain = d;
        self
    }
}

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The upstream URL is not `http://host[:port][/prefix]`.
    #[error(
        "the upstream {0:?} is not an http:// URL with a host (https upstreams are not supported: run the proxy beside the service)"
    )]
    Upstream(String),
    /// Installing the Prometheus recorder failed (another recorder is installed).
    #[error("the metrics recorder: {0}")]
    Metrics(String),
    /// Listening or serving failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Installs the process-wide Prometheus recorder, for [`ProxyOptions::with_metrics`].
pub fn install_prometheus() -> Result<PrometheusHandle, ProxyError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| ProxyError::Metrics(e.to_string()))
}

type Client_ = Client<HttpConnector, ResponseBody>;

/// A pooled HTTP/1 client (keep-alive, `TCP_NODELAY`, connections idle up to 60 s).
pub(crate) fn http_client<B>(
    connect_timeout: Duration,
    pool_idle: usize,
) -> Client<HttpConnector, B>
where
    B: HttpBody + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(pool_idle)
        .build(connector)
}

/// How the upstream failed a request; the layer releases the key of a guarded one.
#[derive(Debug)]
pub(crate) struct UpstreamFailed {
    problem: Problem,
    detail: String,
}

/// The service that forwards a request to the upstream.
#[derive(Clone)]
pub(crate) struct Upstream {
    client: Client_,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    prefix: Arc<str>,
    timeout: Duration,
}

impl Upstream {
    fn new(opts: &ProxyOptions) -> Result<Self, ProxyError> {
        let bad = || ProxyError::Upstream(opts.upstream.to_string());
        let parts = opts.upstream.clone().into_parts();
        let scheme = parts.scheme.ok_or_else(bad)?;
        if scheme != http::uri::Scheme::HTTP {
            return Err(bad());
        }
        let authority = parts.authority.ok_or_else(bad)?;
        let prefix = parts
            .path_and_query
            .map(|p| p.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        Ok(Upstream {
            client: http_client(opts.connect_timeout, opts.pool_idle),
            scheme,
            authority,
            prefix: prefix.into(),
            timeout: opts.timeout,
        })
    }

    fn uri(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        let path = if self.prefix.is_empty() {
            pq.to_owned()
        } else {
            format!("{}{pq}", self.prefix)
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }
}

impl<B> Service<Request<B>> for Upstream
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = UpstreamFailed;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Response<ResponseBody>, UpstreamFailed>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            parts.uri = this.uri(&parts.uri).map_err(|e| UpstreamFailed {
                problem: Problem::UpstreamUnavailable,
                detail: format!("the upstream URL: {e}"),
            })?;
            strip_hop_by_hop(&mut parts.headers);
            // the client sets the upstream's own Host
            if let Some(host) = parts.headers.remove(header::HOST) {
                parts
                    .headers
                    .insert(HeaderName::from_static("x-forwarded-host"), host);
            }
            let req = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
            let sent = tokio::time::timeout(this.timeout, this.client.request(req)).await;
            let res = match sent {
                Ok(Ok(res)) => res,
                Ok(Err(e)) => {
                    metrics::counter!("idemgate_proxy_upstream_errors_total", "kind" => "unavailable").increment(1);
                    return Err(UpstreamFailed {
                        problem: Problem::UpstreamUnavailable,
                        detail: error_chain(&e),
                    });
                }
                Err(_) => {
                    metrics::counter!("idemgate_proxy_upstream_errors_total", "kind" => "timeout")
                        .increment(1);
                    return Err(UpstreamFailed {
                        problem: Problem::UpstreamTimeout,
                        detail: format!("no response within {:?}", this.timeout),
                    });
                }
            };
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(
                parts,
                body.map_err(BoxError::from).boxed_unsync(),
            ))
        })
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Removes the headers that belong to one connection, and those its `Connection` names.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

type Guarded = Idempotency<Upstream, BoxStore>;

struct State {
    routes: Routes,
    // one guarded service per route (`None` for a route that does not guard)
    guarded: Vec<Option<Guarded>>,
    layers: Vec<IdempotencyLayer<BoxStore>>,
    upstream: Upstream,
    metrics: Option<PrometheusHandle>,
    drain: Duration,
}

/// `idemgate proxy`: an `Idempotency-Key` reverse proxy in front of a service written in any
/// language.
///
/// Guarded requests (the [`Routes`]) go through an [`IdempotencyLayer`] on the given store:
/// a retry gets the stored response, a concurrent one 409 (or waits), a different request
/// under the same key 422. Everything else streams through untouched. The proxy answers
/// `/healthz` itself, and `/metrics` when it has a Prometheus handle.
///
/// - Keys are scoped by the principal in a trusted header ([`ProxyOptions::principal_header`]);
///   a guarded request without it gets 400 `missing-scope`.
/// - An upstream that cannot be reached, or fails before its response starts, gets a 502
///   `upstream-unavailable` problem; one that does not answer within the timeout a 504
///   `upstream-timeout`. Either way the key is released, so a retry runs again.
/// - A 5xx from the upstream releases the key too (the route's `profile = "ietf"`, the
///   default), or is stored (`"stripe"`).
/// - A client that goes away does not stop a guarded request: it runs to its end and its
///   response is stored for the retry.
/// - On shutdown the proxy stops accepting, lets open requests finish, and waits for the
///   guarded ones whose clients went away, up to [`ProxyOptions::drain`].
#[derive(Clone)]
pub struct Proxy {
    state: Arc<State>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("routes", &self.state.routes)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy over `store` with `routes`.
    pub fn new(store: BoxStore, routes: Routes, opts: ProxyOptions) -> Result<Self, ProxyError> {
        let upstream = Upstream::new(&opts)?;
        let mut guarded = Vec::with_capacity(routes.routes().len());
        let mut layers = Vec::new();
        for route in routes.routes() {
            if !route.guard {
                guarded.push(None);
                continue;
            }
            let layer = match &opts.principal_header {
                Some(name) => {
                    let name = name.clone();
                    IdempotencyLayer::new(store.clone(), move |parts| {
                        parts
                            .headers
                            .get(&name)
                            .and_then(|v| v.to_str().ok())
                            .filter(|v| !v.is_empty())
                            .map(str::to_owned)
                    })
                }
                None => IdempotencyLayer::unscoped(store.clone()),
            }
            .with_methods(route.methods.iter().cloned())
            .with_key_required(route.key_required)
            .with_lease(route.lease)
            .with_retention(route.retention)
            .with_max_body(route.max_body)
            .with_max_response(route.max_response)
            .with_profile(route.profile);
            let layer = match route.wait {
                Some(d) => layer.with_wait(d),
                None => layer,
            };
            let mut inner = upstream.clone();
            if let Some(t) = route.timeout {
                inner.timeout = t;
            }
            guarded.push(Some(tower::Layer::layer(&layer, inner)));
            layers.push(layer);
        }
        Ok(Proxy {
            state: Arc::new(State {
                routes,
                guarded,
                layers,
                upstream,
                metrics: opts.metrics,
                drain: opts.drain,
            }),
        })
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down gracefully: no new
    /// connections, open requests finish, and guarded requests whose clients went away run to
    /// their end, all within the drain bound. `Ok(false)` when something was still running at
    /// the bound (its key stays in progress until its lease runs out).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<bool, ProxyError> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let upkeep = self.state.metrics.clone().map(|h| {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    h.run_upkeep();
                }
            })
        });
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // out of file descriptors and the like: wait, then go on
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let state = Arc::clone(&self.state);
            // the client's address, as `X-Forwarded-For` gives it, once per connection
            let peer = HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or(HeaderValue::from_static("unknown"));
            let svc = hyper::service::service_fn(move |req| {
                let (state, peer) = (Arc::clone(&state), peer.clone());
                async move { Ok::<_, Infallible>(dispatch(&state, peer, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "a client connection ended with an error");
                }
            });
        }
        drop(listener);
        let started = tokio::time::Instant::now();
        let drain = self.state.drain;
        let closed = tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_ok();
        let mut drained = closed;
        for layer in &self.state.layers {
            let left = drain.saturating_sub(started.elapsed());
            drained &= layer.drain(left).await;
        }
        if let Some(u) = upkeep {
            u.abort();
        }
        if !drained {
            tracing::warn!(?drain, "requests still running at the end of the drain");
        }
        Ok(drained)
    }
}

async fn dispatch(
    state: &State,
    peer: HeaderValue,
    mut req: Request<Incoming>,
) -> Response<ResponseBody> {
    match req.uri().path() {
        "/healthz" => return text(StatusCode::OK, "ok\n"),
        "/metrics" if state.metrics.is_some() => {
            let body = state.metrics.as_ref().map(PrometheusHandle::render);
            let mut res = text(StatusCode::OK, body.unwrap_or_default());
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return res;
        }
        _ => {}
    }
    forwarded_for(&mut req, peer);
    let route = state.routes.guarding(req.method(), req.uri().path());
    let served = match route.and_then(|i| state.guarded[i].clone()) {
        Some(guarded) => guarded.oneshot(req).await,
        None => state.upstream.clone().oneshot(req).await,
    };
    match served {
        Ok(res) => res,
        Err(e) => {
            tracing::warn!(problem = ?e.problem, detail = %e.detail, "the upstream failed a request");
            e.problem.response(&e.detail)
        }
    }
}

/// Appends the client's address to `X-Forwarded-For`, and says the client spoke plain HTTP.
fn forwarded_for(req: &mut Request<Incoming>, peer: HeaderValue) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let value = match req.headers().get(&xff).and_then(|v| v.to_str().ok()) {
        Some(before) => {
            let ip = peer.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{before}, {ip}")).ok()
        }
        None => Some(peer),
    };
    if let Some(v) = value {
        req.headers_mut().insert(xff, v);
    }
    req.headers_mut().insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut res = Response::new(
        http_body_util::Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

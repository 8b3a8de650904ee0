//! `/metrics` for the long-running commands other than the proxy (which serves it itself).

use std::convert::Infallible;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::ProxyError;

/// Installs the process-wide Prometheus recorder and serves `GET /metrics` (the Prometheus text
/// format) on `listener` until the task is dropped; every other path is 404. The CLI's global
/// `--metrics ADDR` runs it for `bridge`, `chaos` and the benches.
pub async fn serve_metrics(listener: TcpListener) -> Result<(), ProxyError> {
    serve_recorded(listener, crate::install_prometheus()?).await
}

/// [`serve_metrics`] with a recorder already installed ([`install_prometheus`](crate::install_prometheus)).
pub async fn serve_recorded(
    listener: TcpListener,
    handle: PrometheusHandle,
) -> Result<(), ProxyError> {
    loop {
        let (stream, _) = listener.accept().await?;
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let res = answer(&handle, req.uri().path());
                    async move { Ok::<_, Infallible>(res) }
                });
            // a scrape that breaks off is the scraper's business
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn answer(handle: &PrometheusHandle, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = if path == "/metrics" {
        (StatusCode::OK, handle.render())
    } else {
        (
            StatusCode::NOT_FOUND,
            "not found: try /metrics\n".to_owned(),
        )
    };
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    res
}

//! The bridge: events from a broker, delivered over HTTP with their event id as the key.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use idemgate::consumer::{BoxError, Message, Permanent};

use crate::proxy::{ProxyError, http_client};

/// Where and how the bridge delivers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BridgeOptions {
    /// The URL each event is POSTed to (`http://`).
    pub target: Uri,
    /// How long the service has to answer (default 30 s); a timeout is retried.
    pub timeout: Duration,
    /// Headers sent with every request (the principal header a proxy in front of the service
    /// scopes keys by, an API token).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl BridgeOptions {
    /// The defaults, delivering to `target`.
    pub fn new(target: Uri) -> Self {
        BridgeOptions {
            target,
            timeout: Duration::from_secs(30),
            headers: Vec::new(),
        }
    }

    /// Adds a header to every request.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Sets the service's time to answer.
    pub fn with_timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
}

/// `idemgate bridge`: the handler of a Gate-mode [`Consumer`](idemgate::consumer::Consumer)
/// that POSTs each event to an HTTP service, with `Idempotency-Key: <event id>`.
///
/// - 2xx: delivered; the consumer completes the key and acks.
/// - 5xx, 408, 409 (the key still running behind an idempotency proxy), 425, 429, a timeout or
///   a connection that fails: an error, retried with the consumer's backoff and dead-lettered
///   after its `max_attempts`.
/// - Any other 4xx: a [`Permanent`] failure, dead-lettered at once with the status and the
///   start of the body.
///
/// While the service works, the consumer renews the key's lease and tells the broker the
/// message is in progress. A bridge that dies after the service applied the event and before
/// it completed the key delivers it again under the same `Idempotency-Key`: put the service
/// behind [`Proxy`](crate::Proxy) (or its own idempotency layer), and the second request gets
/// the first one's response.
///
/// Each request carries the message's payload as its body (`Content-Type` from the message's
/// `content-type` header, else `application/octet-stream`), and `Idemgate-Source` (the
/// message's queue or topic), `Idemgate-Ordering-Key` and `Idemgate-Delivery-Count` where the
/// message has them.
#[derive(Clone)]
pub struct Bridge {
    client: Client<HttpConnector, Full<Bytes>>,
    target: Uri,
    timeout: Duration,
    headers: Arc<[(HeaderName, HeaderValue)]>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("target", &self.target)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

const SOURCE: HeaderName = HeaderName::from_static("idemgate-source");
const ORDERING_KEY: HeaderName = HeaderName::from_static("idemgate-ordering-key");
const DELIVERY_COUNT: HeaderName = HeaderName::from_static("idemgate-delivery-count");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

impl Bridge {
    /// A bridge to `opts.target`.
    pub fn new(opts: BridgeOptions) -> Result<Self, ProxyError> {
        if opts.target.scheme() != Some(&http::uri::Scheme::HTTP) || opts.target.host().is_none() {
            return Err(ProxyError::Upstream(opts.target.to_string()));
        }
        Ok(Bridge {
            client: http_client(Duration::from_secs(5), 64),
            target: opts.target,
            timeout: opts.timeout,
            headers: opts.headers.into(),
        })
    }

    /// Delivers `msg`: `Ok` on a 2xx, a [`Permanent`] error on a 4xx no retry can fix, another
    /// error otherwise.
    pub async fn deliver(&self, msg: Message) -> Result<(), BoxError> {
        let id = msg
            .event_id
            .as_deref()
            .ok_or_else(|| Permanent::new("the message has no event id"))?;
        let key = HeaderValue::from_str(id)
            .map_err(|_| Permanent::new("the event id is not a valid header value"))?;
        let mut req = Request::post(self.target.clone()).body(Full::new(msg.payload.clone()))?;
        let headers = req.headers_mut();
        headers.insert(IDEMPOTENCY_KEY, key);
        let content_type = msg
            .header("content-type")
            .and_then(|v| HeaderValue::from_bytes(v).ok())
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        headers.insert(header::CONTENT_TYPE, content_type);
        if let Ok(v) = HeaderValue::from_str(&msg.source) {
            headers.insert(SOURCE, v);
        }
        if let Some(v) = msg
            .ordering_key
            .as_deref()
            .and_then(|k| HeaderValue::from_str(k).ok())
        {
            headers.insert(ORDERING_KEY, v);
        }
        if let Some(n) = msg.deliveries {
            headers.insert(DELIVERY_COUNT, HeaderValue::from(n));
        }
        for (name, value) in self.headers.iter() {
            headers.insert(name.clone(), value.clone());
        }
        let sent = tokio::time::timeout(self.timeout, async {
            let res = self.client.request(req).await?;
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, body))
        })
        .await;
        let (status, body) = match sent {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(format!("delivering to {}: {e}", self.target).into()),
            Err(_) => {
                return Err(
                    format!("{} did not answer within {:?}", self.target, self.timeout).into(),
                );
            }
        };
        if status.is_success() {
            return Ok(());
        }
        let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        let why = format!("{} answered {status}: {excerpt}", self.target);
        if retryable(status) {
            Err(why.into())
        } else {
            Err(Permanent::new(why).into())
        }
    }
}

/// Whether a non-2xx answer may go another way later.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || matches!(status.as_u16(), 408 | 409 | 425 | 429)
        || !status.is_client_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_answers_are_retried() {
        for s in [500, 502, 503, 504, 408, 409, 425, 429, 302] {
            assert!(retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 413, 422] {
            assert!(!retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}

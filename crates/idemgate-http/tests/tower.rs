//! The layer around a plain tower service, without axum: its own request and response bodies.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use idemgate_core::MemoryStore;
use idemgate_http::{GuardedBody, IdempotencyLayer};
use tower::{Layer, Service, ServiceExt};

#[tokio::test]
async fn a_tower_service_with_its_own_bodies_runs_once_per_key() {
    let runs = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&runs);
    // a service over the layer's request body, answering with http-body-util's `Full`
    let inner = tower::service_fn(move |req: Request<GuardedBody<Full<Bytes>>>| {
        let runs = Arc::clone(&counted);
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let text = format!("order {} (run {n})", String::from_utf8_lossy(&body));
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Full::new(Bytes::from(text)))
                    .unwrap(),
            )
        }
    });
    let mut svc = IdempotencyLayer::unscoped(MemoryStore::new()).layer(inner);
    let request = || {
        Request::post("/orders")
            .header("idempotency-key", "\"k-1\"")
            .body(Full::new(Bytes::from_static(b"sku-9")))
            .unwrap()
    };
    let mut answers = Vec::new();
    for _ in 0..3 {
        let res = svc.ready().await.unwrap().call(request()).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        answers.push((status, body));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran again");
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(answers[0].0, StatusCode::CREATED);
    assert_eq!(&answers[0].1[..], b"order sku-9 (run 1)");
}

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

/// In gRPC mode a call that comes while the first with its key runs is `ABORTED` (a trailers-only
/// response) with a `google.rpc.RetryInfo`; one without a key is `INVALID_ARGUMENT`; a call that
/// ended `UNAVAILABLE` releases its key, and trailers are replayed.
#[tokio::test]
async fn grpc_calls_get_grpc_statuses_and_their_trailers_back() {
    let (runs, flaky) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (counted, flaky_counted, held) = (Arc::clone(&runs), Arc::clone(&flaky), Arc::clone(&gate));
    let inner = tower::service_fn(move |req: Request<GuardedBody<Full<Bytes>>>| {
        let (gate, flaky) = (Arc::clone(&held), Arc::clone(&flaky_counted));
        let n = if req.uri().path() == "/pkg.Svc/Flaky" {
            flaky.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            counted.fetch_add(1, Ordering::SeqCst) + 1
        };
        async move {
            if req.uri().path() == "/pkg.Svc/Held" {
                let _ = gate.acquire().await.unwrap();
            }
            let mut trailers = http::HeaderMap::new();
            let code = if req.uri().path() == "/pkg.Svc/Flaky" && n == 1 {
                "14"
            } else {
                "0"
            };
            trailers.insert("grpc-status", code.parse().unwrap());
            trailers.insert("x-run", n.to_string().parse().unwrap());
            let body = Full::new(Bytes::from_static(b"\0\0\0\0\x02hi"))
                .with_trailers(async move { Some(Ok(trailers)) });
            Ok::<_, Infallible>(Response::new(body))
        }
    });
    let svc = IdempotencyLayer::unscoped(MemoryStore::new())
        .for_grpc()
        .layer(inner);
    let call = |path: &str, key: Option<&str>| {
        let mut req = Request::post(path).header("content-type", "application/grpc");
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let req = req
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        svc.clone().oneshot(req)
    };
    let grpc_status = |res: &Response<_>| {
        res.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
    };

    let missing = call("/pkg.Svc/Do", None).await.unwrap();
    assert_eq!(grpc_status(&missing).as_deref(), Some("3"));

    let first = tokio::spawn(call("/pkg.Svc/Held", Some("held-1")));
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let busy = call("/pkg.Svc/Held", Some("held-1")).await.unwrap();
    assert_eq!(grpc_status(&busy).as_deref(), Some("10"), "ABORTED");
    let details = busy.headers()["grpc-status-details-bin"]
        .to_str()
        .unwrap()
        .to_owned();
    use base64::Engine;
    let details = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(details)
        .unwrap();
    assert!(String::from_utf8_lossy(&details).contains("google.rpc.RetryInfo"));
    gate.add_permits(1);
    let first = first.await.unwrap().unwrap();
    let first = first.into_body().collect().await.unwrap();
    let replay = call("/pkg.Svc/Held", Some("held-1")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay = replay.into_body().collect().await.unwrap();
    assert_eq!(replay.trailers(), first.trailers());
    assert_eq!(first.trailers().unwrap()["x-run"], "1");
    assert_eq!(replay.to_bytes(), Bytes::from_static(b"\0\0\0\0\x02hi"));

    // UNAVAILABLE released the key: the retry runs, and its OK is stored
    for want in ["14", "0", "0"] {
        let res = call("/pkg.Svc/Flaky", Some("flaky-1")).await.unwrap();
        let body = res.into_body().collect().await.unwrap();
        assert_eq!(body.trailers().unwrap()["grpc-status"], want);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the held call ran once");
    assert_eq!(
        flaky.load(Ordering::SeqCst),
        2,
        "the flaky call ran again once"
    );
}

/// A key and a fingerprint from chosen JSON fields: a request without the header is guarded by
/// its body's `/payment_id`; a retry whose body differs only in `/sent_at` is replayed; another
/// amount under the same key is 422; a body without the field is 400 `invalid-payload`.
#[tokio::test]
async fn json_fields_give_the_key_and_the_fingerprint() {
    use idemgate_core::JsonFields;
    let runs = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&runs);
    let inner = tower::service_fn(move |_req: Request<GuardedBody<Full<Bytes>>>| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("run {n}"))))) }
    });
    let (payment, amount) = (
        JsonFields::new(["/payment_id"]).unwrap(),
        JsonFields::new(["/amount"]).unwrap(),
    );
    let mut svc = IdempotencyLayer::unscoped(MemoryStore::new())
        .with_key(move |_, body| {
            let key = payment.key("payments", body).map_err(|e| e.to_string())?;
            Ok(Some(key.id().to_owned()))
        })
        .with_fingerprint(move |_, body| amount.fingerprint(body).map_err(|e| e.to_string()))
        .layer(inner);
    let mut send = async |body: &'static str| {
        let req = Request::post("/pay")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        let status = res.status();
        let text = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&text).into_owned())
    };
    let first = send(r#"{"payment_id":"p-1","amount":10,"sent_at":"10:00"}"#).await;
    assert_eq!(first, (StatusCode::OK, "run 1".to_owned()));
    let retry = send(r#"{"sent_at":"10:05","amount":10,"payment_id":"p-1"}"#).await;
    assert_eq!(retry, first, "a retry with another timestamp ran again");
    let other = send(r#"{"payment_id":"p-1","amount":99}"#).await;
    assert_eq!(other.0, StatusCode::UNPROCESSABLE_ENTITY, "{other:?}");
    let next = send(r#"{"payment_id":"p-2","amount":10}"#).await;
    assert_eq!(next, (StatusCode::OK, "run 2".to_owned()));
    let bad = send(r#"{"amount":10}"#).await;
    assert_eq!(bad.0, StatusCode::BAD_REQUEST, "{bad:?}");
    assert!(
        bad.1.contains("invalid-payload") && bad.1.contains("/payment_id"),
        "{bad:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the handler ran for a refused request"
    );
}

//! The layer in gRPC mode on a tonic server: retries charge once, replays are byte-exact with
//! their trailers, and the layer's refusals are gRPC statuses.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use idemgate::MemoryStore;
use idemgate::http::IdempotencyLayer;
use idemgate_example_grpc_payments::pb::ChargeRequest;
use idemgate_example_grpc_payments::pb::payments_client::PaymentsClient;
use idemgate_example_grpc_payments::{Ledger, PaymentsService};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

/// A server on a free port; its address and ledger.
async fn serve() -> (String, Arc<Ledger>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ledger = Arc::new(Ledger::default());
    let layer = IdempotencyLayer::new(MemoryStore::new(), |parts| {
        parts
            .headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
    .for_grpc();
    let service = PaymentsService::new(Arc::clone(&ledger)).into_server();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (format!("http://{addr}"), ledger)
}

fn charge(key: Option<&str>, account: &str, amount: i64) -> tonic::Request<ChargeRequest> {
    let mut req = tonic::Request::new(ChargeRequest {
        account: account.into(),
        amount,
    });
    req.metadata_mut()
        .insert("x-tenant", "acme".parse().unwrap());
    if let Some(k) = key {
        req.metadata_mut()
            .insert("idempotency-key", k.parse().unwrap());
    }
    req
}

async fn client(url: &str) -> PaymentsClient<Channel> {
    PaymentsClient::connect(url.to_owned()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_charge_charges_once_and_gets_the_first_reply() {
    let (url, ledger) = serve().await;
    let mut c = client(&url).await;
    let first = c
        .charge(charge(Some("charge-1"), "alice", 100))
        .await
        .unwrap();
    let again = c
        .charge(charge(Some("charge-1"), "alice", 100))
        .await
        .unwrap();
    assert_eq!(again.get_ref(), first.get_ref());
    assert_eq!(first.get_ref().balance, 900);
    assert!(first.metadata().get("idempotent-replayed").is_none());
    assert_eq!(again.metadata().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(ledger.charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_run_once_and_the_others_are_aborted_with_retry_info() {
    let (url, ledger) = serve().await;
    let c = client(&url).await;
    let mut calls = Vec::new();
    for _ in 0..20 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            c.charge(charge(Some("charge-2"), "bob", 10)).await
        }));
    }
    let (mut ok, mut aborted) = (Vec::new(), 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(reply) => ok.push(reply.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), Code::Aborted, "{status:?}");
                let details = String::from_utf8_lossy(status.details()).into_owned();
                assert!(details.contains("google.rpc.RetryInfo"), "{details:?}");
                aborted += 1;
            }
        }
    }
    // those that came while the first ran were aborted, any later one replayed (the layer's
    // own tests hold a call open to check the abort deterministically)
    assert!(!ok.is_empty(), "{} ok, {aborted} aborted", ok.len());
    assert!(ok.iter().all(|r| *r == ok[0]), "one reply for all: {ok:?}");
    assert_eq!(ledger.charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_and_a_reused_key_are_refused_before_the_service() {
    let (url, ledger) = serve().await;
    let mut c = client(&url).await;
    let missing = c.charge(charge(None, "carol", 10)).await.unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    c.charge(charge(Some("charge-3"), "carol", 10))
        .await
        .unwrap();
    let reused = c
        .charge(charge(Some("charge-3"), "carol", 20))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
    assert!(reused.message().contains("differ"), "{}", reused.message());
    assert_eq!(ledger.charges(), 1);
}

/// One raw HTTP/2 call: (headers, body bytes, trailers).
async fn raw_call(
    url: &str,
    key: &str,
    req: &ChargeRequest,
) -> (http::HeaderMap, Bytes, Option<http::HeaderMap>) {
    let msg = req.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&msg);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = http::Request::post(format!("{url}/payments.Payments/Charge"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-tenant", "acme")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(frame)))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (parts.headers, collected.to_bytes(), trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_byte_exact_with_its_trailers() {
    let (url, ledger) = serve().await;
    let ok = ChargeRequest {
        account: "dave".into(),
        amount: 300,
    };
    let refused = ChargeRequest {
        account: "dave".into(),
        amount: 5_000,
    };
    for (key, req) in [("raw-ok", &ok), ("raw-refused", &refused)] {
        let (mut h1, b1, t1) = raw_call(&url, key, req).await;
        let (mut h2, b2, t2) = raw_call(&url, key, req).await;
        assert_eq!(h2.remove("idempotent-replayed").unwrap(), "true");
        // the server writes its own `date` on every response it sends: not the service's
        h1.remove("date");
        h2.remove("date");
        assert_eq!(h2, h1, "{key}: the headers");
        assert_eq!(b2, b1, "{key}: the body bytes");
        assert_eq!(t2, t1, "{key}: the trailers");
        let status = t1
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| h1.get("grpc-status"))
            .unwrap();
        match key {
            "raw-ok" => assert_eq!(status, "0"),
            _ => {
                // a FAILED_PRECONDITION the service decided is stored, its trailer too
                assert_eq!(status, "9");
                let balance = t1
                    .as_ref()
                    .and_then(|t| t.get("x-balance"))
                    .or_else(|| h1.get("x-balance"));
                assert_eq!(balance.unwrap(), "700");
            }
        }
    }
    assert_eq!(ledger.charges(), 1);
}

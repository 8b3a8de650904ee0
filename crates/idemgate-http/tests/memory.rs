//! A response far over the limit streams through in bounded memory. Alone in its test binary,
//! so that no other test's allocations move the process's peak.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::post;
use idemgate_core::MemoryStore;
use idemgate_http::IdempotencyLayer;

const MAX_RESPONSE: usize = 1 << 20;
const STREAMED: u64 = 256 << 20;

/// The process's peak resident memory so far, in bytes (`VmHWM`).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_response_streams_in_bounded_memory_and_never_reruns() {
    let runs = Arc::new(AtomicU32::new(0));
    let app = {
        let runs = Arc::clone(&runs);
        Router::new()
            .route(
                "/export",
                post(move |body: Bytes| {
                    let runs = Arc::clone(&runs);
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let n = std::str::from_utf8(&body).unwrap().parse().unwrap();
                        Body::new(common::Zeros::new(n, None))
                    }
                }),
            )
            .layer(IdempotencyLayer::unscoped(MemoryStore::new()).with_max_response(MAX_RESPONSE))
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    // reads the whole answer chunk by chunk; returns its status and length
    let export = |key: &'static str, bytes: u64| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let mut res = client
                .post(format!("{base}/export"))
                .header("idempotency-key", key)
                .body(bytes.to_string())
                .send()
                .await
                .unwrap();
            let mut len = 0u64;
            while let Some(chunk) = res.chunk().await.unwrap() {
                len += chunk.len() as u64;
            }
            (res.status().as_u16(), len)
        }
    };
    // warm up every path (a streamed response too) before the baseline
    assert_eq!(export("warm", 4 << 20).await, (200, 4 << 20));
    let before = peak_rss();
    assert_eq!(export("huge", STREAMED).await, (200, STREAMED));
    let grown = peak_rss().saturating_sub(before);
    let bound = 2 * MAX_RESPONSE as u64 + (8 << 20);
    assert!(
        grown < bound,
        "streaming {STREAMED} bytes grew the peak by {grown} bytes (bound {bound})"
    );
    // the retry does not run the handler again
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = export("huge", STREAMED).await;
        if status == 410 {
            break;
        }
        assert_eq!(status, 409);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key stayed in progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the huge export ran twice");
}

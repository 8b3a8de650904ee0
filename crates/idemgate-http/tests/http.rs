//! The layer behind a real axum server on 127.0.0.1, driven by a real HTTP client.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use idemgate_core::{MemoryStore, Store};
use idemgate_http::{IdempotencyLayer, Profile, format_key};
use idemgate_sqlite::SqliteStore;

/// How many handlers started (`.0`) and how many ran to their end (`.1`).
#[derive(Clone, Default)]
struct Calls(Arc<AtomicU32>, Arc<AtomicU32>);

impl Calls {
    fn started(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }

    fn finished(&self) -> u32 {
        self.1.load(Ordering::SeqCst)
    }
}

async fn pay(
    State(calls): State<Calls>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, String); 1], String) {
    let n = calls.0.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(ms) = headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let user = headers
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    calls.1.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::CREATED,
        [("x-payment-id", format!("pay_{n}"))],
        format!(
            "{{\"n\":{n},\"user\":\"{user}\",\"body\":{:?}}}",
            String::from_utf8_lossy(&body)
        ),
    )
}

async fn flaky(State(calls): State<Calls>) -> StatusCode {
    if calls.0.fetch_add(1, Ordering::SeqCst) == 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn boom(State(calls): State<Calls>) -> &'static str {
    if calls.0.fetch_add(1, Ordering::SeqCst) == 0 {
        panic!("handler bug");
    }
    "recovered"
}

/// Streams `x-bytes` zero bytes; counts the handler finished at the body's end.
async fn stream(State(calls): State<Calls>, headers: HeaderMap) -> axum::body::Body {
    calls.0.fetch_add(1, Ordering::SeqCst);
    let n = headers
        .get("x-bytes")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    axum::body::Body::new(common::Zeros::new(n, Some(Arc::clone(&calls.1))))
}

async fn cookie(State(calls): State<Calls>) -> impl axum::response::IntoResponse {
    let n = calls.0.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        [
            ("set-cookie", format!("session=s{n}; HttpOnly")),
            ("x-order", format!("o{n}")),
        ],
        format!("order o{n}"),
    )
}

async fn json(
    State(calls): State<Calls>,
    axum::Json(v): axum::Json<serde_json::Value>,
) -> (StatusCode, String) {
    let n = calls.0.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("{n}:{v}"))
}

async fn auth(State(calls): State<Calls>, headers: HeaderMap) -> (StatusCode, String) {
    match headers.get("x-token").and_then(|v| v.to_str().ok()) {
        Some("ok") => {
            let n = calls.0.fetch_add(1, Ordering::SeqCst) + 1;
            (StatusCode::CREATED, format!("charged {n}"))
        }
        Some(_) => (StatusCode::FORBIDDEN, "forbidden".into()),
        None => (StatusCode::UNAUTHORIZED, "who are you".into()),
    }
}

/// Reserves, then refuses: a rejection status after an effect, marked final.
async fn refuse(State(calls): State<Calls>) -> impl axum::response::IntoResponse {
    let n = calls.0.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        axum::Extension(idemgate_http::Final),
        format!("refused after reservation {n}"),
    )
}

async fn serve<St: Store>(layer: IdempotencyLayer<St>) -> (String, Calls) {
    let calls = Calls::default();
    let app = Router::new()
        .route("/payments", post(pay))
        .route("/flaky", post(flaky))
        .route("/boom", post(boom))
        .route("/stream", post(stream))
        .route("/cookie", post(cookie))
        .route("/json", post(json))
        .route("/auth", post(auth))
        .route("/refuse", post(refuse))
        .route("/ping", get(|| async { "pong" }))
        .with_state(calls.clone())
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), calls)
}

fn scoped<St: Store>(store: St) -> IdempotencyLayer<St> {
    IdempotencyLayer::new(store, |p| {
        p.headers
            .get("x-user")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
    // far longer than any test's deadline: a key is free again only if it was released
    .with_lease(Duration::from_secs(120))
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post_with(
    base: &str,
    path: &str,
    user: &str,
    key: Option<&str>,
    body: &str,
    delay_ms: u64,
) -> reqwest::Response {
    let mut rb = client()
        .post(format!("{base}{path}"))
        .header("x-user", user)
        .header("x-delay-ms", delay_ms.to_string())
        .body(body.to_owned());
    if let Some(k) = key {
        rb = rb.header("idempotency-key", k);
    }
    rb.send().await.unwrap()
}

async fn problem_type(res: reqwest::Response) -> (u16, String, serde_json::Value) {
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = res.json().await.unwrap();
    (status, ct, body)
}

async fn statuses_and_replay<St: Store>(store: St) {
    let (base, calls) = serve(scoped(store)).await;
    let first = post_with(
        &base,
        "/payments",
        "alice",
        Some(&format_key("k-1")),
        "amount=10",
        0,
    )
    .await;
    assert_eq!(first.status(), 201);
    let pid = first.headers()["x-payment-id"].clone();
    let first_body = first.bytes().await.unwrap();
    // bare (Stripe-style) and structured forms name the same key
    for key in ["k-1", "\"k-1\""] {
        let again = post_with(&base, "/payments", "alice", Some(key), "amount=10", 0).await;
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.headers()["x-payment-id"], pid);
        assert_eq!(
            again.bytes().await.unwrap(),
            first_body,
            "replay is not byte for byte"
        );
    }
    assert_eq!(calls.0.load(Ordering::SeqCst), 1);

    // same key, other body: 422, terminal
    let (status, ct, p) =
        problem_type(post_with(&base, "/payments", "alice", Some("k-1"), "amount=99", 0).await)
            .await;
    assert_eq!((status, ct.as_str()), (422, "application/problem+json"));
    assert_eq!(
        p["type"],
        "https://idemgate.dev/problems/idempotency-key-reused"
    );
    assert_eq!(p["retryable"], false);

    // missing and invalid keys: 400 with distinct types; GET is not guarded
    let (status, _, p) =
        problem_type(post_with(&base, "/payments", "alice", None, "x", 0).await).await;
    assert_eq!(
        (status, p["type"].as_str().unwrap()),
        (400, "https://idemgate.dev/problems/missing-idempotency-key")
    );
    for bad in [
        "\"\"".to_owned(),
        "x".repeat(256),
        "\"unterminated".to_owned(),
    ] {
        let (status, _, p) =
            problem_type(post_with(&base, "/payments", "alice", Some(&bad), "x", 0).await).await;
        assert_eq!(
            (status, p["type"].as_str().unwrap()),
            (400, "https://idemgate.dev/problems/invalid-idempotency-key"),
            "{bad}"
        );
    }
    assert_eq!(
        client()
            .get(format!("{base}/ping"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "pong"
    );

    // a request still running: 409 with Retry-After, retryable
    let slow = {
        let base = base.clone();
        tokio::spawn(async move {
            post_with(&base, "/payments", "alice", Some("k-slow"), "s", 600)
                .await
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let busy = post_with(&base, "/payments", "alice", Some("k-slow"), "s", 0).await;
    assert_eq!(busy.status(), 409);
    assert!(busy.headers().get("retry-after").is_some());
    let (_, _, p) = problem_type(busy).await;
    assert_eq!(p["retryable"], true);
    assert_eq!(slow.await.unwrap(), 201);

    // over the body limit: 413, answered from the announced length before any of the body is
    // read. (A client that streams the body meanwhile may see the connection closed under its
    // write instead of the answer, as reqwest sometimes does: so only the headers are sent.)
    assert_eq!(
        status_of_headers_only(&base, "/payments", "alice", "k-big", (1 << 20) + 1).await,
        413
    );
}

/// Sends a POST's headers announcing `length` bytes, none of the body, and returns the status
/// of the answer.
async fn status_of_headers_only(
    base: &str,
    path: &str,
    user: &str,
    key: &str,
    length: usize,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nx-user: {user}\r\nidempotency-key: {key}\r\n\
         content-length: {length}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed before an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    // "HTTP/1.1 413 Payload Too Large"
    std::str::from_utf8(&answer[9..12])
        .unwrap()
        .parse()
        .unwrap()
}

async fn five_hundreds_release_and_panics_leave_nothing_stuck<St: Store>(store: St) {
    let (base, calls) = serve(scoped(store)).await;
    assert_eq!(
        post_with(&base, "/flaky", "u", Some("f"), "", 0)
            .await
            .status(),
        503
    );
    let again = post_with(&base, "/flaky", "u", Some("f"), "", 0).await;
    assert_eq!(again.status(), 200, "a 5xx must release the key");
    assert!(again.headers().get("idempotent-replayed").is_none());
    assert_eq!(calls.0.load(Ordering::SeqCst), 2);

    // the handler panics: the client gets 500 and the key is released for the retry at once
    // (the lease is 120 s: a key left to expire would answer 409 here)
    calls.0.store(0, Ordering::SeqCst);
    let first = post_with(&base, "/boom", "u", Some("p"), "", 0).await;
    assert_eq!(first.status(), 500);
    let retry = post_with(&base, "/boom", "u", Some("p"), "", 0).await;
    assert_eq!(retry.status(), 200, "the key stayed stuck after a panic");
    assert_eq!(retry.text().await.unwrap(), "recovered");
    assert_eq!(calls.0.load(Ordering::SeqCst), 2);
}

async fn tenants_never_see_each_other<St: Store>(store: St) {
    let (base, calls) = serve(scoped(store)).await;
    let (a, b) = tokio::join!(
        post_with(&base, "/payments", "alice", Some("same"), "x", 100),
        post_with(&base, "/payments", "bob", Some("same"), "x", 100)
    );
    let (a, b) = (a.text().await.unwrap(), b.text().await.unwrap());
    assert!(
        a.contains("\"user\":\"alice\"") && b.contains("\"user\":\"bob\""),
        "{a} / {b}"
    );
    assert_eq!(calls.0.load(Ordering::SeqCst), 2);
    let replay = post_with(&base, "/payments", "bob", Some("same"), "x", 0)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(replay, b);
    // no principal, no idempotency: refused
    let res = client()
        .post(format!("{base}/payments"))
        .header("idempotency-key", "same")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

async fn hundred_concurrent_retries_run_once<St: Store>(store: St, wait: bool) {
    let layer = scoped(store);
    let layer = if wait {
        layer.with_wait(Duration::from_secs(10))
    } else {
        layer
    };
    let (base, calls) = serve(layer).await;
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move {
                let res =
                    post_with(&base, "/payments", "carol", Some("once"), "amount=5", 50).await;
                (res.status().as_u16(), res.text().await.unwrap())
            })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            201 => {
                bodies.insert(body);
            }
            409 if !wait => {}
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(
        calls.0.load(Ordering::SeqCst),
        1,
        "the handler ran more than once"
    );
    assert_eq!(bodies.len(), 1, "retries got different responses");
}

/// A client that gives up mid-request does not run the handler twice: the handler runs to its
/// end, a retry meanwhile gets 409, and a retry afterwards gets the stored response.
async fn a_disconnected_client_gets_the_replay<St: Store>(store: St) {
    let (base, calls) = serve(scoped(store)).await;
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let gone = quick
        .post(format!("{base}/payments"))
        .header("x-user", "d")
        .header("idempotency-key", "gone")
        .header("x-delay-ms", "1500")
        .body("amount=7")
        .send()
        .await;
    assert!(gone.is_err(), "the client should have timed out");
    // the handler is still running, detached from the dropped connection
    let busy = post_with(&base, "/payments", "d", Some("gone"), "amount=7", 0).await;
    assert_eq!(
        busy.status(),
        409,
        "the retry ran while the first still ran"
    );
    assert_eq!(busy.headers()["retry-after"], "1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while calls.finished() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the handler was cancelled with its connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the key is completed right after the handler returns
    let replay = past_409(deadline, || {
        post_with(&base, "/payments", "d", Some("gone"), "amount=7", 0)
    })
    .await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert!(replay.text().await.unwrap().contains("\"n\":1"));
    assert_eq!(calls.started(), 1, "the handler ran twice");
}

/// Sends with `send` until the answer is not 409 (the first request still settling), up to
/// `deadline`.
async fn past_409<F, Fut>(deadline: tokio::time::Instant, send: F) -> reqwest::Response
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = reqwest::Response>,
{
    loop {
        let res = send().await;
        if res.status() != 409 {
            return res;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key stayed in progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A response over the limit streams through whole; the key remembers that it ran, and a retry
/// gets the `response-not-stored` problem instead of a second run (or, under
/// `Oversized::Release`, runs again).
async fn oversized_responses_stream_and_never_rerun<St: Store>(store: St) {
    let layer = scoped(store).with_max_response(4096);
    let (base, calls) = serve(layer.clone()).await;
    let big = |key: &'static str| {
        let base = base.clone();
        async move {
            client()
                .post(format!("{base}/stream"))
                .header("x-user", "o")
                .header("idempotency-key", key)
                .header("x-bytes", "300000")
                .send()
                .await
                .unwrap()
        }
    };
    let first = big("big").await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.bytes().await.unwrap().len(), 300_000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let again = past_409(deadline, || big("big")).await;
    assert_eq!(again.status(), 410);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let (_, _, p) = problem_type(again).await;
    assert_eq!(
        p["type"],
        "https://idemgate.dev/problems/response-not-stored"
    );
    assert!(p["detail"].as_str().unwrap().contains("status 200"), "{p}");
    assert_eq!(calls.started(), 1, "the handler ran again");

    // a small response under the same limit is stored as usual
    let small = post_with(&base, "/payments", "o", Some("small"), "x", 0).await;
    assert_eq!(small.status(), 201);

    let (base, calls) = serve(layer.with_oversized(idemgate_http::Oversized::Release)).await;
    for _ in 0..2 {
        let res = client()
            .post(format!("{base}/stream"))
            .header("x-user", "o")
            .header("idempotency-key", "released")
            .header("x-bytes", "300000")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.bytes().await.unwrap().len(), 300_000);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while calls.finished() < calls.started() {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Cookies and hop-by-hop headers go to the first client only; other headers are replayed.
async fn cookies_are_not_replayed<St: Store>(store: St) {
    let (base, calls) = serve(scoped(store)).await;
    let first = post_with(&base, "/cookie", "c", Some("ck"), "", 0).await;
    assert_eq!(first.headers()["set-cookie"], "session=s1; HttpOnly");
    let again = post_with(&base, "/cookie", "c", Some("ck"), "", 0).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["x-order"], "o1");
    assert!(
        again.headers().get("set-cookie").is_none(),
        "a replay handed out the first client's cookie"
    );
    assert_eq!(calls.started(), 1);
}

/// A request refused before the handler did anything (a malformed body, missing credentials)
/// does not use up its key; a refusal the handler marks `Final` does.
async fn rejections_do_not_use_up_the_key<St: Store>(store: St) {
    let (base, calls) = serve(scoped(store)).await;
    let send =
        |path: &'static str, key: &'static str, body: &'static str, token: Option<&'static str>| {
            let base = base.clone();
            async move {
                let mut rb = client()
                    .post(format!("{base}{path}"))
                    .header("x-user", "r")
                    .header("idempotency-key", key)
                    .header("content-type", "application/json")
                    .body(body);
                if let Some(t) = token {
                    rb = rb.header("x-token", t);
                }
                let res = rb.send().await.unwrap();
                let replayed = res.headers().contains_key("idempotent-replayed");
                (res.status().as_u16(), replayed, res.text().await.unwrap())
            }
        };
    // axum's own JSON rejections: a syntax error (400), then a body of the wrong shape
    assert_eq!(send("/json", "j", "{not json", None).await.0, 400);
    let fixed = send("/json", "j", "{\"amount\": 5}", None).await;
    assert_eq!(
        fixed,
        (201, false, "1:{\"amount\":5}".to_owned()),
        "the corrected retry was refused"
    );
    assert!(send("/json", "j", "{\"amount\": 5}", None).await.1);

    // missing, then wrong, then right credentials under one key
    assert_eq!(send("/auth", "a", "{}", None).await.0, 401);
    assert_eq!(send("/auth", "a", "{}", Some("bad")).await.0, 403);
    // (one counter for every route: the JSON handler ran once before)
    assert_eq!(
        send("/auth", "a", "{}", Some("ok")).await,
        (201, false, "charged 2".to_owned())
    );
    assert_eq!(
        send("/auth", "a", "{}", Some("ok")).await,
        (201, true, "charged 2".to_owned())
    );

    // a 422 after an effect, marked final: stored and replayed
    let first = send("/refuse", "f", "{}", None).await;
    assert_eq!(
        first,
        (422, false, "refused after reservation 3".to_owned())
    );
    let again = send("/refuse", "f", "{}", None).await;
    assert_eq!(again, (422, true, "refused after reservation 3".to_owned()));
    assert_eq!(
        calls.started(),
        3,
        "json, auth and refuse ran once each after their fixes"
    );
}

async fn stripe_profile_stores_5xx<St: Store>(store: St) {
    let (base, calls) = serve(scoped(store).with_profile(Profile::Stripe)).await;
    assert_eq!(
        post_with(&base, "/flaky", "u", Some("s"), "", 0)
            .await
            .status(),
        503
    );
    let again = post_with(&base, "/flaky", "u", Some("s"), "", 0).await;
    assert_eq!(again.status(), 503);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(calls.0.load(Ordering::SeqCst), 1);
}

fn sqlite() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (SqliteStore::open(dir.path().join("http.db")).unwrap(), dir)
}

macro_rules! on_stores {
    ($($name:ident => |$s:ident| $body:expr;)*) => {
        mod memory {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let $s = MemoryStore::new();
                $body.await;
            })*
        }
        mod sqlite_store {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let (store, _dir) = sqlite();
                let $s = store;
                $body.await;
            })*
        }
        mod postgres {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some($s) = postgres().await else { return };
                $body.await;
            })*
        }
        mod redis {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some($s) = redis().await else { return };
                $body.await;
            })*
        }
    };
}

static N: AtomicU32 = AtomicU32::new(0);

async fn postgres() -> Option<idemgate_postgres::PostgresStore> {
    let url = idemgate_testkit::service::url(
        "IDEMGATE_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let table = format!(
        "idemgate_http{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let store = idemgate_postgres::PostgresStore::builder()
        .with_url(url)
        .with_table(table)
        .build()
        .unwrap();
    idemgate_testkit::service::connect("PostgreSQL", async {
        store.migrate().await.map(|()| store)
    })
    .await
}

async fn redis() -> Option<idemgate_redis::RedisStore> {
    let url = idemgate_testkit::service::url("IDEMGATE_REDIS_URL", "redis://127.0.0.1:6379");
    let prefix = format!(
        "idemgate-http:{}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    idemgate_testkit::service::connect(
        "Redis",
        idemgate_redis::RedisStore::builder()
            .with_url(url)
            .with_key_prefix(prefix)
            .build(),
    )
    .await
}

on_stores! {
    statuses => |s| statuses_and_replay(s);
    releases => |s| five_hundreds_release_and_panics_leave_nothing_stuck(s);
    tenants => |s| tenants_never_see_each_other(s);
    concurrent_reject => |s| hundred_concurrent_retries_run_once(s, false);
    concurrent_wait => |s| hundred_concurrent_retries_run_once(s, true);
    stripe => |s| stripe_profile_stores_5xx(s);
    disconnect => |s| a_disconnected_client_gets_the_replay(s);
    oversized => |s| oversized_responses_stream_and_never_rerun(s);
    cookies => |s| cookies_are_not_replayed(s);
    rejections => |s| rejections_do_not_use_up_the_key(s);
}

mod parser {
    use idemgate_http::{format_key, parse_key};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn structured_form_round_trips(key in "[ -~]{1,255}") {
            let raw = format_key(&key);
            let parsed = parse_key(raw.as_bytes());
            prop_assert_eq!(parsed.as_deref(), Ok(key.as_str()));
        }

        #[test]
        fn bare_visible_keys_parse_as_themselves(key in "[!-~]{1,255}") {
            prop_assume!(!key.starts_with('"'));
            let parsed = parse_key(key.as_bytes());
            prop_assert_eq!(parsed.as_deref(), Ok(key.as_str()));
        }

        #[test]
        fn anything_else_is_an_error_not_a_panic(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_key(&raw);
        }
    }
}

#[test]
fn configuring_a_cloned_layer_does_not_touch_the_original() {
    let layer = IdempotencyLayer::unscoped(MemoryStore::new());
    let copy = layer
        .clone()
        .with_profile(Profile::Stripe)
        .with_max_body(10);
    assert!(format!("{copy:?}").contains("Stripe"));
    assert!(format!("{layer:?}").contains("Ietf"));
}

/// A body in several frames and of unknown length, as a chunked upload or a streamed response.
struct Chunks(std::collections::VecDeque<Bytes>);

impl Chunks {
    fn of(parts: &[&'static str]) -> Self {
        Chunks(
            parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        )
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test]
async fn bodies_in_several_frames_are_read_whole_and_limited() {
    use tower::ServiceExt;
    let calls = Calls::default();
    // the handler answers in three frames: the body's first two bytes, the rest, then "!"
    let app = Router::new()
        .route(
            "/echo",
            post(|State(calls): State<Calls>, body: Bytes| async move {
                calls.0.fetch_add(1, Ordering::SeqCst);
                let (head, tail) = body.split_at(2.min(body.len()));
                let frames = [
                    Bytes::copy_from_slice(head),
                    Bytes::copy_from_slice(tail),
                    Bytes::from_static(b"!"),
                ];
                axum::body::Body::new(Chunks(frames.into_iter().collect()))
            }),
        )
        .with_state(calls.clone())
        .layer(IdempotencyLayer::unscoped(MemoryStore::new()).with_max_body(10));
    // sends one request with `key`; answers status, whether replayed, and the body
    let send = |key: &str, body: axum::body::Body| {
        let req = axum::http::Request::post("/echo")
            .header("idempotency-key", format_key(key))
            .body(body)
            .unwrap();
        let app = app.clone();
        async move {
            let res = app.oneshot(req).await.unwrap();
            let replayed = res.headers().contains_key("idempotent-replayed");
            let status = res.status().as_u16();
            let body = axum::body::to_bytes(res.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, replayed, body)
        }
    };
    let chunks = |parts| axum::body::Body::new(Chunks::of(parts));
    let echoed = Bytes::from_static(b"abcdef!");

    assert_eq!(
        send("k1", chunks(&["abc", "def"])).await,
        (200, false, echoed.clone())
    );
    // the same bytes in one frame are the same request: replayed, byte for byte
    assert_eq!(
        send("k1", axum::body::Body::from("abcdef")).await,
        (200, true, echoed)
    );
    // different bytes under the same key: a mismatch, whatever the framing
    assert_eq!(send("k1", chunks(&["abc", "xyz"])).await.0, 422);
    // over the limit with no length announced: 413 once the frames pass it
    assert_eq!(send("k2", chunks(&["0123456", "789ab"])).await.0, 413);
    assert_eq!(calls.0.load(Ordering::SeqCst), 1);
}

/// Fresh keys cannot grow a memory store without bound: once its outcome bytes are used up, a
/// request still runs and answers, its key records that it ran (410 on a retry, no second run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_store_never_reruns_a_request() {
    let store = MemoryStore::builder()
        .with_max_outcome_bytes(2_000)
        .build()
        .unwrap();
    let (base, calls) = serve(scoped(store)).await;
    let body = "x".repeat(700);
    let mut answers = Vec::new();
    for i in 0..5 {
        let key = format!("fill-{i}");
        let res = post_with(&base, "/payments", "m", Some(&key), &body, 0).await;
        assert_eq!(res.status(), 201, "a request was refused on a full store");
        let again = post_with(&base, "/payments", "m", Some(&key), &body, 0).await;
        answers.push(again.status().as_u16());
    }
    assert_eq!(calls.started(), 5, "a retry ran again");
    assert_eq!(answers[0], 201, "the first response was not stored");
    assert_eq!(
        answers[4], 410,
        "a response past the bound was neither stored nor marked"
    );
}

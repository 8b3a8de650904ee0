//! `idemgate proxy` in front of a service written in Python (`tests/common/upstream.py`).

mod common;

use std::time::Duration;

use common::{calls, proxy, python_upstream};

fn post(url: String, user: &str, key: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(url)
        .header("x-user", user)
        .header("idempotency-key", key)
        .body(r#"{"amount": 100}"#)
}

async fn problem_type(res: reqwest::Response) -> String {
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "a problem document"
    );
    let body: serde_json::Value = res.json().await.unwrap();
    body["type"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_retries_make_one_upstream_call_and_get_one_answer() {
    let up = python_upstream(None).await;
    let p = proxy(
        up.port,
        "[[route]]\npath = \"/charge\"\nwait = \"20s\"",
        |o| o,
    )
    .await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let req = client
            .post(p.url("/charge"))
            .header("x-user", "alice")
            .header("idempotency-key", "charge-1")
            .header("x-delay", "0.5")
            .body(r#"{"amount": 100}"#);
        tasks.push(tokio::spawn(async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let first = answers[0].clone();
    assert_eq!(first.0, 201, "{}", first.1);
    assert!(
        answers.iter().all(|a| *a == first),
        "one answer for all: {answers:?}"
    );
    assert_eq!(calls(&up).await["alice|charge-1"], 1);
    assert!(p.shut_down().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_and_retries_makes_one_upstream_call() {
    let up = python_upstream(None).await;
    let p = proxy(up.port, "", |o| o).await;
    let gone = post(p.url("/orders"), "alice", "order-1")
        .header("x-delay", "1")
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(gone.unwrap_err().is_timeout(), "the client gave up");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let res = loop {
        let res = post(p.url("/orders"), "alice", "order-1")
            .send()
            .await
            .unwrap();
        if res.status() != 409 {
            break res;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still running after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["call"], 1);
    assert_eq!(calls(&up).await["alice|order-1"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_5xx_releases_the_key() {
    let up = python_upstream(None).await;
    let p = proxy(up.port, "", |o| o).await;
    let first = post(p.url("/flaky"), "alice", "k").send().await.unwrap();
    assert_eq!(first.status(), 500);
    let second = post(p.url("/flaky"), "alice", "k").send().await.unwrap();
    assert_eq!(second.status(), 201, "the 500 released the key");
    let third = post(p.url("/flaky"), "alice", "k").send().await.unwrap();
    assert_eq!(third.headers()["idempotent-replayed"], "true");
    assert_eq!(calls(&up).await["alice|k"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_gives_502_and_leaves_no_key_behind() {
    // a port nobody listens on, until the upstream starts there
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = proxy(port, "", |o| o).await;
    for _ in 0..2 {
        let res = post(p.url("/orders"), "alice", "order-9")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 502, "not 409: the key was released");
        assert!(problem_type(res).await.ends_with("/upstream-unavailable"));
    }
    let up = python_upstream(Some(port)).await;
    let res = post(p.url("/orders"), "alice", "order-9")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(calls(&up).await["alice|order-9"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_does_not_answer_in_time_gives_504_and_releases_the_key() {
    let up = python_upstream(None).await;
    let p = proxy(
        up.port,
        "[[route]]\npath = \"/slow\"\ntimeout = \"300ms\"",
        |o| o,
    )
    .await;
    let res = post(p.url("/slow"), "alice", "s")
        .header("x-delay", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 504);
    assert!(problem_type(res).await.ends_with("/upstream-timeout"));
    let res = post(p.url("/slow"), "alice", "s").send().await.unwrap();
    assert_eq!(res.status(), 201, "released: the retry runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_principals_with_one_key_never_see_each_others_response() {
    let up = python_upstream(None).await;
    let p = proxy(up.port, "", |o| o).await;
    for user in ["alice", "bob", "alice", "bob"] {
        let res = post(p.url("/orders"), user, "same").send().await.unwrap();
        assert_eq!(res.status(), 201);
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["principal"], user);
    }
    let counted = calls(&up).await;
    assert_eq!(counted["alice|same"], 1);
    assert_eq!(counted["bob|same"], 1);
    // without the trusted header, no scope: refused before the upstream
    let res = reqwest::Client::new()
        .post(p.url("/orders"))
        .header("idempotency-key", "same")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert!(problem_type(res).await.ends_with("/missing-scope"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_guard_stream_through() {
    let up = python_upstream(None).await;
    let routes =
        "[[route]]\npath = \"/orders\"\n[[route]]\npath = \"/files/{*rest}\"\nguard = false";
    let p = proxy(up.port, routes, |o| o).await;
    let client = reqwest::Client::new();
    let get = client.get(p.url("/orders?x=1")).send().await.unwrap();
    assert_eq!(get.status(), 200);
    let body: serde_json::Value = get.json().await.unwrap();
    assert_eq!(body["path"], "/orders?x=1");
    // no key needed off the guarded routes, and no replay there
    for _ in 0..2 {
        let res = client.post(p.url("/files/a/b")).send().await.unwrap();
        assert_eq!(res.status(), 201);
        assert!(res.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(calls(&up).await["|"], 2);
    let res = client.post(p.url("/orders")).send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert!(
        problem_type(res)
            .await
            .ends_with("/missing-idempotency-key")
    );
    let health = client.get(p.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_lets_running_requests_finish() {
    let up = python_upstream(None).await;
    let p = proxy(up.port, "", |o| o).await;
    let running = tokio::spawn(
        post(p.url("/orders"), "alice", "late")
            .header("x-delay", "1")
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(p.shut_down().await, "drained in time");
    let res = running.await.unwrap().unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(calls(&up).await["alice|late"], 1);
}

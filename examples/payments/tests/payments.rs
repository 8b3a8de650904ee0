//! The example end to end: 100 concurrent retries make one payment capture and one charge.

use idemgate::postgres::PostgresStore;
use idemgate_example_payments::{NetworkStats, Payment, app, card_network, migrate};
use idemgate_testkit::service;

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// Sends `n` copies of one request at once; each answer must be `ok` or 409 (the first copy
/// still running); returns the distinct `ok` bodies.
async fn retried(
    n: usize,
    ok: u16,
    request: impl Fn() -> reqwest::RequestBuilder,
) -> std::collections::HashSet<String> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let req = request();
            tokio::spawn(async move {
                let res = req.send().await.unwrap();
                (res.status().as_u16(), res.text().await.unwrap())
            })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert!(status == ok || status == 409, "{status}: {body}");
        if status == ok {
            bodies.insert(body);
        }
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_create_one_payment_and_one_charge() {
    let url = service::url(
        "IDEMGATE_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let Some(pool) = service::connect("PostgreSQL", sqlx::PgPool::connect(&url)).await else {
        return;
    };
    let n = format!(
        "{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    );
    let (table, keys) = (format!("payments_t{n}"), format!("payments_keys_t{n}"));
    migrate(&pool, &table).await.unwrap();
    let store = PostgresStore::builder()
        .with_pool(pool.clone())
        .with_table(&keys)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let network = serve(card_network()).await;
    let api = serve(app(pool.clone(), &table, store, &network)).await;
    let http = reqwest::Client::new();

    // 100 concurrent retries of one create: one payment
    let created = retried(100, 201, || {
        http.post(format!("{api}/payments"))
            .header("x-api-key", "shop-1")
            .header("idempotency-key", "\"order-77\"")
            .header("content-type", "application/json")
            .body(r#"{"amount":1250,"currency":"EUR"}"#)
    })
    .await;
    assert_eq!(created.len(), 1, "retries created different payments");
    let payment: Payment = serde_json::from_str(created.iter().next().unwrap()).unwrap();
    let (rows,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);

    // 100 concurrent retries of one capture: one charge at the card network
    let captured = retried(100, 200, || {
        http.post(format!("{api}/payments/{}/capture", payment.id))
            .header("x-api-key", "shop-1")
            .header("idempotency-key", "cap-1")
    })
    .await;
    assert_eq!(captured.len(), 1);
    let stats: NetworkStats = http
        .get(format!("{network}/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats.charges, 1,
        "the card was charged more than once: {stats:?}"
    );

    // the same key with another body is refused; another shop's same key is its own
    let res = http
        .post(format!("{api}/payments"))
        .header("x-api-key", "shop-1")
        .header("idempotency-key", "\"order-77\"")
        .header("content-type", "application/json")
        .body(r#"{"amount":9999,"currency":"EUR"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    let res = http
        .post(format!("{api}/payments"))
        .header("x-api-key", "shop-2")
        .header("idempotency-key", "\"order-77\"")
        .header("content-type", "application/json")
        .body(r#"{"amount":1250,"currency":"EUR"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let other: Payment = res.json().await.unwrap();
    assert_ne!(other.id, payment.id);
}

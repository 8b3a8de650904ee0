//! The example end to end: 100 concurrent retries make one payment capture and one charge.

use idemgate_example_payments::{NetworkStats, Payment, app, card_network, migrate};
use idemgate_postgres::PostgresStore;
use idemgate_testkit::service;

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
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
    let creates: Vec<_> = (0..100)
        .map(|_| {
            let (http, api) = (http.clone(), api.clone());
            tokio::spawn(async move {
                let res = http
                    .post(format!("{api}/payments"))
                    .header("x-api-key", "shop-1")
                    .header("idempotency-key", "\"order-77\"")
                    .header("content-type", "application/json")
                    .body(r#"{"amount":1250,"currency":"EUR"}"#)
                    .send()
                    .await
                    .unwrap();
                (res.status().as_u16(), res.text().await.unwrap())
            })
        })
        .collect();
    let mut created = std::collections::HashSet::new();
    for t in creates {
        let (status, body) = t.await.unwrap();
        assert!(status == 201 || status == 409, "{status}: {body}");
        if status == 201 {
            created.insert(body);
        }
    }
    assert_eq!(created.len(), 1, "retries created different payments");
    let payment: Payment = serde_json::from_str(created.iter().next().unwrap()).unwrap();
    let (rows,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);

    // 100 concurrent retries of one capture: one charge at the card network
    let captures: Vec<_> = (0..100)
        .map(|_| {
            let (http, api, id) = (http.clone(), api.clone(), payment.id.clone());
            tokio::spawn(async move {
                let res = http
                    .post(format!("{api}/payments/{id}/capture"))
                    .header("x-api-key", "shop-1")
                    .header("idempotency-key", "cap-1")
                    .send()
                    .await
                    .unwrap();
                (res.status().as_u16(), res.text().await.unwrap())
            })
        })
        .collect();
    let mut captured = std::collections::HashSet::new();
    for t in captures {
        let (status, body) = t.await.unwrap();
        assert!(status == 200 || status == 409, "{status}: {body}");
        if status == 200 {
            captured.insert(body);
        }
    }
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

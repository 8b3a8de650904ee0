//! The layer in process (tower `oneshot`, no network): a trivial axum handler with and without
//! `IdempotencyLayer` on a `MemoryStore`, for fresh keys and for replays.

use std::hint::black_box;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, StatusCode};
use idemgate_core::MemoryStore;
use idemgate_http::IdempotencyLayer;
use tower::ServiceExt;

fn app() -> Router {
    Router::new().route(
        "/orders",
        post(|body: axum::body::Bytes| async move {
            black_box(body);
            (StatusCode::CREATED, "{\"ok\":true}")
        }),
    )
}

fn request(id: u64) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", format!("\"bench-{id}\""))
        .body(Body::from("{\"sku\":\"A1\",\"qty\":2}"))
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("http layer");
    g.throughput(Throughput::Elements(1));
    let plain = app();
    let guarded = app().layer(IdempotencyLayer::unscoped(MemoryStore::unbounded()));
    let mut next = 0u64;
    let mut id = || {
        next += 1;
        next
    };
    g.bench_function("no layer", |b| {
        b.to_async(&rt).iter_batched(
            || request(id()),
            |req| plain.clone().oneshot(req),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("layer, fresh keys", |b| {
        b.to_async(&rt).iter_batched(
            || request(id()),
            |req| guarded.clone().oneshot(req),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("layer, replays", |b| {
        b.to_async(&rt).iter_batched(
            || request(u64::MAX - 1),
            |req| guarded.clone().oneshot(req),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

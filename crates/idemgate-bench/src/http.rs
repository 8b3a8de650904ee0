//! `idemgate bench http`: a trivial axum handler over HTTP on 127.0.0.1, with and without the
//! Idempotency-Key layer, in the same run.

use std::process::ExitCode;

use clap::Args;
use idemgate::core::{MemoryStore, Store};

use crate::{BoxError, drive, median};

/// `bench http`: a trivial axum handler, with and without the layer.
#[derive(Debug, Args)]
pub struct HttpBench {
    /// The layer's store: `memory:` or any store URL.
    #[arg(long, default_value = "memory:")]
    store: String,
    /// Concurrent clients (keep-alive connections).
    #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    clients: usize,
    /// Requests per measurement.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    requests: u64,
    /// Rounds; each figure is the median of its rounds, each ratio the median of the rounds'
    /// ratios. The order of the three measurements rotates from one round to the next.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
}

/// A server on 127.0.0.1 with a trivial POST handler, optionally behind the layer.
async fn http_server<St: Store>(store: Option<St>) -> Result<String, BoxError> {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/orders",
        // a POST handler reads its body, with or without the layer
        post(|body: axum::body::Bytes| async move {
            std::hint::black_box(body);
            (axum::http::StatusCode::CREATED, "{\"ok\":true}")
        }),
    );
    let app = match store {
        Some(store) => app.layer(idemgate_http::IdempotencyLayer::unscoped(store)),
        None => app,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}/orders"))
}

pub(crate) async fn run(h: HttpBench) -> Result<ExitCode, BoxError> {
    // the memory store as a service would hold it; any other behind the erased `BoxStore`
    let guarded = if h.store == "memory:" {
        http_server(Some(MemoryStore::unbounded())).await?
    } else {
        http_server(Some(idemgate::open(&h.store).await?)).await?
    };
    let plain = http_server::<MemoryStore>(None).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(h.clients)
        .build()?;
    // both servers get the same requests, key header included: only the layer differs
    let run = |url: String, keys: u64| {
        let client = client.clone();
        drive(h.clients, h.requests, move |i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                // fresh keys, or `keys` keys replayed over and over
                let id = if keys == 0 { i } else { i % keys };
                let res = client
                    .post(&url)
                    .body("{\"sku\":\"A1\",\"qty\":2}")
                    .header("idempotency-key", format!("\"bench-{id}\""))
                    .send()
                    .await?;
                if !res.status().is_success() {
                    return Err(format!("status {}", res.status()).into());
                }
                res.bytes().await?;
                Ok(())
            }
        })
    };
    // warm-up: connections, the replay set
    run(plain.clone(), 0).await?;
    run(guarded.clone(), 1000).await?;
    // each round runs the three measurements in another order (rotated), so a phase of the
    // machine or the state one run leaves behind does not always land on the same measurement
    let measurements = [(&plain, 0), (&guarded, 0), (&guarded, 1000)];
    let mut rows: Vec<[f64; 3]> = Vec::new();
    for round in 0..h.rounds.max(1) as usize {
        let mut row = [0.0; 3];
        for k in 0..3 {
            let m = (round + k) % 3;
            let (url, keys) = measurements[m];
            row[m] = run(url.clone(), keys).await?;
        }
        rows.push(row);
    }
    let (raw, fresh, replay) = (
        median(rows.iter().map(|r| r[0])),
        median(rows.iter().map(|r| r[1])),
        median(rows.iter().map(|r| r[2])),
    );
    // each round against the no-layer run of that same round
    let ratio = |i: usize| 100.0 * median(rows.iter().map(|r| r[i] / r[0]));
    println!("{:<58} {:>12} {:>9}", "measurement", "req/s", "vs raw");
    println!(
        "{:<58} {raw:>12.0} {:>9}",
        format!("trivial handler, no layer, {} clients", h.clients),
        "(ceiling)"
    );
    println!(
        "{:<58} {fresh:>12.0} {:>8.0}%",
        format!("with the layer ({}), fresh keys", h.store),
        ratio(1)
    );
    println!(
        "{:<58} {replay:>12.0} {:>8.0}%",
        format!("with the layer ({}), replays", h.store),
        ratio(2)
    );
    Ok(ExitCode::SUCCESS)
}

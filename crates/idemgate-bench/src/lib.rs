//! The benchmarks behind `idemgate bench`: each measures idemgate beside a ceiling taken in the
//! same run (a raw store operation, a handler without the layer, a bare consumer), and reports
//! medians of per-round ratios. Not published: the `idemgate` binary is its only user.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::{Args, Subcommand};

mod cache;
#[cfg(feature = "brokers")]
mod consumer;
mod http;
#[cfg(feature = "brokers")]
mod outbox;
mod proxy;
mod store;

pub use cache::CacheBench;
#[cfg(feature = "brokers")]
pub use consumer::ConsumerBench;
pub use http::HttpBench;
#[cfg(feature = "brokers")]
pub use outbox::OutboxBench;
pub use proxy::ProxyBench;
pub use store::StoreBench;

pub use idemgate::BoxError;

/// `idemgate bench`: what to measure.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Debug, Subcommand)]
enum BenchWhat {
    /// Claim + complete and the inbox against raw `SET NX PX` or a raw insert.
    Store(store::StoreBench),
    /// Replays of a hot key set through `CachedStore` and straight to the store.
    Cache(cache::CacheBench),
    /// A trivial axum handler over HTTP on 127.0.0.1, with and without the Idempotency-Key layer.
    Http(http::HttpBench),
    /// A consumer on a real broker: bare, in Gate mode and in Inbox mode.
    #[cfg(feature = "brokers")]
    Consumer(consumer::ConsumerBench),
    /// The transactional outbox: the relay against a bare producer, the enqueue against a
    /// bare second insert, and commit-to-publish latency at a fixed rate.
    #[cfg(feature = "brokers")]
    Outbox(outbox::OutboxBench),
    /// `idemgate proxy` guarding every POST (memory and Redis stores, fresh keys and
    /// replays), guarding nothing, and nginx as a plain reverse proxy, loaded by wrk.
    Proxy(proxy::ProxyBench),
}

/// Runs the benchmark `args` names.
pub fn run(args: BenchArgs) -> Result<ExitCode, BoxError> {
    match args.what {
        BenchWhat::Store(b) => store::run(b),
        BenchWhat::Http(h) => runtime()?.block_on(http::run(h)),
        BenchWhat::Cache(c) => runtime()?.block_on(cache::run(c)),
        #[cfg(feature = "brokers")]
        BenchWhat::Consumer(c) => runtime()?.block_on(consumer::run(c)),
        #[cfg(feature = "brokers")]
        BenchWhat::Outbox(o) => runtime()?.block_on(outbox::run(o)),
        BenchWhat::Proxy(p) => proxy::run(p),
    }
}

/// The multi-threaded runtime every benchmark runs on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The median of `values` (0 when there are none). Ratios are taken per round, each row against
/// the ceiling measured in the same round, then the median of those: the machine's slow swings
/// between fast and slow phases cancel within a round instead of between rounds.
pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs `op(i)` for `i` in `0..ops` on `clients` concurrent tasks; returns operations per second.
pub(crate) async fn drive<F, Fut>(clients: usize, ops: u64, op: F) -> Result<f64, BoxError>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send,
{
    // every measurement gets its own range of ids, so none of them meets another's keys
    let base = NEXT_ID.fetch_add(ops, Ordering::Relaxed);
    let next = Arc::new(AtomicU64::new(base));
    let ops = base + ops;
    let count = ops - base;
    let op = Arc::new(op);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (next, op) = (Arc::clone(&next), Arc::clone(&op));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ops {
                        return Ok::<_, BoxError>(());
                    }
                    op(i).await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

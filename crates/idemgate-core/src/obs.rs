//! Tracing spans and metrics of the Gate, compiled away without the features.

use std::future::Future;

use crate::key::Key;
use crate::record::Lease;

/// Counts one Gate outcome: `fresh`, `replayed`, `in_progress`, `mismatch`, `failed`,
/// `lease_lost`.
pub(crate) fn outcome(_what: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idemgate_gate_total", "outcome" => _what).increment(1);
    #[cfg(feature = "tracing")]
    tracing::debug!(outcome = _what, "idemgate gate");
}

pub(crate) fn takeover() {
    #[cfg(feature = "metrics")]
    metrics::counter!("idemgate_takeovers_total").increment(1);
    #[cfg(feature = "tracing")]
    tracing::info!("took over an expired lease");
}

pub(crate) fn renew_failed(_e: &crate::Error) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idemgate_renew_failures_total").increment(1);
    #[cfg(feature = "tracing")]
    tracing::warn!(error = %_e, "lease renewal failed; retrying at the next heartbeat");
}

/// Times one store call into `idemgate_store_seconds{op}`.
pub(crate) async fn timed<T>(_op: &'static str, fut: impl Future<Output = T>) -> T {
    #[cfg(feature = "metrics")]
    let start = std::time::Instant::now();
    let out = fut.await;
    #[cfg(feature = "metrics")]
    metrics::histogram!("idemgate_store_seconds", "op" => _op)
        .record(start.elapsed().as_secs_f64());
    out
}

/// Runs a fresh execution inside an `idemgate.run` span carrying key, token and attempt.
pub(crate) async fn fresh_span<T>(_key: &Key, _lease: &Lease, fut: impl Future<Output = T>) -> T {
    #[cfg(feature = "tracing")]
    {
        use tracing::Instrument;
        let span = tracing::info_span!("idemgate.run", key = %_key, token = _lease.token(), attempt = _lease.attempt());
        fut.instrument(span).await
    }
    #[cfg(not(feature = "tracing"))]
    fut.await
}

/// Counts one claim of a `CachedStore`: answered from the cache (`hit`) or by the store.
#[cfg(feature = "cache")]
pub(crate) fn cache(_hit: bool) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idemgate_cache_total", "result" => if _hit { "hit" } else { "miss" })
        .increment(1);
}

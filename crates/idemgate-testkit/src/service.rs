//! Real services for tests: their URLs, and what to do when one is missing.

use std::fmt::Display;
use std::future::Future;

/// A name no other test uses, in this process or a concurrent one:
/// `idemgate_<what>_<pid>_<n>_<ms>`, for tables, queues, topics, streams and client ids.
pub fn unique(what: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "idemgate_{what}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
            % 1_000_000
    )
}

/// The URL of a service from `env`, or this machine's default.
pub fn url(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_owned())
}

/// Whether a missing service fails the test (`IDEMGATE_REQUIRE_SERVICES=1`, set by
/// `scripts/test` and CI) rather than skipping it (a developer's ad-hoc run).
pub fn required() -> bool {
    std::env::var("IDEMGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Connects to a service: the value, or `None` (with a note on stderr) when the service is down
/// and skipping is allowed. Panics, naming the service and the error, when services are required.
pub async fn connect<T, E: Display>(
    name: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Option<T> {
    match fut.await {
        Ok(v) => Some(v),
        Err(e) if required() => {
            panic!("{name} is required (IDEMGATE_REQUIRE_SERVICES=1) but unreachable: {e}")
        }
        Err(e) => {
            eprintln!(
                "skipping: {name} unreachable ({e}); set IDEMGATE_REQUIRE_SERVICES=1 to fail instead"
            );
            None
        }
    }
}

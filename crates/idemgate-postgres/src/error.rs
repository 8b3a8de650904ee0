//! Classifies PostgreSQL failures into idemgate's error kinds.

pub(crate) use idemgate_sql::check_ident;

/// SQLSTATE classes and codes that a retry on a fresh connection may cure: connection
/// exceptions (08), operator intervention such as `pg_terminate_backend` (57P01..57P03),
/// serialization failures and deadlocks (40001, 40P01), lock timeouts (55P03), too many
/// connections (53300).
fn retryable(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57P")
        || matches!(code, "40001" | "40P01" | "55P03" | "53300")
}

/// `sqlx::Result` classified into idemgate's `Result`.
pub(crate) fn pg<T>(r: Result<T, sqlx::Error>) -> idemgate_core::Result<T> {
    r.map_err(classify_error)
}

/// A `sqlx` failure of this database as idemgate's error: `Unavailable` when a retry on a fresh
/// connection may cure it (a lost connection, a deadlock, a serialization failure), otherwise
/// `Backend`. For the transactions a caller opens around an inbox.
pub fn classify_error(e: sqlx::Error) -> idemgate_core::Error {
    idemgate_sql::classify("postgres", e, |db| db.code().is_some_and(|c| retryable(&c)))
}

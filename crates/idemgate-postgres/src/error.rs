//! PostgreSQL failures as idemgate's error kinds (the rules live in `idemgate-sql`).

pub(crate) use idemgate_sql::check_ident;

/// A `sqlx` failure of this database as idemgate's error: `Unavailable` when a retry on a fresh
/// connection may cure it (a lost connection, a deadlock, a serialization failure), otherwise
/// `Backend`. For the transactions a caller opens around an inbox.
pub use idemgate_sql::classify_postgres as classify_error;

/// `sqlx::Result` classified into idemgate's `Result`.
pub(crate) fn pg<T>(r: Result<T, sqlx::Error>) -> idemgate_core::Result<T> {
    r.map_err(classify_error)
}

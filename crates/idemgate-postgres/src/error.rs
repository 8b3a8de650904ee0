//! Classifies PostgreSQL failures into idemgate's error kinds.

use idemgate_core::Error;

/// A PostgreSQL failure, before classification.
#[derive(Debug)]
pub(crate) struct Pg(pub(crate) sqlx::Error);

impl From<sqlx::Error> for Pg {
    fn from(e: sqlx::Error) -> Self {
        Pg(e)
    }
}

/// SQLSTATE classes and codes that a retry on a fresh connection may cure: connection
/// exceptions (08), operator intervention such as `pg_terminate_backend` (57P01..57P03),
/// serialization failures and deadlocks (40001, 40P01), lock timeouts (55P03).
fn retryable(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57P")
        || matches!(code, "40001" | "40P01" | "55P03" | "53300")
}

impl From<Pg> for Error {
    fn from(Pg(e): Pg) -> Self {
        let unavailable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|c| retryable(&c)),
            _ => false,
        };
        match e {
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_) => Error::Corrupt {
                backend: "postgres",
                reason: e.to_string(),
            },
            sqlx::Error::Configuration(_) => Error::Config {
                message: e.to_string(),
            },
            e if unavailable => Error::Unavailable {
                backend: "postgres",
                source: Box::new(e),
            },
            e => Error::Backend {
                backend: "postgres",
                source: Box::new(e),
            },
        }
    }
}

/// `sqlx::Result` classified into idemgate's `Result`.
pub(crate) fn pg<T>(r: Result<T, sqlx::Error>) -> idemgate_core::Result<T> {
    r.map_err(|e| Pg(e).into())
}

/// Checks that `name` is a plain identifier, so it can be spliced into SQL.
pub(crate) fn check_ident(name: &str) -> idemgate_core::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config {
            message: format!(
                "table name {name:?} must be a lowercase identifier ([a-z_][a-z0-9_]*, at most 48)"
            ),
        })
    }
}

//! Shared pieces of idemgate's sqlx backends (`idemgate-postgres`, `idemgate-mysql`): how a
//! `sqlx::Error` maps onto idemgate's error kinds, and which table names are accepted.
//!
//! ```
//! use idemgate_core::Error;
//! let e = idemgate_sql::classify("postgres", sqlx::Error::PoolTimedOut, |_| false);
//! assert!(matches!(e, Error::Unavailable { backend: "postgres", .. }));
//! assert!(idemgate_sql::check_ident("idemgate_records").is_ok());
//! assert!(idemgate_sql::check_ident("x; drop").is_err());
//! ```

use idemgate_core::Error;
use sqlx::error::DatabaseError;

/// Classifies a sqlx failure: connection and pool failures, and the database errors
/// `retryable_db` names (connection killed, deadlock, serialization failure…), are
/// [`Error::Unavailable`]; undecodable columns are [`Error::Corrupt`]; bad URLs
/// [`Error::Config`]; anything else [`Error::Backend`].
pub fn classify(
    backend: &'static str,
    e: sqlx::Error,
    retryable_db: impl Fn(&dyn DatabaseError) -> bool,
) -> Error {
    let unavailable = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => retryable_db(db.as_ref()),
        _ => false,
    };
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_) => Error::Corrupt {
            backend,
            reason: e.to_string(),
        },
        sqlx::Error::Configuration(_) => Error::Config {
            message: e.to_string(),
        },
        e if unavailable => Error::Unavailable {
            backend,
            source: Box::new(e),
        },
        e => Error::Backend {
            backend,
            source: Box::new(e),
        },
    }
}

/// Checks that `name` is a lowercase identifier (`[a-z_][a-z0-9_]*`, at most 48 bytes), so it
/// can be spliced into SQL.
pub fn check_ident(name: &str) -> idemgate_core::Result<()> {
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

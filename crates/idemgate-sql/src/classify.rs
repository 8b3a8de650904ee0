//! How a `sqlx::Error` maps onto idemgate's error kinds, and which table names are accepted.

#[cfg(any(feature = "postgres", feature = "mysql"))]
use idemgate_core::Error;
#[cfg(any(feature = "postgres", feature = "mysql"))]
use sqlx::error::DatabaseError;

#[cfg(any(feature = "postgres", feature = "mysql"))]
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
    crate::Dialect::Postgres.check_table(name)
}

/// SQLSTATE classes and codes that a retry on a fresh connection may cure: connection
/// exceptions (08), operator intervention such as `pg_terminate_backend` (57P01..57P03),
/// serialization failures and deadlocks (40001, 40P01), lock timeouts (55P03), too many
/// connections (53300).
#[cfg(feature = "postgres")]
fn pg_retryable(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57P")
        || matches!(code, "40001" | "40P01" | "55P03" | "53300")
}

/// A PostgreSQL failure as idemgate's error: `Unavailable` when a retry on a fresh connection
/// may cure it (a lost connection, a deadlock, a serialization failure), otherwise `Backend`.
#[cfg(feature = "postgres")]
pub fn classify_postgres(e: sqlx::Error) -> Error {
    classify("postgres", e, |db| {
        db.code().is_some_and(|c| pg_retryable(&c))
    })
}

/// MySQL server error numbers a retry on a fresh connection may cure: deadlock (1213), lock
/// wait timeout (1205), connection killed or server going away (1053, 1317, 1927, 2006, 2013),
/// too many connections (1040).
#[cfg(feature = "mysql")]
fn my_retryable(number: u16) -> bool {
    matches!(
        number,
        1040 | 1053 | 1205 | 1213 | 1317 | 1927 | 2006 | 2013
    )
}

/// A MySQL or MariaDB failure as idemgate's error: `Unavailable` when a retry on a fresh
/// connection may cure it (a lost connection, a deadlock, a lock wait timeout), otherwise
/// `Backend`.
#[cfg(feature = "mysql")]
pub fn classify_mysql(e: sqlx::Error) -> Error {
    classify("mysql", e, |db| {
        db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|m| my_retryable(m.number()))
    })
}

/// The classification of `dialect`'s sqlx failures.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn classify_for(dialect: crate::Dialect) -> fn(sqlx::Error) -> Error {
    match dialect {
        #[cfg(feature = "postgres")]
        crate::Dialect::Postgres => classify_postgres,
        #[cfg(feature = "mysql")]
        crate::Dialect::MySql => classify_mysql,
        _ => |e| classify("sql", e, |_| false),
    }
}

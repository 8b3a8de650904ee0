//! Classifies SQLite failures into idemgate's error kinds.

use idemgate_core::Error;
use rusqlite::ErrorCode;

/// A SQLite failure, before classification.
#[derive(Debug)]
pub(crate) struct Sql(pub(crate) rusqlite::Error);

impl From<rusqlite::Error> for Sql {
    fn from(e: rusqlite::Error) -> Self {
        Sql(e)
    }
}

impl From<Sql> for Error {
    fn from(Sql(e): Sql) -> Self {
        let code = e.sqlite_error_code();
        match code {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Error::Corrupt {
                backend: "sqlite",
                reason: e.to_string(),
            },
            Some(
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::OutOfMemory,
            ) => Error::Unavailable {
                backend: "sqlite",
                source: Box::new(e),
            },
            _ => Error::Backend {
                backend: "sqlite",
                source: Box::new(e),
            },
        }
    }
}

/// `rusqlite::Result` classified into idemgate's `Result`.
pub(crate) fn sql<T>(r: rusqlite::Result<T>) -> idemgate_core::Result<T> {
    r.map_err(|e| Sql(e).into())
}

pub(crate) fn corrupt(reason: impl Into<String>) -> Error {
    Error::Corrupt {
        backend: "sqlite",
        reason: reason.into(),
    }
}

//! Classifies MySQL and MariaDB failures into idemgate's error kinds.

use idemgate_core::Error;
use sqlx::mysql::MySqlDatabaseError;

/// Server error numbers a retry on a fresh connection may cure: deadlock (1213), lock wait
/// timeout (1205), connection killed or server going away (1053, 1317, 1927, 2006, 2013),
/// too many connections (1040).
fn retryable(number: u16) -> bool {
    matches!(
        number,
        1040 | 1053 | 1205 | 1213 | 1317 | 1927 | 2006 | 2013
    )
}

pub(crate) fn my<T>(r: Result<T, sqlx::Error>) -> idemgate_core::Result<T> {
    r.map_err(classify)
}

pub(crate) fn classify(e: sqlx::Error) -> Error {
    let unavailable = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|m| retryable(m.number())),
        _ => false,
    };
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_) => Error::Corrupt {
            backend: "mysql",
            reason: e.to_string(),
        },
        sqlx::Error::Configuration(_) => Error::Config {
            message: e.to_string(),
        },
        e if unavailable => Error::Unavailable {
            backend: "mysql",
            source: Box::new(e),
        },
        e => Error::Backend {
            backend: "mysql",
            source: Box::new(e),
        },
    }
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

/// A condition matching these keys that the `(scope, id)` primary key serves as ranges:
/// `(scope = ? AND id IN (?, …)) OR …`, and its parameters in order. (A row-value
/// `(scope, id) IN ((?, ?), …)` list is scanned, not looked up, by some MariaDB versions.)
pub(crate) fn keys_condition<'k>(
    keys: impl IntoIterator<Item = &'k idemgate_core::Key>,
) -> (String, Vec<&'k str>) {
    let mut by_scope: Vec<(&str, Vec<&str>)> = Vec::new();
    for k in keys {
        match by_scope.iter_mut().find(|(s, _)| *s == k.scope()) {
            Some((_, ids)) => ids.push(k.id()),
            None => by_scope.push((k.scope(), vec![k.id()])),
        }
    }
    let cond = by_scope
        .iter()
        .map(|(_, ids)| {
            format!(
                "(scope = ? AND id IN ({}))",
                vec!["?"; ids.len()].join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join(" OR ");
    let params = by_scope
        .into_iter()
        .flat_map(|(s, ids)| std::iter::once(s).chain(ids))
        .collect();
    (cond, params)
}

//! MySQL and MariaDB failures as idemgate's error kinds (the rules live in `idemgate-sql`).

/// A `sqlx` failure of this database as idemgate's error: `Unavailable` when a retry on a fresh
/// connection may cure it (a lost connection, a deadlock, a lock wait timeout), otherwise
/// `Backend`. For the transactions a caller opens around an inbox.
pub use idemgate_sql::classify_mysql as classify_error;

/// `sqlx::Result` classified into idemgate's `Result`.
pub(crate) fn my<T>(r: Result<T, sqlx::Error>) -> idemgate_core::Result<T> {
    r.map_err(classify_error)
}

pub(crate) use idemgate_sql::check_ident;

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

//! Reading an inbox row and consumer positions by URL, for `idemgate explain`.

use std::collections::BTreeMap;

use idemgate_core::{Error, Key};

pub use idemgate_sql::InboxRow;

/// `key`'s row in the inbox table `table` of the database at `url` (`sqlite:PATH`,
/// `postgres://…`, `mysql://…`).
pub async fn inbox_row(url: &str, table: &str, key: &Key) -> Result<Option<InboxRow>, Error> {
    on_sql!(url, |conn| idemgate_sql::inbox_row(conn, table, key))
}

/// The stored next offset of each partition of `topic` for `group`, in the offsets table
/// `table` of the database at `url`.
pub async fn positions(
    url: &str,
    table: &str,
    group: &str,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, Error> {
    let offsets = idemgate_sql::Offsets::new().with_table(table);
    on_sql!(url, |conn| offsets.load_positions(conn, group, topic))
}

/// Runs `$f(conn)` on a connection to the SQL database `$url` names.
macro_rules! on_sql {
    ($url:expr, |$conn:ident| $f:expr) => {{
        let url: &str = $url;
        if let Some(path) = url.strip_prefix("sqlite:") {
            sqlite(path, |$conn| idemgate_sqlite::ready($f))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let store = postgres(url)?;
            let mut c = store
                .pool()
                .acquire()
                .await
                .map_err(|e| unavailable("postgres", e))?;
            let $conn = &mut *c;
            $f.await
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let store = mysql(url)?;
            let mut c = store
                .pool()
                .acquire()
                .await
                .map_err(|e| unavailable("mysql", e))?;
            let $conn = &mut *c;
            $f.await
        } else {
            Err(Error::Config {
                message: format!(
                    "inbox rows and positions are in SQL databases: sqlite:PATH, postgres://… or mysql://…, not {url:?}"
                ),
            })
        }
    }};
}
use on_sql;

fn unavailable(backend: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Unavailable {
        backend,
        source: Box::new(e),
    }
}

fn sqlite<T>(
    path: &str,
    f: impl FnOnce(&mut idemgate_sqlite::Lite<'_>) -> Result<T, Error>,
) -> Result<T, Error> {
    let path = path.strip_prefix("//").unwrap_or(path);
    if !std::path::Path::new(path).exists() {
        return Err(Error::Config {
            message: format!("no SQLite database at {path}"),
        });
    }
    idemgate_sqlite::with_connection(path, f)
}

fn postgres(url: &str) -> Result<idemgate_postgres::PostgresStore, Error> {
    idemgate_postgres::PostgresStore::builder()
        .with_url(url)
        .build()
}

fn mysql(url: &str) -> Result<idemgate_mysql::MySqlStore, Error> {
    idemgate_mysql::MySqlStore::builder()
        .with_url(url.replacen("mariadb://", "mysql://", 1))
        .build()
}

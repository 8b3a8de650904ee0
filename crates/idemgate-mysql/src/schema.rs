//! Versioned migrations, serialized across processes by a named lock.

use idemgate_core::{Error, Result};
use sqlx::{MySqlConnection, MySqlPool};

use crate::error::my;

async fn columns(conn: &mut MySqlConnection, table: &str) -> Result<Vec<String>> {
    let cols: Vec<(String,)> = my(sqlx::query_as(
        "SELECT CAST(column_name AS CHAR) FROM information_schema.columns
          WHERE table_schema = DATABASE() AND table_name = ? ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(conn)
    .await)?;
    Ok(cols.into_iter().map(|c| c.0).collect())
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        backend: "mysql",
        reason,
    }
}

/// Applies `ddl` (statements separated by `;`) for `component` at `version` unless applied,
/// then checks the table's columns. DDL commits implicitly in MySQL, so migrations are
/// serialized by `GET_LOCK` instead of a transaction.
pub(crate) async fn migrate(
    pool: &MySqlPool,
    component: &str,
    version: i32,
    ddl: &[String],
    want: &[&str],
) -> Result<()> {
    let mut conn = my(pool.acquire().await)?;
    let (locked,): (Option<i64>,) = my(sqlx::query_as("SELECT GET_LOCK('idemgate_migrate', 60)")
        .fetch_one(&mut *conn)
        .await)?;
    if locked != Some(1) {
        return Err(Error::Unavailable {
            backend: "mysql",
            source: "could not take the migration lock".into(),
        });
    }
    let result = async {
        my(sqlx::query(
            "CREATE TABLE IF NOT EXISTS idemgate_schema (component VARCHAR(64) PRIMARY KEY, version INT NOT NULL) ENGINE=InnoDB",
        )
        .execute(&mut *conn)
        .await)?;
        let foreign = |have: &[String]| corrupt(format!("table {component} has columns {have:?}, expected {want:?}: it belongs to something else"));
        let have = columns(&mut conn, component).await?;
        if !have.is_empty() && have != want {
            return Err(foreign(&have));
        }
        let found: Option<(i32,)> = my(sqlx::query_as("SELECT version FROM idemgate_schema WHERE component = ?")
            .bind(component)
            .fetch_optional(&mut *conn)
            .await)?;
        match found {
            Some((v,)) if v > version => {
                return Err(corrupt(format!("{component} has schema version {v}; this idemgate knows up to {version}")));
            }
            Some(_) => {}
            None => {
                for stmt in ddl {
                    my(sqlx::query(stmt).execute(&mut *conn).await)?;
                }
                my(sqlx::query("INSERT INTO idemgate_schema (component, version) VALUES (?, ?)")
                    .bind(component)
                    .bind(version)
                    .execute(&mut *conn)
                    .await)?;
            }
        }
        let have = columns(&mut conn, component).await?;
        if have != want {
            return Err(foreign(&have));
        }
        Ok(())
    }
    .await;
    let _ = sqlx::query("SELECT RELEASE_LOCK('idemgate_migrate')")
        .execute(&mut *conn)
        .await;
    result
}

//! Versioned migrations, serialized across processes by an advisory lock.

use idemgate_core::{Error, Result};
use sqlx::{PgConnection, PgPool};

use crate::error::pg;

async fn columns(conn: &mut PgConnection, table: &str) -> Result<Vec<String>> {
    let cols: Vec<(String,)> = pg(sqlx::query_as(
        "SELECT column_name::text FROM information_schema.columns
          WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(conn)
    .await)?;
    Ok(cols.into_iter().map(|c| c.0).collect())
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        backend: "postgres",
        reason,
    }
}

/// Applies `ddl` for `component` (a table) at `version` unless already applied, then checks the
/// table's columns: a table of that name made by something else is [`Error::Corrupt`].
pub(crate) async fn migrate(
    pool: &PgPool,
    component: &str,
    version: i32,
    ddl: &str,
    want: &[&str],
) -> Result<()> {
    let mut tx = pg(pool.begin().await)?;
    // one migration at a time, across every process sharing the database
    pg(sqlx::query("SELECT pg_advisory_xact_lock(7301311)")
        .execute(&mut *tx)
        .await)?;
    pg(sqlx::query("CREATE TABLE IF NOT EXISTS idemgate_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        .execute(&mut *tx)
        .await)?;
    let foreign = |have: &[String]| {
        corrupt(format!(
            "table {component} has columns {have:?}, expected {want:?}: it belongs to something else"
        ))
    };
    let have = columns(&mut tx, component).await?;
    if !have.is_empty() && have != want {
        return Err(foreign(&have));
    }
    let found: Option<(i32,)> = pg(sqlx::query_as(
        "SELECT version FROM idemgate_schema WHERE component = $1",
    )
    .bind(component)
    .fetch_optional(&mut *tx)
    .await)?;
    match found {
        Some((v,)) if v > version => {
            return Err(corrupt(format!(
                "{component} has schema version {v}; this idemgate knows up to {version}"
            )));
        }
        Some(_) => {}
        None => {
            pg(sqlx::raw_sql(ddl).execute(&mut *tx).await)?;
            pg(
                sqlx::query("INSERT INTO idemgate_schema (component, version) VALUES ($1, $2)")
                    .bind(component)
                    .bind(version)
                    .execute(&mut *tx)
                    .await,
            )?;
        }
    }
    let have = columns(&mut tx, component).await?;
    if have != want {
        return Err(foreign(&have));
    }
    pg(tx.commit().await)
}

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

/// Brings `component` (a table) to version `steps.len()`: `steps[i]` takes it from version `i`
/// to `i + 1` (version 0: no table). Steps already applied are skipped, so a table made by an
/// older idemgate is upgraded in place. Then checks the table's columns: a table of that name
/// made by something else is [`Error::Corrupt`].
pub(crate) async fn migrate(
    pool: &PgPool,
    component: &str,
    steps: &[&str],
    want: &[&str],
) -> Result<()> {
    let version = i32::try_from(steps.len()).unwrap_or(i32::MAX);
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
    let found: Option<(i32,)> = pg(sqlx::query_as(
        "SELECT version FROM idemgate_schema WHERE component = $1",
    )
    .bind(component)
    .fetch_optional(&mut *tx)
    .await)?;
    let from = match found {
        Some((v,)) if v > version => {
            return Err(corrupt(format!(
                "{component} has schema version {v}; this idemgate knows up to {version}"
            )));
        }
        Some((v,)) => usize::try_from(v).unwrap_or(0),
        None => {
            // no record of ours: the table must not exist yet, or be exactly this version's
            // (every step is written to be a no-op on what it would create)
            let have = columns(&mut tx, component).await?;
            if !have.is_empty() && have != want {
                return Err(foreign(&have));
            }
            0
        }
    };
    if from < steps.len() {
        for ddl in &steps[from..] {
            pg(sqlx::raw_sql(ddl).execute(&mut *tx).await)?;
        }
        pg(sqlx::query(
            "INSERT INTO idemgate_schema (component, version) VALUES ($1, $2)
             ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
        )
        .bind(component)
        .bind(version)
        .execute(&mut *tx)
        .await)?;
    }
    let have = columns(&mut tx, component).await?;
    if have != want {
        return Err(foreign(&have));
    }
    pg(tx.commit().await)
}

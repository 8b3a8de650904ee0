//! One migration algorithm for every SQL backend: versioned steps, serialized across processes.

use idemgate_core::{Error, Result};

use crate::{Arg, Dialect, Kind, SqlConn};

/// Brings `component` (a table) to version `steps.len()`: `steps[i]` takes it from version `i`
/// to `i + 1` (version 0: no table; a step may hold several statements separated by `;`).
/// Steps already applied are skipped, so a table made by an older idemgate is upgraded in
/// place. A table of that name with other columns than `want`, or a recorded version newer than
/// `steps`, is [`Error::Corrupt`]: it belongs to something else, or to a newer idemgate.
///
/// Versions are recorded in the table `idemgate_schema` (`component`, `version`), one row per
/// table. A recorded table that is missing (dropped to reset it) is created again; to reset
/// one, drop it, or delete its row as well.
///
/// Migrations are serialized across every process sharing the database: PostgreSQL by an
/// advisory lock in the migration's transaction, MySQL by a named lock (its DDL commits on its
/// own), SQLite by its write lock (`BEGIN IMMEDIATE`, or a savepoint inside the caller's
/// transaction).
pub async fn migrate<C: SqlConn>(
    conn: &mut C,
    component: &str,
    steps: &[String],
    want: &[&str],
) -> Result<()> {
    let d = conn.dialect();
    if d == Dialect::MySql {
        // MySQL's DDL commits on its own: a named lock serializes the migrations instead
        let locked = conn
            .fetch("SELECT GET_LOCK('idemgate_migrate', 60)", &[], &[Kind::Int])
            .await?;
        if locked.first().and_then(|r| r[0].int()) != Some(1) {
            return Err(Error::Unavailable {
                backend: "mysql",
                source: "could not take the migration lock".into(),
            });
        }
        let result = steps_in_lock(conn, component, steps, want).await;
        let _ = conn
            .fetch("SELECT RELEASE_LOCK('idemgate_migrate')", &[], &[Kind::Int])
            .await;
        return result;
    }
    // a transaction, or a savepoint in the caller's (SQLite's takes its write lock up front,
    // and its first statement touches the file: a foreign one fails here, as `Corrupt`)
    crate::in_transaction(conn, async |conn| {
        if d == Dialect::Postgres {
            // `CREATE … IF NOT EXISTS` of what exists is a NOTICE, which sqlx logs at INFO
            conn.batch(
                "SET LOCAL client_min_messages TO WARNING; SELECT pg_advisory_xact_lock(7301311)",
            )
            .await?;
        }
        steps_in_lock(conn, component, steps, want).await
    })
    .await
}

async fn columns<C: SqlConn>(conn: &mut C, table: &str) -> Result<Vec<String>> {
    let q = conn.dialect().columns_query();
    let rows = conn.fetch(q, &[Arg::Text(table)], &[Kind::Text]).await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| r.into_iter().next().and_then(|v| v.into_text()))
        .collect())
}

async fn steps_in_lock<C: SqlConn>(
    conn: &mut C,
    component: &str,
    steps: &[String],
    want: &[&str],
) -> Result<()> {
    let d = conn.dialect();
    let corrupt = |reason: String| Error::Corrupt {
        backend: d.backend(),
        reason,
    };
    let foreign = |have: &[String]| {
        corrupt(format!(
            "table {component} has columns {have:?}, expected {want:?}: it belongs to something else"
        ))
    };
    let version = i64::try_from(steps.len()).unwrap_or(i64::MAX);
    conn.batch(&format!(
        "CREATE TABLE IF NOT EXISTS idemgate_schema (component {} PRIMARY KEY, version {} NOT NULL){}",
        match d {
            Dialect::MySql => "VARCHAR(64)",
            _ => "TEXT",
        },
        d.int_type(),
        match d {
            Dialect::MySql => " ENGINE=InnoDB",
            _ => "",
        }
    ))
    .await?;
    let found = conn
        .fetch(
            &d.sql("SELECT version FROM idemgate_schema WHERE component = ?"),
            &[Arg::Text(component)],
            &[Kind::Int32],
        )
        .await?
        .first()
        .and_then(|r| r[0].int());
    let have = columns(conn, component).await?;
    let from = match found {
        Some(v) if v > version => {
            return Err(corrupt(format!(
                "{component} has schema version {v}; this idemgate knows up to {version}"
            )));
        }
        // a recorded table that was dropped (to reset it) is created again
        Some(_) if have.is_empty() => 0,
        Some(v) => usize::try_from(v).unwrap_or(0),
        None => {
            // no record of ours: the table must not exist yet (version 0), or already have
            // this version's columns (it is at this version; only the record is written)
            match &have[..] {
                [] => 0,
                have if have == want => steps.len(),
                have => return Err(foreign(have)),
            }
        }
    };
    if found.is_none() || from < steps.len() {
        for step in &steps[from..] {
            conn.batch(step).await?;
        }
        let version = i32::try_from(version).unwrap_or(i32::MAX);
        let upsert = match d {
            Dialect::MySql => {
                "INSERT INTO idemgate_schema (component, version) VALUES (?, ?)
                 ON DUPLICATE KEY UPDATE version = VALUES(version)"
            }
            _ => {
                "INSERT INTO idemgate_schema (component, version) VALUES (?, ?)
                 ON CONFLICT (component) DO UPDATE SET version = excluded.version"
            }
        };
        conn.execute(&d.sql(upsert), &[Arg::Text(component), Arg::Int32(version)])
            .await?;
    }
    let have = columns(conn, component).await?;
    if have != want {
        return Err(foreign(&have));
    }
    Ok(())
}

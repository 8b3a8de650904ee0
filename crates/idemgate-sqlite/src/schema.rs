//! Migrations: every table idemgate keeps in a SQLite file, versioned.

use idemgate_core::{Error, Result};
use rusqlite::{Connection, OptionalExtension};

use crate::error::{corrupt, sql};

/// Checks that `name` is a plain identifier, so it can be spliced into SQL.
pub(crate) fn check_table(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config {
            message: format!(
                "table name {name:?} must be an identifier ([A-Za-z_][A-Za-z0-9_]*, at most 64)"
            ),
        })
    }
}

/// Applies the migration for `component` (a table) at `version`, unless already applied.
/// Equivalent to [`migrate_up`] with no upgrade steps.
pub(crate) fn migrate(
    conn: &Connection,
    component: &str,
    version: i64,
    ddl: &str,
    columns: &[&str],
) -> Result<()> {
    migrate_up(conn, component, version, ddl, &[], columns)
}

/// Applies the migration for `component` (a table) at `version`, unless already applied;
/// a table at an older version is brought up by `upgrades[v - 1]` for each version `v` it
/// lacks (`upgrades[0]` takes version 1 to 2).
///
/// A table that exists with other columns than `columns`, or a recorded version newer than this
/// code knows, is [`Error::Corrupt`]: the file belongs to something else, or to a newer idemgate.
/// Outside a transaction it takes the write lock first (`BEGIN IMMEDIATE`), so processes that
/// start together migrate one after another.
pub(crate) fn migrate_up(
    conn: &Connection,
    component: &str,
    version: i64,
    ddl: &str,
    upgrades: &[&str],
    columns: &[&str],
) -> Result<()> {
    let (begin, commit, rollback) = if conn.is_autocommit() {
        ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")
    } else {
        (
            "SAVEPOINT idemgate_migrate",
            "RELEASE idemgate_migrate",
            "ROLLBACK TO idemgate_migrate; RELEASE idemgate_migrate",
        )
    };
    // the first statement touches the file: a foreign file fails here, as `Corrupt`
    sql(conn.execute_batch(begin))?;
    let result = migrate_in_tx(conn, component, version, ddl, upgrades, columns);
    match result {
        Ok(()) => sql(conn.execute_batch(commit)),
        Err(e) => {
            let _ = conn.execute_batch(rollback);
            Err(e)
        }
    }
}

fn migrate_in_tx(
    conn: &Connection,
    component: &str,
    version: i64,
    ddl: &str,
    upgrades: &[&str],
    columns: &[&str],
) -> Result<()> {
    sql(conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS idemgate_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    ))?;
    let found: Option<i64> = sql(conn
        .query_row(
            "SELECT version FROM idemgate_schema WHERE component = ?1",
            [component],
            |r| r.get(0),
        )
        .optional())?;
    let check_columns = || -> Result<bool> {
        let mut stmt = sql(conn.prepare("SELECT name FROM pragma_table_info(?1)"))?;
        let have: Vec<String> = sql(stmt
            .query_map([component], |r| r.get(0))
            .and_then(|rows| rows.collect()))?;
        if !have.is_empty() && have != columns {
            return Err(corrupt(format!(
                "table {component} has columns {have:?}, expected {columns:?}: it belongs to something else"
            )));
        }
        Ok(!have.is_empty())
    };
    match found {
        Some(v) if v > version => {
            return Err(corrupt(format!(
                "{component} has schema version {v}; this idemgate knows up to {version}"
            )));
        }
        Some(v) if v < version => {
            for step in v..version {
                let ddl = usize::try_from(step - 1)
                    .ok()
                    .and_then(|i| upgrades.get(i))
                    .ok_or_else(|| {
                        corrupt(format!(
                            "{component} has schema version {v}, which this idemgate cannot upgrade"
                        ))
                    })?;
                sql(conn.execute_batch(ddl))?;
            }
            sql(conn.execute(
                "UPDATE idemgate_schema SET version = ?2 WHERE component = ?1",
                rusqlite::params![component, version],
            ))?;
        }
        // a table of the same name made by something else is refused before any DDL touches it
        Some(_) => {
            check_columns()?;
        }
        None => {
            check_columns()?;
            sql(conn.execute_batch(ddl))?;
            sql(conn.execute(
                "INSERT INTO idemgate_schema (component, version) VALUES (?1, ?2)",
                rusqlite::params![component, version],
            ))?;
        }
    }
    if check_columns()? {
        Ok(())
    } else {
        Err(corrupt(format!(
            "table {component} is missing after its migration"
        )))
    }
}

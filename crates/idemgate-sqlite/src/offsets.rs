//! Kafka consumer positions kept in the inbox transaction, on SQLite.

use std::collections::BTreeMap;

use idemgate_core::{Error, Result};
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::sql;
use crate::schema::{check_table, migrate};

/// Consumer positions `(group, topic, partition) -> next_offset`, advanced by compare-and-set
/// inside the caller's transaction together with the inbox row and the business change. On
/// partition assignment, seek to [`load_positions`](Self::load_positions); a writer whose
/// expected position is stale gets [`Error::Fenced`] and changes nothing.
///
/// ```
/// use idemgate_sqlite::SqliteOffsets;
///
/// let mut conn = rusqlite::Connection::open_in_memory().unwrap();
/// let offsets = SqliteOffsets::new();
/// offsets.migrate(&conn)?;
/// let tx = conn.transaction().unwrap();
/// offsets.advance(&tx, "billing", "orders", 0, None, 1)?;
/// tx.commit().unwrap();
/// assert_eq!(offsets.load_positions(&conn, "billing", "orders")?.get(&0), Some(&1));
/// # Ok::<(), idemgate_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SqliteOffsets {
    table: String,
}

impl Default for SqliteOffsets {
    fn default() -> Self {
        Self::new()
    }
}

impl SqliteOffsets {
    /// Positions in table `idemgate_offsets`.
    pub fn new() -> Self {
        SqliteOffsets {
            table: "idemgate_offsets".into(),
        }
    }

    /// Another table (an identifier).
    pub fn with_table(mut self, table: impl Into<String>) -> Result<Self> {
        self.table = table.into();
        check_table(&self.table)?;
        Ok(self)
    }

    /// Creates the table if missing.
    pub fn migrate(&self, conn: &Connection) -> Result<()> {
        let t = &self.table;
        migrate(
            conn,
            t,
            1,
            &format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    consumer_group TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL,
                    next_offset INTEGER NOT NULL,
                    PRIMARY KEY (consumer_group, topic, part)) WITHOUT ROWID"
            ),
            &["consumer_group", "topic", "part", "next_offset"],
        )
    }

    /// The stored next offset of every partition of `topic` for `group`.
    pub fn load_positions(
        &self,
        conn: &Connection,
        group: &str,
        topic: &str,
    ) -> Result<BTreeMap<i32, i64>> {
        let mut stmt = sql(conn.prepare(&format!(
            "SELECT part, next_offset FROM {} WHERE consumer_group = ?1 AND topic = ?2",
            self.table
        )))?;
        let rows = sql(stmt.query_map(params![group, topic], |r| Ok((r.get(0)?, r.get(1)?))))?;
        sql(rows.collect())
    }

    /// Moves one partition's position from `expected` (`None`: no position yet) to `next`, in
    /// the caller's transaction; [`Error::Fenced`] if the stored position is another.
    pub fn advance(
        &self,
        conn: &Connection,
        group: &str,
        topic: &str,
        partition: i32,
        expected: Option<i64>,
        next: i64,
    ) -> Result<()> {
        let t = &self.table;
        let n = match expected {
            None => sql(conn.execute(
                &format!("INSERT OR IGNORE INTO {t} (consumer_group, topic, part, next_offset) VALUES (?1, ?2, ?3, ?4)"),
                params![group, topic, partition, next],
            ))?,
            Some(e) => sql(conn.execute(
                &format!("UPDATE {t} SET next_offset = ?4 WHERE consumer_group = ?1 AND topic = ?2 AND part = ?3 AND next_offset = ?5"),
                params![group, topic, partition, next, e],
            ))?,
        };
        if n == 1 {
            return Ok(());
        }
        let found: Option<i64> = sql(conn
            .query_row(
                &format!("SELECT next_offset FROM {t} WHERE consumer_group = ?1 AND topic = ?2 AND part = ?3"),
                params![group, topic, partition],
                |r| r.get(0),
            )
            .optional())?;
        Err(Error::Fenced {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
            expected,
            found,
        })
    }
}

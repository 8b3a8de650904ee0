//! Kafka consumer positions kept in the inbox transaction, on any SQL backend.

use std::collections::BTreeMap;

use idemgate_core::{Error, Result};

use crate::{Arg, Dialect, Kind, SqlConn, Table};

/// Consumer positions `(group, topic, partition) -> next_offset`, advanced by compare-and-set
/// inside the same transaction as the inbox row and the business change, so the effect and the
/// position commit together. Kafka's own offset commit is not trusted for exactly-once: on
/// partition assignment, seek to [`load_positions`](Self::load_positions).
///
/// A writer whose expected position is stale (another consumer moved it) gets
/// [`Error::Fenced`] and changes nothing; roll the transaction back.
#[derive(Debug, Clone)]
pub struct Offsets {
    table: Table,
}

impl Default for Offsets {
    fn default() -> Self {
        Self::new()
    }
}

impl Offsets {
    /// Positions in table `idemgate_offsets`.
    pub fn new() -> Self {
        Offsets {
            table: Table::new(Dialect::Postgres, "idemgate_offsets"),
        }
    }

    /// Another table: a lowercase identifier, or every call fails with `Error::Config`.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = Table::new(Dialect::Postgres, table);
        self
    }

    /// Creates the table if missing.
    pub async fn migrate<C: SqlConn>(&self, conn: &mut C) -> Result<()> {
        let (t, d) = (self.table.name()?, conn.dialect());
        let (key, int, big, opts) = (
            d.key_type(),
            d.int_type(),
            d.bigint_type(),
            d.table_options(),
        );
        crate::migrate(
            conn,
            t,
            &[format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    consumer_group {key} NOT NULL, topic {key} NOT NULL, part {int} NOT NULL,
                    next_offset {big} NOT NULL,
                    PRIMARY KEY (consumer_group, topic, part)){opts}"
            )],
            &["consumer_group", "topic", "part", "next_offset"],
        )
        .await
    }

    /// The stored next offset of every partition of `topic` for `group`.
    pub async fn load_positions<C: SqlConn>(
        &self,
        conn: &mut C,
        group: &str,
        topic: &str,
    ) -> Result<BTreeMap<i32, i64>> {
        let (t, d) = (self.table.name()?, conn.dialect());
        let rows = conn
            .fetch(
                &d.sql(&format!(
                    "SELECT part, next_offset FROM {} WHERE consumer_group = ? AND topic = ?",
                    t
                )),
                &[Arg::Text(group), Arg::Text(topic)],
                &[Kind::Int32, Kind::Int],
            )
            .await?;
        rows.into_iter()
            .map(|r| match (r[0].int(), r[1].int()) {
                (Some(p), Some(o)) => Ok((i32::try_from(p).unwrap_or(i32::MAX), o)),
                _ => Err(corrupt(d, "a NULL position")),
            })
            .collect()
    }

    /// Moves the position of one partition from `expected` (`None`: no position yet) to `next`,
    /// in the caller's transaction; [`Error::Fenced`] if the stored position is another.
    pub async fn advance<C: SqlConn>(
        &self,
        conn: &mut C,
        group: &str,
        topic: &str,
        partition: i32,
        expected: Option<i64>,
        next: i64,
    ) -> Result<()> {
        let (t, d) = (self.table.name()?, conn.dialect());
        let done = match expected {
            None => {
                let sql = format!(
                    "{} {t} (consumer_group, topic, part, next_offset) VALUES (?, ?, ?, ?){}",
                    d.insert_ignore(),
                    d.ignore_suffix()
                );
                let args = [
                    Arg::Text(group),
                    Arg::Text(topic),
                    Arg::Int32(partition),
                    Arg::Int(next),
                ];
                conn.execute(&d.sql(&sql), &args).await?
            }
            Some(e) => {
                let sql = format!(
                    "UPDATE {t} SET next_offset = ?
                      WHERE consumer_group = ? AND topic = ? AND part = ? AND next_offset = ?"
                );
                let args = [
                    Arg::Int(next),
                    Arg::Text(group),
                    Arg::Text(topic),
                    Arg::Int32(partition),
                    Arg::Int(e),
                ];
                conn.execute(&d.sql(&sql), &args).await?
            }
        };
        if done == 1 {
            return Ok(());
        }
        let found = conn
            .fetch(
                &d.sql(&format!(
                    "SELECT next_offset FROM {t} WHERE consumer_group = ? AND topic = ? AND part = ?"
                )),
                &[Arg::Text(group), Arg::Text(topic), Arg::Int32(partition)],
                &[Kind::Int],
            )
            .await?
            .first()
            .and_then(|r| r[0].int());
        Err(Error::Fenced {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
            expected,
            found,
        })
    }
}

fn corrupt(d: Dialect, reason: &str) -> Error {
    Error::Corrupt {
        backend: d.backend(),
        reason: reason.to_owned(),
    }
}

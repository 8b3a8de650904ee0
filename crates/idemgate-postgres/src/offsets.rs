//! Kafka consumer positions kept in the inbox transaction.

use std::collections::BTreeMap;

use idemgate_core::{Error, Result};
use sqlx::{PgConnection, PgPool};

use crate::error::{check_ident, pg};
use crate::schema::migrate;

/// Consumer positions `(group, topic, partition) -> next_offset`, advanced by compare-and-set
/// inside the same transaction as the inbox row and the business change, so the effect and the
/// position commit together. Kafka's own offset commit is not trusted for exactly-once: on
/// partition assignment, seek to [`load_positions`](Self::load_positions).
///
/// A writer whose expected position is stale (another consumer moved it) gets
/// [`Error::Fenced`] and changes nothing; roll the transaction back.
#[derive(Debug, Clone)]
pub struct PgOffsets {
    table: String,
}

impl Default for PgOffsets {
    fn default() -> Self {
        Self::new()
    }
}

impl PgOffsets {
    /// Positions in table `idemgate_offsets`.
    pub fn new() -> Self {
        PgOffsets {
            table: "idemgate_offsets".into(),
        }
    }

    /// Another table (a lowercase identifier).
    pub fn with_table(mut self, table: impl Into<String>) -> Result<Self> {
        self.table = table.into();
        check_ident(&self.table)?;
        Ok(self)
    }

    /// Creates the table if missing.
    pub async fn migrate(&self, pool: &PgPool) -> Result<()> {
        let t = &self.table;
        migrate(
            pool,
            t,
            &[&format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    consumer_group TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL,
                    next_offset BIGINT NOT NULL,
                    PRIMARY KEY (consumer_group, topic, part))"
            )],
            &["consumer_group", "topic", "part", "next_offset"],
        )
        .await
    }

    /// The stored next offset of every partition of `topic` for `group`.
    pub async fn load_positions(
        &self,
        conn: &mut PgConnection,
        group: &str,
        topic: &str,
    ) -> Result<BTreeMap<i32, i64>> {
        let rows: Vec<(i32, i64)> = pg(sqlx::query_as(&format!(
            "SELECT part, next_offset FROM {} WHERE consumer_group = $1 AND topic = $2",
            self.table
        ))
        .bind(group)
        .bind(topic)
        .fetch_all(conn)
        .await)?;
        Ok(rows.into_iter().collect())
    }

    /// Moves the position of one partition from `expected` (`None`: no position yet) to `next`,
    /// in the caller's transaction; [`Error::Fenced`] if the stored position is another.
    pub async fn advance(
        &self,
        tx: &mut PgConnection,
        group: &str,
        topic: &str,
        partition: i32,
        expected: Option<i64>,
        next: i64,
    ) -> Result<()> {
        let t = &self.table;
        let done = match expected {
            None => pg(sqlx::query(&format!(
                "INSERT INTO {t} (consumer_group, topic, part, next_offset) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING"
            ))
            .bind(group)
            .bind(topic)
            .bind(partition)
            .bind(next)
            .execute(&mut *tx)
            .await)?,
            Some(e) => pg(sqlx::query(&format!(
                "UPDATE {t} SET next_offset = $4
                  WHERE consumer_group = $1 AND topic = $2 AND part = $3 AND next_offset = $5"
            ))
            .bind(group)
            .bind(topic)
            .bind(partition)
            .bind(next)
            .bind(e)
            .execute(&mut *tx)
            .await)?,
        };
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let found: Option<(i64,)> = pg(sqlx::query_as(&format!(
            "SELECT next_offset FROM {t} WHERE consumer_group = $1 AND topic = $2 AND part = $3"
        ))
        .bind(group)
        .bind(topic)
        .bind(partition)
        .fetch_optional(&mut *tx)
        .await)?;
        Err(Error::Fenced {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
            expected,
            found: found.map(|f| f.0),
        })
    }
}

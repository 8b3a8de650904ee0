//! The transactional inbox on MySQL and MariaDB.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use idemgate_core::{Key, Result};
use sqlx::{MySqlConnection, MySqlPool};

use crate::error::{check_ident, keys_condition, my};
use crate::schema::migrate;
use crate::store::{NOW, ms};

/// The transactional inbox: records a key as processed inside the caller's transaction, so the
/// dedup row and the business change commit or roll back together.
///
/// Two transactions with the same key: the second blocks on the first's row lock and then sees
/// `false` (or `true` if the first rolled back). InnoDB may instead end one of them with a
/// deadlock, which is `Error::Unavailable` (retryable): never a duplicate effect.
#[derive(Debug, Clone)]
pub struct MySqlInbox {
    table: String,
    retention: Duration,
    sql: Arc<Statements>,
}

/// The single-row statements, written once per table rather than on every delivery (batch
/// statements depend on the batch's size).
#[derive(Debug)]
struct Statements {
    insert: String,
    renew: String,
}

impl Statements {
    fn new(t: &str) -> Self {
        Statements {
            insert: format!(
                "INSERT IGNORE INTO {t} (scope, id, processed_at, expires_at, nonce) VALUES (?, ?, {NOW}, {NOW} + ?, 0)"
            ),
            renew: format!(
                "UPDATE {t} SET processed_at = {NOW}, expires_at = {NOW} + ? WHERE scope = ? AND id = ? AND expires_at <= {NOW}"
            ),
        }
    }
}

impl Default for MySqlInbox {
    fn default() -> Self {
        Self::new()
    }
}

impl MySqlInbox {
    /// An inbox in table `idemgate_inbox`, keeping keys for 7 days.
    pub fn new() -> Self {
        let table = "idemgate_inbox";
        MySqlInbox {
            table: table.into(),
            retention: Duration::from_secs(7 * 86_400),
            sql: Arc::new(Statements::new(table)),
        }
    }

    /// Another table (a lowercase identifier).
    pub fn with_table(mut self, table: impl Into<String>) -> Result<Self> {
        self.table = table.into();
        check_ident(&self.table)?;
        self.sql = Arc::new(Statements::new(&self.table));
        Ok(self)
    }

    /// How long a processed key is remembered: at least the broker's redelivery window.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long a processed key is remembered.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Creates the inbox table if missing.
    pub async fn migrate(&self, pool: &MySqlPool) -> Result<()> {
        let t = &self.table;
        migrate(
            pool,
            t,
            1,
            &[format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    scope VARBINARY(255) NOT NULL, id VARBINARY(255) NOT NULL,
                    processed_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, nonce BIGINT NOT NULL,
                    PRIMARY KEY (scope, id), KEY {t}_expires_at (expires_at)) ENGINE=InnoDB"
            )],
            &["scope", "id", "processed_at", "expires_at", "nonce"],
        )
        .await
    }

    /// Records `key` in the caller's transaction; `true` the first time within the retention
    /// window (apply the effect in the same transaction), `false` for a duplicate.
    pub async fn first_time(&self, tx: &mut MySqlConnection, key: &Key) -> Result<bool> {
        let inserted = my(sqlx::query(&self.sql.insert)
            .bind(key.scope())
            .bind(key.id())
            .bind(ms(self.retention))
            .execute(&mut *tx)
            .await)?;
        if inserted.rows_affected() == 1 {
            return Ok(true);
        }
        // known: first time again only if its retention ran out
        let renewed = my(sqlx::query(&self.sql.renew)
            .bind(ms(self.retention))
            .bind(key.scope())
            .bind(key.id())
            .execute(&mut *tx)
            .await)?;
        Ok(renewed.rows_affected() == 1)
    }

    /// [`first_time`](Self::first_time) for a batch: one multi-row insert (plus one update for
    /// keys whose retention ran out, and one read of what this batch stamped). One answer per key,
    /// in order; a key repeated in the batch is `true` at most once.
    pub async fn first_time_many(
        &self,
        tx: &mut MySqlConnection,
        keys: &[Key],
    ) -> Result<Vec<bool>> {
        let mut seen = HashSet::new();
        let unique: Vec<&Key> = keys.iter().filter(|k| seen.insert(*k)).collect();
        if unique.is_empty() {
            return Ok(Vec::new());
        }
        let t = &self.table;
        let nonce: i64 = rand::random::<i64>() | 1;
        // the common case first: every key new, one multi-row insert
        // the clock is read once, by the first row, and reused by the others
        let values = std::iter::once(format!(
            "(?, ?, @idemgate_now := {NOW}, @idemgate_now + ?, ?)"
        ))
        .chain(std::iter::repeat_n(
            "(?, ?, @idemgate_now, @idemgate_now + ?, ?)".to_owned(),
            unique.len() - 1,
        ))
        .collect::<Vec<_>>()
        .join(", ");
        let ins = format!(
            "INSERT IGNORE INTO {t} (scope, id, processed_at, expires_at, nonce) VALUES {values}"
        );
        let mut query = sqlx::query(&ins);
        for k in &unique {
            query = query
                .bind(k.scope())
                .bind(k.id())
                .bind(ms(self.retention))
                .bind(nonce);
        }
        let inserted = my(query.execute(&mut *tx).await)?.rows_affected();
        if inserted == unique.len() as u64 {
            let mut seen = HashSet::new();
            return Ok(keys.iter().map(|k| seen.insert(k)).collect());
        }
        // some were known: those past their retention count as new again; then read back which
        // rows carry this batch's nonce. Keys are matched per scope (`scope = ? AND id IN (…)`),
        // which the primary key serves as ranges.
        let (cond, params) = keys_condition(unique.iter().copied());
        let upd = format!(
            "UPDATE {t} SET processed_at = {NOW}, expires_at = {NOW} + ?, nonce = ? WHERE expires_at <= {NOW} AND ({cond})"
        );
        let mut query = sqlx::query(&upd).bind(ms(self.retention)).bind(nonce);
        for p in &params {
            query = query.bind(*p);
        }
        my(query.execute(&mut *tx).await)?;
        let sel = format!(
            "SELECT CAST(scope AS CHAR), CAST(id AS CHAR) FROM {t} WHERE nonce = ? AND ({cond})"
        );
        let mut query = sqlx::query_as::<_, (String, String)>(&sel).bind(nonce);
        for p in &params {
            query = query.bind(*p);
        }
        let mut fresh: HashSet<(String, String)> =
            my(query.fetch_all(&mut *tx).await)?.into_iter().collect();
        Ok(keys
            .iter()
            .map(|k| fresh.remove(&(k.scope().to_owned(), k.id().to_owned())))
            .collect())
    }

    /// Deletes at most `limit` keys past their retention; returns how many.
    pub async fn purge_expired(&self, pool: &MySqlPool, limit: usize) -> Result<u64> {
        let done = my(sqlx::query(&format!(
            "DELETE FROM {} WHERE expires_at <= {NOW} ORDER BY expires_at LIMIT ?",
            self.table
        ))
        .bind(u64::try_from(limit).unwrap_or(u64::MAX))
        .execute(pool)
        .await)?;
        Ok(done.rows_affected())
    }
}

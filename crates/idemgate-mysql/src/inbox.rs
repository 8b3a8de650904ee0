//! The transactional inbox on MySQL and MariaDB.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemgate_core::{Key, Result};
use sqlx::{MySqlConnection, MySqlPool};

use crate::MySqlOffsets;
use crate::error::{keys_condition, my};
use crate::store::NOW;
use idemgate_sql::millis as ms;
use idemgate_sql::{Dialect, Table};

/// The transactional inbox: records a key as processed inside the caller's transaction, so the
/// dedup row and the business change commit or roll back together.
///
/// Two transactions with the same key: the second blocks on the first's row lock and then sees
/// `false` (or `true` if the first rolled back). InnoDB may instead end one of them with a
/// deadlock, which is `Error::Unavailable` (retryable): never a duplicate effect.
///
/// It implements the [`Inbox`](idemgate_core::Inbox) contract on its pool, so the consumer runtime's Inbox mode runs
/// on it, and keeps Kafka positions ([`MySqlOffsets`]) in the same transaction.
#[derive(Debug, Clone)]
pub struct MySqlInbox {
    pool: MySqlPool,
    offsets: Option<MySqlOffsets>,
    table: Table,
    retention: Duration,
    sql: Arc<Statements>,
    // where the retention purge's walk stopped, in primary-key order; empty: the table's start
    // (every key sorts after it: scope and id are never empty)
    purged_to: Arc<Mutex<KeyBytes>>,
}

/// The transaction an Inbox-mode handler writes its effect in (`&mut **tx` is the connection).
pub type MySqlTx = sqlx::Transaction<'static, sqlx::MySql>;

/// A key as the table holds it: `(scope, id)`.
type KeyBytes = (Vec<u8>, Vec<u8>);

/// The single-row statements, written once per table rather than on every delivery (batch
/// statements depend on the batch's size).
#[derive(Debug)]
struct Statements {
    insert: String,
    renew: String,
    chunk_end: String,
    forget: String,
    purge: String,
    purge_last: String,
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
            // the retention purge walks the primary key in chunks: the last key of the next one
            chunk_end: format!(
                "SELECT scope, id FROM {t} WHERE {AFTER} ORDER BY scope, id LIMIT 1 OFFSET ?"
            ),
            forget: format!("DELETE FROM {t} WHERE scope = ? AND id = ?"),
            // ... and deletes the expired keys in it: (start, end], or to the table's end
            purge: format!("DELETE FROM {t} WHERE {AFTER} AND {UP_TO} AND expires_at <= {NOW}"),
            purge_last: format!("DELETE FROM {t} WHERE {AFTER} AND expires_at <= {NOW}"),
        }
    }
}

/// Keys after the chunk's start `(scope, id)`, in primary-key order (a range of the key).
const AFTER: &str = "(scope > ? OR (scope = ? AND id > ?))";
/// Keys up to the chunk's end `(scope, id)`.
const UP_TO: &str = "(scope < ? OR (scope = ? AND id <= ?))";

impl MySqlInbox {
    /// An inbox on `pool` in table `idemgate_inbox`, keeping keys for 7 days and no Kafka
    /// positions ([`with_offsets`](Self::with_offsets) for those). Call
    /// [`migrate`](Self::migrate) once first.
    pub fn new(pool: MySqlPool) -> Self {
        let table = "idemgate_inbox";
        MySqlInbox {
            pool,
            offsets: None,
            table: Table::new(Dialect::Postgres, table),
            retention: Duration::from_secs(7 * 86_400),
            sql: Arc::new(Statements::new(table)),
            purged_to: Arc::default(),
        }
    }

    /// Another table: a lowercase identifier, or every call fails with `Error::Config`.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = Table::new(Dialect::Postgres, table);
        self.sql = Arc::new(Statements::new(self.table.as_given()));
        self.purged_to = Arc::default();
        self
    }

    /// The statements, once the table name is known to be an identifier.
    fn sql(&self) -> Result<&Statements> {
        self.table.name()?;
        Ok(&self.sql)
    }

    /// How long a processed key is remembered: at least the broker's redelivery window.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Keeps Kafka positions ([`Inbox::advance`](idemgate_core::Inbox::advance)) in `offsets`
    /// (`MySqlOffsets::new()`: the table `idemgate_offsets`), created by
    /// [`migrate`](Self::migrate). Without one, a message that carries a position is refused
    /// with `Error::Config`.
    pub fn with_offsets(mut self, offsets: MySqlOffsets) -> Self {
        self.offsets = Some(offsets);
        self
    }

    /// The pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Creates the inbox table (and the offsets table, if it has one) if missing. The inbox has
    /// the key as its primary key and nothing else indexed, so recording a key costs one index
    /// insert (the purge walks the primary key instead).
    ///
    /// Versions are recorded in the table `idemgate_schema`, one row per table. To reset the
    /// inbox, drop its table and call `migrate` again: a recorded table that is missing is
    /// created again.
    pub async fn migrate(&self) -> Result<()> {
        let t = self.table.name()?;
        let mut conn = my(self.pool.acquire().await)?;
        idemgate_sql::migrate(
            &mut *conn,
            t,
            &[format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    scope VARBINARY(255) NOT NULL, id VARBINARY(255) NOT NULL,
                    processed_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, nonce BIGINT NOT NULL,
                    PRIMARY KEY (scope, id)) ENGINE=InnoDB"
            )],
            &["scope", "id", "processed_at", "expires_at", "nonce"],
        )
        .await?;
        match &self.offsets {
            Some(offsets) => offsets.migrate(&mut *conn).await,
            None => Ok(()),
        }
    }

    /// Records `key` in the caller's transaction (any transaction on this database, not only
    /// one from [`begin`](idemgate_core::Inbox::begin)); `true` the first time within the retention window (apply the effect in the same transaction), `false` for a duplicate.
    pub async fn first_time(&self, tx: &mut MySqlConnection, key: &Key) -> Result<bool> {
        let inserted = my(sqlx::query(&self.sql()?.insert)
            .bind(key.scope())
            .bind(key.id())
            .bind(ms(self.retention))
            .execute(&mut *tx)
            .await)?;
        if inserted.rows_affected() == 1 {
            return Ok(true);
        }
        // known: first time again only if its retention ran out
        let renewed = my(sqlx::query(&self.sql()?.renew)
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
        let t = self.table.name()?;
        let nonce: i64 = rand::random::<i64>() | 1;
        // the common case first: every key new, one multi-row insert. The first row reads the
        // clock and takes the expiry, the batch's nonce (and the scope, when the batch has one);
        // the others reuse them, so each row sends only its id (and scope)
        let one_scope = unique.iter().all(|k| k.scope() == unique[0].scope());
        let (first, rest) = if one_scope {
            ("@idemgate_scope := ?", "@idemgate_scope")
        } else {
            ("?", "?")
        };
        let mut ins = format!(
            "INSERT IGNORE INTO {t} (scope, id, processed_at, expires_at, nonce) VALUES \
             ({first}, ?, @idemgate_now := {NOW}, @idemgate_exp := @idemgate_now + ?, @idemgate_nonce := ?)"
        );
        for _ in 1..unique.len() {
            ins.push_str(", (");
            ins.push_str(rest);
            ins.push_str(", ?, @idemgate_now, @idemgate_exp, @idemgate_nonce)");
        }
        let mut query = sqlx::query(&ins);
        for (i, k) in unique.iter().enumerate() {
            if i == 0 || !one_scope {
                query = query.bind(k.scope());
            }
            query = query.bind(k.id());
            if i == 0 {
                query = query.bind(ms(self.retention)).bind(nonce);
            }
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

    /// The retention purge ([`Inbox::purge_expired`](idemgate_core::Inbox::purge_expired)): deletes at most `limit` keys past their
    /// retention; returns how many, 0 once a pass over
    /// the table has found nothing more to delete.
    ///
    /// The table has no index on the expiry (every recorded key would pay for one): the purge
    /// walks the primary key in chunks of `limit` keys from where its last call stopped, each
    /// chunk one bounded `DELETE`, until a chunk deleted something or the walk reached the end
    /// (the next call starts over). One pass reads the whole table in key order.
    async fn purge(&self, limit: usize) -> Result<u64> {
        let pool = &self.pool;
        let limit = limit.max(1);
        let offset = u64::try_from(limit - 1).unwrap_or(u64::MAX);
        let mut from = self
            .purged_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let deleted = loop {
            let (s, i) = &from;
            let end: Option<KeyBytes> = my(sqlx::query_as(&self.sql()?.chunk_end)
                .bind(s)
                .bind(s)
                .bind(i)
                .bind(offset)
                .fetch_optional(pool)
                .await)?;
            let query = match &end {
                Some((es, ei)) => sqlx::query(&self.sql()?.purge)
                    .bind(s)
                    .bind(s)
                    .bind(i)
                    .bind(es)
                    .bind(es)
                    .bind(ei),
                None => sqlx::query(&self.sql()?.purge_last).bind(s).bind(s).bind(i),
            };
            let n = my(query.execute(pool).await)?.rows_affected();
            // the walk reached the table's end: the next call starts over
            let done = end.is_none();
            from = end.unwrap_or_default();
            if n > 0 || done {
                break n;
            }
        };
        *self.purged_to.lock().unwrap_or_else(|e| e.into_inner()) = from;
        Ok(deleted)
    }
}

idemgate_sql::sqlx_inbox!(MySqlInbox, MySqlTx, crate::classify_error, "mysql");

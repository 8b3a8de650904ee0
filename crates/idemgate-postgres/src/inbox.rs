//! The transactional inbox on PostgreSQL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use idemgate_core::{Key, Result};
use sqlx::{PgConnection, PgPool};

use crate::PgOffsets;
use crate::error::pg;
use crate::store::NOW;
use idemgate_sql::millis as ms;
use idemgate_sql::{Dialect, Table};

/// The transaction an Inbox-mode handler writes its effect in (`&mut **tx` is the connection).
pub type PgTx = sqlx::Transaction<'static, sqlx::Postgres>;

/// The transactional inbox: records a key as processed inside the caller's transaction, so the
/// dedup row and the business change commit or roll back together.
///
/// Two transactions with the same key: the second waits on the first's row lock; if the first
/// commits, the second sees `false`; if it rolls back, the second sees `true`. Under
/// `REPEATABLE READ` or `SERIALIZABLE` the second may instead fail with a retryable
/// `Error::Unavailable` (a serialization failure): never a duplicate effect.
///
/// It implements the [`Inbox`](idemgate_core::Inbox) contract on its pool, so the consumer runtime's Inbox mode runs
/// on it, and keeps Kafka positions ([`PgOffsets`]) in the same transaction.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), idemgate_core::Error> {
/// use idemgate_core::{Inbox, Key};
/// use idemgate_postgres::PgInbox;
///
/// let inbox = PgInbox::new(pool);
/// inbox.migrate().await?;
/// let mut tx = inbox.begin().await?;
/// if inbox.first_time(&mut tx, &Key::new("ledger", "evt-1")?).await? {
///     sqlx::query("UPDATE balance SET total = total + 10").execute(&mut *tx).await.unwrap();
/// }
/// inbox.commit(tx).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgInbox {
    pool: PgPool,
    table: Table,
    retention: Duration,
    sql: Arc<Statements>,
    offsets: Option<PgOffsets>,
}

/// The inbox's statements, written once per table rather than on every delivery.
#[derive(Debug)]
struct Statements {
    first_time: String,
    insert_many: String,
    insert_many_scoped: String,
    inserted: String,
    renew_many: String,
    forget: String,
    purge: String,
}

impl Statements {
    fn new(t: &str) -> Self {
        Statements {
            first_time: format!(
                "INSERT INTO {t} AS i (scope, id, processed_at, expires_at) VALUES ($1, $2, {NOW}, {NOW} + $3)
                 ON CONFLICT (scope, id) DO UPDATE SET processed_at = {NOW}, expires_at = {NOW} + $3
                 WHERE i.expires_at <= {NOW}"
            ),
            // a batch's rows carry its random nonce, so when some keys were known the new ones
            // are found by it; when every key was new (the usual case) the count says so, and
            // nothing comes back
            insert_many: format!(
                "INSERT INTO {t} (scope, id, processed_at, expires_at, nonce)
                 SELECT s, d, n.t, n.t + $3, $4 FROM (SELECT {NOW} AS t) AS n,
                        unnest($1::text[], $2::text[]) AS u(s, d)
                 ON CONFLICT (scope, id) DO NOTHING"
            ),
            // the usual batch (one consumer's keys): the scope sent once, the clock read once
            insert_many_scoped: format!(
                "INSERT INTO {t} (scope, id, processed_at, expires_at, nonce)
                 SELECT $1, d, n.t, n.t + $3, $4 FROM (SELECT {NOW} AS t) AS n, unnest($2::text[]) AS u(d)
                 ON CONFLICT (scope, id) DO NOTHING"
            ),
            inserted: format!(
                "SELECT scope, id FROM {t} AS i, unnest($1::text[], $2::text[]) AS u(s, d)
                  WHERE i.scope = u.s AND i.id = u.d AND i.nonce = $3"
            ),
            renew_many: format!(
                "UPDATE {t} AS i SET processed_at = {NOW}, expires_at = {NOW} + $3
                   FROM unnest($1::text[], $2::text[]) AS u(s, d)
                  WHERE i.scope = u.s AND i.id = u.d AND i.expires_at <= {NOW}
                 RETURNING i.scope, i.id"
            ),
            forget: format!("DELETE FROM {t} WHERE scope = $1 AND id = $2"),
            purge: format!(
                "DELETE FROM {t} WHERE ctid = ANY (ARRAY(
                    SELECT ctid FROM {t} WHERE expires_at <= {NOW} LIMIT $1 FOR UPDATE SKIP LOCKED))"
            ),
        }
    }
}

impl PgInbox {
    /// An inbox on `pool` in table `idemgate_inbox`, keeping keys for 7 days and no Kafka
    /// positions ([`with_offsets`](Self::with_offsets) for those). Call
    /// [`migrate`](Self::migrate) once first.
    pub fn new(pool: PgPool) -> Self {
        let table = "idemgate_inbox";
        PgInbox {
            pool,
            table: Table::new(Dialect::Postgres, table),
            retention: Duration::from_secs(7 * 86_400),
            sql: Arc::new(Statements::new(table)),
            offsets: None,
        }
    }

    /// Keeps Kafka positions ([`Inbox::advance`](idemgate_core::Inbox::advance)) in `offsets`
    /// (`PgOffsets::new()`: the table `idemgate_offsets`), created by
    /// [`migrate`](Self::migrate). Without one, a message that carries a position is refused
    /// with `Error::Config`.
    pub fn with_offsets(mut self, offsets: PgOffsets) -> Self {
        self.offsets = Some(offsets);
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Another table: a lowercase identifier, or every call fails with `Error::Config`.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = Table::new(Dialect::Postgres, table);
        self.sql = Arc::new(Statements::new(self.table.as_given()));
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

    /// Creates the inbox table (and the offsets table, if it has one) if missing, or brings them
    /// to this version.
    ///
    /// Versions are recorded in the table `idemgate_schema`, one row per table. To reset the
    /// inbox, drop its table and call `migrate` again: a recorded table that is missing is
    /// created again.
    pub async fn migrate(&self) -> Result<()> {
        let t = self.table.name()?;
        let mut conn = pg(self.pool.acquire().await)?;
        idemgate_sql::migrate(
            &mut *conn,
            t,
            &[
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (
                    scope TEXT NOT NULL, id TEXT NOT NULL,
                    processed_at BIGINT NOT NULL, expires_at BIGINT NOT NULL,
                    PRIMARY KEY (scope, id));
                 CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} USING brin (expires_at);"
                ),
                // version 2: which batch wrote a row (metadata only: existing rows get 0)
                format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS nonce BIGINT NOT NULL DEFAULT 0"),
            ],
            &["scope", "id", "processed_at", "expires_at", "nonce"],
        )
        .await?;
        match &self.offsets {
            Some(offsets) => offsets.migrate(&mut *conn).await,
            None => Ok(()),
        }
    }

    /// Records `key` in the caller's transaction (any transaction on this database, not only
    /// one from [`begin`](idemgate_core::Inbox::begin)); `true` the first time within the retention window
    /// (apply the effect in the same transaction), `false` for a duplicate.
    pub async fn first_time(&self, tx: &mut PgConnection, key: &Key) -> Result<bool> {
        let done = pg(sqlx::query(&self.sql()?.first_time)
            .bind(key.scope())
            .bind(key.id())
            .bind(ms(self.retention))
            .execute(tx)
            .await)?;
        Ok(done.rows_affected() == 1)
    }

    /// [`first_time`](Self::first_time) for a batch, in one statement: one answer per key, in
    /// order. A key repeated within the batch is `true` at most once.
    pub async fn first_time_many(&self, tx: &mut PgConnection, keys: &[Key]) -> Result<Vec<bool>> {
        // the answer when every key is new: true for a key's first appearance in the batch
        let mut seen = HashSet::with_capacity(keys.len());
        let if_all_new: Vec<bool> = keys.iter().map(|k| seen.insert(k)).collect();
        let unique: Vec<&Key> = keys
            .iter()
            .zip(&if_all_new)
            .filter_map(|(k, first)| first.then_some(k))
            .collect();
        let Some(first) = unique.first() else {
            return Ok(if_all_new);
        };
        let ids: Vec<&str> = unique.iter().map(|k| k.id()).collect();
        let scopes: Vec<&str> = unique.iter().map(|k| k.scope()).collect();
        let one_scope = scopes.iter().all(|s| *s == first.scope());
        // odd, so never the 0 that rows written one at a time carry
        let nonce: i64 = rand::random::<i64>() | 1;
        let query = if one_scope {
            sqlx::query(&self.sql()?.insert_many_scoped).bind(first.scope())
        } else {
            sqlx::query(&self.sql()?.insert_many).bind(&scopes)
        };
        let done = pg(query
            .bind(&ids)
            .bind(ms(self.retention))
            .bind(nonce)
            .execute(&mut *tx)
            .await)?;
        // the common case: every key new
        if done.rows_affected() == unique.len() as u64 {
            return Ok(if_all_new);
        }
        // new keys: those this batch's insert wrote
        let mut fresh: HashSet<(String, String)> = pg(sqlx::query_as(&self.sql()?.inserted)
            .bind(&scopes)
            .bind(&ids)
            .bind(nonce)
            .fetch_all(&mut *tx)
            .await)?
        .into_iter()
        .collect();
        // known keys count as new again once their retention ran out
        let (ks, kd): (Vec<&str>, Vec<&str>) = unique
            .iter()
            .filter(|k| !fresh.contains(&(k.scope().to_owned(), k.id().to_owned())))
            .map(|k| (k.scope(), k.id()))
            .unzip();
        let renewed: Vec<(String, String)> = pg(sqlx::query_as(&self.sql()?.renew_many)
            .bind(&ks)
            .bind(&kd)
            .bind(ms(self.retention))
            .fetch_all(&mut *tx)
            .await)?;
        fresh.extend(renewed);
        Ok(keys
            .iter()
            .map(|k| fresh.remove(&(k.scope().to_owned(), k.id().to_owned())))
            .collect())
    }
}

impl PgInbox {
    /// Deletes at most `limit` keys past their retention ([`Inbox::purge_expired`](idemgate_core::Inbox::purge_expired)).
    async fn purge(&self, limit: usize) -> Result<u64> {
        let done = pg(sqlx::query(&self.sql()?.purge)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await)?;
        Ok(done.rows_affected())
    }
}

idemgate_sql::sqlx_inbox!(PgInbox, PgTx, crate::classify_error, "postgres");

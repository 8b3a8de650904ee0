//! `PostgresStore`.

use std::time::Duration;

use idemgate_core::{
    Claim, ClaimOptions, Error, Fingerprint, Key, Lease, Outcome, Record, RecordRow, Result, Store,
    duration_millis, time_from_ms,
};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};

use crate::error::{check_ident, pg};
use crate::schema::migrate;

/// The database clock, in milliseconds since the epoch, fixed for the statement.
pub(crate) const NOW: &str = "(extract(epoch from now()) * 1000)::bigint";

const COLUMNS: &str = "fingerprint, state, token, lease_until, outcome, completed_at, created_at, expires_at, attempts";

/// Builds a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresStoreBuilder {
    url: Option<String>,
    pool: Option<PgPool>,
    table: String,
    max_connections: u32,
    acquire_timeout: Duration,
}

impl PostgresStoreBuilder {
    /// The database URL (`postgres://user@host:port/db`).
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// An existing pool, shared with the application (the inbox needs the same database anyway).
    pub fn with_pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The records table (default `idemgate_records`): a lowercase identifier.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Pool size when the builder makes the pool (default 16).
    pub fn with_max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// How long a call waits for a pooled connection before `Error::Unavailable` (default 5 s).
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Builds the store; connections are opened on first use. Call
    /// [`PostgresStore::migrate`] once at start-up.
    pub fn build(self) -> Result<PostgresStore> {
        check_ident(&self.table)?;
        let pool = match (self.pool, self.url) {
            (Some(pool), _) => pool,
            (None, Some(url)) => pg(PgPoolOptions::new()
                .max_connections(self.max_connections)
                .acquire_timeout(self.acquire_timeout)
                .connect_lazy(&url))?,
            (None, None) => {
                return Err(Error::Config {
                    message: "PostgresStore needs with_url or with_pool (or IDEMGATE_POSTGRES_URL with from_env)".into(),
                });
            }
        };
        Ok(PostgresStore {
            pool,
            sql: std::sync::Arc::new(Statements::new(&self.table)),
            table: self.table,
        })
    }
}

/// The [`Store`] contract on PostgreSQL.
///
/// Every claim is one `INSERT … ON CONFLICT (scope, id) DO UPDATE … WHERE <free> RETURNING`:
/// the primary key makes concurrent claims of one key serialize on its row, and the database's
/// `now()` decides expiry. Only when the key is not free does a second statement read the live
/// record to report it (and if it turned free meanwhile, the claim is tried again).
///
/// # Clone
/// Cheap: clones share the connection pool.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    table: String,
    sql: std::sync::Arc<Statements>,
}

#[derive(Debug)]
struct Statements {
    ddl: String,
    claim: String,
    select: String,
    complete: String,
    release: String,
    renew: String,
    get: String,
    purge: String,
}

impl Statements {
    fn new(t: &str) -> Self {
        Statements {
            ddl: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    scope TEXT NOT NULL,
                    id TEXT NOT NULL,
                    fingerprint BYTEA,
                    state SMALLINT NOT NULL,
                    token BIGINT NOT NULL,
                    lease_until BIGINT,
                    outcome BYTEA,
                    completed_at BIGINT,
                    created_at BIGINT NOT NULL,
                    expires_at BIGINT NOT NULL,
                    attempts INTEGER NOT NULL,
                    PRIMARY KEY (scope, id));
                 CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at);"
            ),
            // $1 scope $2 id $3 fingerprint $4 lease ms $5 retention ms
            claim: format!(
                "INSERT INTO {t} AS r (scope, id, fingerprint, state, token, lease_until, outcome,
                                       completed_at, created_at, expires_at, attempts)
                 VALUES ($1, $2, $3, 0, 1, {NOW} + $4, NULL, NULL, {NOW}, {NOW} + $4 + $5, 1)
                 ON CONFLICT (scope, id) DO UPDATE SET
                    fingerprint = CASE WHEN r.expires_at <= {NOW} THEN $3
                                       ELSE coalesce(r.fingerprint, $3) END,
                    state = 0,
                    token = r.token + 1,
                    lease_until = {NOW} + $4,
                    outcome = NULL,
                    completed_at = NULL,
                    created_at = CASE WHEN r.expires_at <= {NOW} THEN {NOW} ELSE r.created_at END,
                    attempts = CASE WHEN r.expires_at <= {NOW} THEN 1 ELSE r.attempts + 1 END,
                    expires_at = {NOW} + $4 + $5
                 WHERE r.expires_at <= {NOW}
                    OR (r.state = 0 AND r.lease_until <= {NOW}
                        AND (r.fingerprint IS NULL OR $3::bytea IS NULL OR r.fingerprint = $3))
                 RETURNING token, attempts, lease_until"
            ),
            select: format!("SELECT {COLUMNS}, {NOW} AS now FROM {t} WHERE scope = $1 AND id = $2"),
            complete: format!(
                "UPDATE {t} SET state = 1, outcome = $4, completed_at = {NOW}, lease_until = NULL,
                    expires_at = {NOW} + $5
                 WHERE scope = $1 AND id = $2 AND state = 0 AND token = $3"
            ),
            release: format!(
                "UPDATE {t} SET lease_until = LEAST(lease_until, {NOW})
                 WHERE scope = $1 AND id = $2 AND state = 0 AND token = $3"
            ),
            renew: format!(
                "UPDATE {t} SET lease_until = {NOW} + $4,
                    expires_at = GREATEST(expires_at, {NOW} + $4 + (expires_at - lease_until))
                 WHERE scope = $1 AND id = $2 AND state = 0 AND token = $3
                 RETURNING lease_until"
            ),
            get: format!("SELECT {COLUMNS} FROM {t} WHERE scope = $1 AND id = $2 AND expires_at > {NOW}"),
            purge: format!(
                "DELETE FROM {t} WHERE ctid = ANY (ARRAY(
                    SELECT ctid FROM {t} WHERE expires_at <= {NOW} LIMIT $1 FOR UPDATE SKIP LOCKED))"
            ),
        }
    }
}

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(duration_millis(d)).unwrap_or(i64::MAX)
}

fn token_param(lease: &Lease) -> i64 {
    // tokens come from BIGINT columns, so they fit; a forged larger one matches nothing
    i64::try_from(lease.token()).unwrap_or(-1)
}

fn row(r: &PgRow) -> std::result::Result<RecordRow, sqlx::Error> {
    Ok(RecordRow {
        fingerprint: r.try_get(0)?,
        state: r.try_get::<i16, _>(1)?.into(),
        token: r.try_get(2)?,
        lease_until: r.try_get(3)?,
        outcome: r.try_get(4)?,
        completed_at: r.try_get(5)?,
        created_at: r.try_get(6)?,
        expires_at: r.try_get(7)?,
        attempts: r.try_get::<i32, _>(8)?.into(),
    })
}

impl PostgresStore {
    /// A builder: URL or pool, table, pool size.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            url: None,
            pool: None,
            table: "idemgate_records".into(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }

    /// A store on `IDEMGATE_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
    pub fn from_env() -> Result<Self> {
        let url = std::env::var("IDEMGATE_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        Self::builder().with_url(url).build()
    }

    /// Creates the records table and its index if missing (idempotent; safe to run from many
    /// processes at once).
    pub async fn migrate(&self) -> Result<()> {
        migrate(
            &self.pool,
            &self.table,
            1,
            &self.sql.ddl,
            &[
                "scope",
                "id",
                "fingerprint",
                "state",
                "token",
                "lease_until",
                "outcome",
                "completed_at",
                "created_at",
                "expires_at",
                "attempts",
            ],
        )
        .await
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The records table.
    pub fn table(&self) -> &str {
        &self.table
    }

    async fn fenced(
        &self,
        text: &str,
        lease: &Lease,
        extra: impl FnOnce(
            sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        )
            -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<()> {
        let q = sqlx::query(text)
            .bind(lease.key().scope())
            .bind(lease.key().id())
            .bind(token_param(lease));
        let done = pg(extra(q).execute(&self.pool).await)?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }
}

impl Store for PostgresStore {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        let fp_bytes = fp.map(|f| f.as_bytes().to_vec());
        // a key that turns free between the two statements is simply claimed again
        for _ in 0..8 {
            let won = pg(sqlx::query(&self.sql.claim)
                .bind(key.scope())
                .bind(key.id())
                .bind(&fp_bytes)
                .bind(ms(opts.lease))
                .bind(ms(opts.retention))
                .fetch_optional(&self.pool)
                .await)?;
            if let Some(r) = won {
                let token: i64 = pg(r.try_get(0))?;
                let attempts: i32 = pg(r.try_get(1))?;
                let until: i64 = pg(r.try_get(2))?;
                return Ok(Claim::Acquired(Lease::new(
                    key.clone(),
                    u64::try_from(token).unwrap_or(0),
                    time_from_ms(until),
                    u32::try_from(attempts).unwrap_or(u32::MAX),
                )));
            }
            let Some(r) = pg(sqlx::query(&self.sql.select)
                .bind(key.scope())
                .bind(key.id())
                .fetch_optional(&self.pool)
                .await)?
            else {
                continue;
            };
            let now: i64 = pg(r.try_get(9))?;
            let stored = pg(row(&r))?;
            if stored.expires_at <= now {
                continue;
            }
            let rec = stored.clone().into_record(key, "postgres")?;
            if let (Some(s), Some(g)) = (rec.fingerprint, fp)
                && s != *g
            {
                return Ok(Claim::Mismatch { stored: s });
            }
            if !stored.is_held_at(now) {
                continue;
            }
            return Ok(match rec.state {
                idemgate_core::State::Completed { .. } => Claim::Completed(rec),
                idemgate_core::State::InProgress { lease_until, .. } => Claim::InProgress {
                    lease_until,
                    attempts: rec.attempts,
                },
            });
        }
        Err(Error::Unavailable {
            backend: "postgres",
            source: "the key changed state on every try".into(),
        })
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        self.fenced(&self.sql.complete, lease, |q| {
            q.bind(outcome.encode()).bind(ms(retention))
        })
        .await
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        self.fenced(&self.sql.release, &lease, |q| q).await
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        let r = pg(sqlx::query(&self.sql.renew)
            .bind(lease.key().scope())
            .bind(lease.key().id())
            .bind(token_param(lease))
            .bind(ms(extend))
            .fetch_optional(&self.pool)
            .await)?;
        match r {
            Some(r) => Ok(Lease::new(
                lease.key().clone(),
                lease.token(),
                time_from_ms(pg(r.try_get(0))?),
                lease.attempt(),
            )),
            None => Err(Error::LeaseLost),
        }
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        let r = pg(sqlx::query(&self.sql.get)
            .bind(key.scope())
            .bind(key.id())
            .fetch_optional(&self.pool)
            .await)?;
        r.map(|r| pg(row(&r))?.into_record(key, "postgres"))
            .transpose()
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        let done = pg(sqlx::query(&self.sql.purge)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await)?;
        Ok(done.rows_affected())
    }
}

//! `PostgresStore`.

use std::time::Duration;

use idemgate_core::backend::{ForgetStep, RecordRow, TOKENS_PER_MS, time_from_ms};
use idemgate_core::{
    Claim, ClaimOptions, Error, Fingerprint, Forgotten, Key, Lease, Outcome, Record, Result, Store,
};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};

use crate::error::{check_ident, pg};

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
    partitions: Option<Partitions>,
}

/// How a partitioned records table assigns keys to partitions.
///
/// A key must land in the same partition every time (its duplicates included), so the
/// partition is a pure function of the key: by default the day of the UUIDv7 timestamp in the
/// key's id, which is when its event was produced.
#[derive(Clone, Copy)]
pub struct Partitions {
    bucket: fn(&Key) -> Result<i64>,
}

impl std::fmt::Debug for Partitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partitions").finish_non_exhaustive()
    }
}

/// Milliseconds in a daily partition.
const DAY_MS: i64 = 86_400_000;

impl Partitions {
    /// One partition per day of the event's UUIDv7 timestamp; keys whose id is not a UUIDv7 are
    /// refused with `Error::InvalidKey`.
    pub fn uuid_v7_daily() -> Self {
        Partitions {
            bucket: |key| {
                let u = key
                    .id()
                    .parse::<idemgate_core::EventId>()
                    .ok()
                    .and_then(|e| match e {
                        idemgate_core::EventId::Uuid(u) if u.get_version_num() == 7 => {
                            u.get_timestamp()
                        }
                        _ => None,
                    });
                let Some(ts) = u else {
                    return Err(Error::InvalidKey {
                        reason: format!(
                            "a daily-partitioned store needs UUIDv7 ids; {key} is not one"
                        ),
                    });
                };
                let (secs, nanos) = ts.to_unix();
                Ok(i64::try_from(secs)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000)
                    .saturating_add(i64::from(nanos / 1_000_000))
                    / DAY_MS)
            },
        }
    }

    /// Partitions chosen by `bucket`, which must return the same bucket for every claim of a key.
    pub fn by(bucket: fn(&Key) -> Result<i64>) -> Self {
        Partitions { bucket }
    }
}

impl PostgresStoreBuilder {
    /// A partitioned records table (`PARTITION BY RANGE (bucket)`, plus a default partition):
    /// [`PostgresStore::create_partitions`] adds partitions ahead, and
    /// [`PostgresStore::drop_expired_partitions`] drops whole partitions once every record in
    /// them has expired, instead of deleting rows.
    pub fn with_partitions(mut self, partitions: Partitions) -> Self {
        self.partitions = Some(partitions);
        self
    }

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
            sql: std::sync::Arc::new(Statements::new(&self.table, self.partitions.is_some())),
            partitions: self.partitions,
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
    partitions: Option<Partitions>,
}

#[derive(Debug)]
struct Statements {
    ddl: String,
    claim: String,
    claim_many: String,
    select: String,
    select_many: String,
    complete_many: String,
    complete: String,
    release: String,
    renew: String,
    get: String,
    purge: String,
    forget: String,
}

/// The columns of the records table; `bucket` is the partition of a partitioned table (0 in a
/// plain one), part of the primary key so that key uniqueness holds within each partition.
const COLUMN_DDL: &str = "scope TEXT NOT NULL,
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
    bucket BIGINT NOT NULL,
    PRIMARY KEY (scope, id, bucket)";

impl Statements {
    fn new(t: &str, partitioned: bool) -> Self {
        // the shared conflict arm: take the key over only when it is free. SET expressions read
        // the row as it was; `excluded` is the proposed row.
        let upsert = format!(
            "ON CONFLICT (scope, id, bucket) DO UPDATE SET
                fingerprint = CASE WHEN r.expires_at <= {NOW} THEN excluded.fingerprint
                                   ELSE coalesce(r.fingerprint, excluded.fingerprint) END,
                state = 0,
                token = r.token + 1,
                lease_until = excluded.lease_until,
                outcome = NULL,
                completed_at = NULL,
                created_at = CASE WHEN r.expires_at <= {NOW} THEN {NOW} ELSE r.created_at END,
                attempts = CASE WHEN r.expires_at <= {NOW} THEN 1 ELSE r.attempts + 1 END,
                expires_at = excluded.expires_at
             WHERE r.expires_at <= {NOW}
                OR (r.state = 0 AND r.lease_until <= {NOW}
                    AND (r.fingerprint IS NULL OR excluded.fingerprint IS NULL
                         OR r.fingerprint = excluded.fingerprint))
             RETURNING token, attempts, lease_until, scope, id"
        );
        Statements {
            ddl: if partitioned {
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} ({COLUMN_DDL}) PARTITION BY RANGE (bucket);
                     CREATE TABLE IF NOT EXISTS {t}_default PARTITION OF {t} DEFAULT;
                     CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at);"
                )
            } else {
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} ({COLUMN_DDL});
                     CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at);"
                )
            },
            // $1 scope $2 id $3 fingerprint $4 lease ms $5 retention ms
            claim: format!(
                "INSERT INTO {t} AS r (scope, id, fingerprint, state, token, lease_until, outcome,
                                       completed_at, created_at, expires_at, attempts, bucket)
                 VALUES ($1, $2, $3, 0, {NOW} * {TOKENS_PER_MS}, {NOW} + $4, NULL, NULL, {NOW}, {NOW} + $4 + $5, 1, $6)
                 {upsert}"
            ),
            // $1 scopes $2 ids $3 fingerprints $4 lease ms $5 retention ms
            claim_many: format!(
                "INSERT INTO {t} AS r (scope, id, fingerprint, state, token, lease_until, outcome,
                                       completed_at, created_at, expires_at, attempts, bucket)
                 SELECT s, d, f, 0, {NOW} * {TOKENS_PER_MS}, {NOW} + $4, NULL, NULL, {NOW}, {NOW} + $4 + $5, 1, b
                   FROM unnest($1::text[], $2::text[], $3::bytea[], $6::bigint[]) AS u(s, d, f, b)
                 {upsert}"
            ),
            select_many: format!(
                "SELECT {COLUMNS}, {NOW} AS now, scope, id FROM {t}
                  WHERE (scope, id, bucket) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]))"
            ),
            complete_many: format!(
                "UPDATE {t} AS r SET state = 1, outcome = u.o, completed_at = {NOW}, lease_until = NULL,
                    expires_at = {NOW} + $5
                   FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[], $6::bigint[]) AS u(s, d, tok, o, b)
                  WHERE r.scope = u.s AND r.id = u.d AND r.bucket = u.b AND r.state = 0 AND r.token = u.tok
                 RETURNING r.scope, r.id, r.token"
            ),
            select: format!("SELECT {COLUMNS}, {NOW} AS now FROM {t} WHERE scope = $1 AND id = $2 AND bucket = $3"),
            complete: format!(
                "UPDATE {t} SET state = 1, outcome = $4, completed_at = {NOW}, lease_until = NULL,
                    expires_at = {NOW} + $5
                 WHERE scope = $1 AND id = $2 AND state = 0 AND token = $3 AND bucket = $6"
            ),
            release: format!(
                "UPDATE {t} SET lease_until = LEAST(lease_until, {NOW}), fingerprint = NULL
                 WHERE scope = $1 AND id = $2 AND state = 0 AND token = $3 AND bucket = $4"
            ),
            renew: format!(
                "UPDATE {t} SET lease_until = {NOW} + $4,
                    expires_at = GREATEST(expires_at, {NOW} + $4 + (expires_at - lease_until))
                 WHERE scope = $1 AND id = $2 AND state = 0 AND token = $3 AND bucket = $5
                 RETURNING lease_until"
            ),
            get: format!("SELECT {COLUMNS} FROM {t} WHERE scope = $1 AND id = $2 AND bucket = $3 AND expires_at > {NOW}"),
            purge: format!(
                "DELETE FROM {t} WHERE (scope, id, bucket) IN (
                    SELECT scope, id, bucket FROM {t} WHERE expires_at <= {NOW} LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
            // compare-and-set on the state and token read: $4 token, $5 state, then the
            // tombstone's $6 token and $7 lease end, and $8 force
            forget: format!(
                "UPDATE {t} SET state = 0, token = $6, lease_until = $7, fingerprint = NULL,
                    outcome = NULL, completed_at = NULL
                 WHERE scope = $1 AND id = $2 AND bucket = $3 AND token = $4 AND state = $5
                   AND ($8 OR state = 1 OR lease_until <= $7)"
            ),
        }
    }
}

pub(crate) use idemgate_sql::millis as ms;

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

/// The lease in a `RETURNING token, attempts, lease_until` row.
fn acquired(key: &Key, r: &PgRow) -> Result<Claim> {
    let token: i64 = pg(r.try_get(0))?;
    let attempts: i32 = pg(r.try_get(1))?;
    let until: i64 = pg(r.try_get(2))?;
    Ok(Claim::Acquired(Lease::new(
        key.clone(),
        u64::try_from(token).unwrap_or(0),
        time_from_ms(until),
        u32::try_from(attempts).unwrap_or(u32::MAX),
    )))
}

/// What a claim that did not win reports, from the row and the database's `now` (column 9);
/// `None` when the key turned free meanwhile (claim again).
fn decide(key: &Key, fp: Option<&Fingerprint>, r: &PgRow) -> Result<Option<Claim>> {
    let now: i64 = pg(r.try_get(9))?;
    pg(row(r))?.taken(key, fp, now, "postgres")
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
            partitions: None,
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
        let mut conn = pg(self.pool.acquire().await)?;
        idemgate_sql::migrate(
            &mut *conn,
            &self.table,
            std::slice::from_ref(&self.sql.ddl),
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
                "bucket",
            ],
        )
        .await
    }

    /// The partition bucket of `key` (0 for a plain table).
    fn bucket(&self, key: &Key) -> Result<i64> {
        self.partitions.map_or(Ok(0), |p| (p.bucket)(key))
    }

    /// Creates the partitions for buckets `from..to` that do not exist yet (for daily
    /// partitions, buckets are days since the epoch: see [`PostgresStore::today`]). Create them
    /// ahead of the events that fill them; a key without its partition lands in the default one.
    pub async fn create_partitions(&self, from: i64, to: i64) -> Result<()> {
        let t = &self.table;
        for b in from..to {
            pg(sqlx::query(&format!(
                "CREATE TABLE IF NOT EXISTS {t}_b{b} PARTITION OF {t} FOR VALUES FROM ({b}) TO ({})",
                b + 1
            ))
            .execute(&self.pool)
            .await)?;
        }
        Ok(())
    }

    /// Today's daily bucket by the database clock.
    pub async fn today(&self) -> Result<i64> {
        let (now,): (i64,) = pg(sqlx::query_as(&format!("SELECT {NOW}"))
            .fetch_one(&self.pool)
            .await)?;
        Ok(now / DAY_MS)
    }

    /// Drops every bucket partition none of whose records is still live; returns their names.
    /// The partition is locked while it is checked and dropped, so a claim racing into it waits
    /// and then fails with a typed error (its retry lands in the default partition).
    pub async fn drop_expired_partitions(&self) -> Result<Vec<String>> {
        let parts: Vec<(String,)> = pg(sqlx::query_as(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              JOIN pg_class p ON p.oid = i.inhparent
             WHERE p.relname = $1 AND c.relname <> $2 ORDER BY 1",
        )
        .bind(&self.table)
        .bind(format!("{}_default", self.table))
        .fetch_all(&self.pool)
        .await)?;
        let mut dropped = Vec::new();
        for (part,) in parts {
            let mut tx = pg(self.pool.begin().await)?;
            pg(
                sqlx::query(&format!("LOCK TABLE {part} IN ACCESS EXCLUSIVE MODE"))
                    .execute(&mut *tx)
                    .await,
            )?;
            let (live,): (bool,) = pg(sqlx::query_as(&format!(
                "SELECT EXISTS (SELECT 1 FROM {part} WHERE expires_at > {NOW})"
            ))
            .fetch_one(&mut *tx)
            .await)?;
            if live {
                pg(tx.rollback().await)?;
                continue;
            }
            pg(sqlx::query(&format!("DROP TABLE {part}"))
                .execute(&mut *tx)
                .await)?;
            pg(tx.commit().await)?;
            dropped.push(part);
        }
        Ok(dropped)
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
        let bucket = self.bucket(key)?;
        // a key that turns free between the two statements is simply claimed again
        for _ in 0..8 {
            let won = pg(sqlx::query(&self.sql.claim)
                .bind(key.scope())
                .bind(key.id())
                .bind(&fp_bytes)
                .bind(ms(opts.lease))
                .bind(ms(opts.retention))
                .bind(bucket)
                .fetch_optional(&self.pool)
                .await)?;
            if let Some(r) = won {
                return acquired(key, &r);
            }
            let r = pg(sqlx::query(&self.sql.select)
                .bind(key.scope())
                .bind(key.id())
                .bind(bucket)
                .fetch_optional(&self.pool)
                .await)?;
            if let Some(r) = r
                && let Some(claim) = decide(key, fp, &r)?
            {
                return Ok(claim);
            }
        }
        Err(Error::Unavailable {
            backend: "postgres",
            source: "the key changed state on every try".into(),
        })
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        let bucket = self.bucket(lease.key())?;
        self.fenced(&self.sql.complete, lease, |q| {
            q.bind(outcome.encode()).bind(ms(retention)).bind(bucket)
        })
        .await
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        let bucket = self.bucket(lease.key())?;
        self.fenced(&self.sql.release, &lease, |q| q.bind(bucket))
            .await
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        let r = pg(sqlx::query(&self.sql.renew)
            .bind(lease.key().scope())
            .bind(lease.key().id())
            .bind(token_param(lease))
            .bind(ms(extend))
            .bind(self.bucket(lease.key())?)
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
            .bind(self.bucket(key)?)
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

    async fn forget(&self, key: &Key, force: bool) -> Result<Forgotten> {
        let bucket = self.bucket(key)?;
        // read, then change the row only if its token is still the one read
        for _ in 0..8 {
            let r = pg(sqlx::query(&self.sql.select)
                .bind(key.scope())
                .bind(key.id())
                .bind(bucket)
                .fetch_optional(&self.pool)
                .await)?;
            let Some(r) = r else {
                return Ok(Forgotten::Absent);
            };
            let (stored, now) = (pg(row(&r))?, pg(r.try_get::<i64, _>(9))?);
            let step = stored.forget_step(now, force);
            let ForgetStep::Tombstone {
                token,
                lease_until,
                completed,
            } = step
            else {
                return Ok(step.answer());
            };
            let q = sqlx::query(&self.sql.forget)
                .bind(key.scope())
                .bind(key.id())
                .bind(bucket)
                .bind(stored.token)
                .bind(i16::from(completed))
                .bind(token)
                .bind(lease_until)
                .bind(force);
            if pg(q.execute(&self.pool).await)?.rows_affected() == 1 {
                return Ok(step.answer());
            }
        }
        Err(Error::Unavailable {
            backend: "postgres",
            source: "the key changed state on every try".into(),
        })
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        let mut seen = std::collections::HashSet::new();
        if !claims.iter().all(|(k, _)| seen.insert(k)) {
            // ON CONFLICT may not touch one row twice in a statement: claim in order instead
            let mut out = Vec::with_capacity(claims.len());
            for (k, fp) in claims {
                out.push(self.claim(k, fp.as_ref(), opts).await?);
            }
            return Ok(out);
        }
        let scopes: Vec<&str> = claims.iter().map(|(k, _)| k.scope()).collect();
        let ids: Vec<&str> = claims.iter().map(|(k, _)| k.id()).collect();
        let buckets: Vec<i64> = claims
            .iter()
            .map(|(k, _)| self.bucket(k))
            .collect::<Result<_>>()?;
        let fps: Vec<Option<Vec<u8>>> = claims
            .iter()
            .map(|(_, f)| f.map(|f| f.as_bytes().to_vec()))
            .collect();
        let won = pg(sqlx::query(&self.sql.claim_many)
            .bind(&scopes)
            .bind(&ids)
            .bind(&fps)
            .bind(ms(opts.lease))
            .bind(ms(opts.retention))
            .bind(&buckets)
            .fetch_all(&self.pool)
            .await)?;
        let mut by_key = std::collections::HashMap::new();
        for r in &won {
            by_key.insert(
                (
                    pg(r.try_get::<String, _>(3))?,
                    pg(r.try_get::<String, _>(4))?,
                ),
                r,
            );
        }
        let lost: Vec<usize> = (0..claims.len())
            .filter(|&i| !by_key.contains_key(&(scopes[i].to_owned(), ids[i].to_owned())))
            .collect();
        let mut live = std::collections::HashMap::new();
        if !lost.is_empty() {
            let ls: Vec<&str> = lost.iter().map(|&i| scopes[i]).collect();
            let li: Vec<&str> = lost.iter().map(|&i| ids[i]).collect();
            for r in pg(sqlx::query(&self.sql.select_many)
                .bind(&ls)
                .bind(&li)
                .bind(lost.iter().map(|&i| buckets[i]).collect::<Vec<i64>>())
                .fetch_all(&self.pool)
                .await)?
            {
                live.insert(
                    (
                        pg(r.try_get::<String, _>(10))?,
                        pg(r.try_get::<String, _>(11))?,
                    ),
                    r,
                );
            }
        }
        let mut out = Vec::with_capacity(claims.len());
        for (i, (key, fp)) in claims.iter().enumerate() {
            let k = (scopes[i].to_owned(), ids[i].to_owned());
            let decided = match (by_key.get(&k), live.get(&k)) {
                (Some(r), _) => Some(acquired(key, r)?),
                (None, Some(r)) => decide(key, fp.as_ref(), r)?,
                (None, None) => None,
            };
            out.push(match decided {
                Some(c) => c,
                // it turned free between the statements: claim it on its own
                None => self.claim(key, fp.as_ref(), opts).await?,
            });
        }
        Ok(out)
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        let scopes: Vec<&str> = done.iter().map(|(l, _)| l.key().scope()).collect();
        let ids: Vec<&str> = done.iter().map(|(l, _)| l.key().id()).collect();
        let tokens: Vec<i64> = done.iter().map(|(l, _)| token_param(l)).collect();
        let buckets: Vec<i64> = done
            .iter()
            .map(|(l, _)| self.bucket(l.key()))
            .collect::<Result<_>>()?;
        let outcomes: Vec<Vec<u8>> = done.iter().map(|(_, o)| o.encode()).collect();
        let rows: Vec<(String, String, i64)> = pg(sqlx::query_as(&self.sql.complete_many)
            .bind(&scopes)
            .bind(&ids)
            .bind(&tokens)
            .bind(&outcomes)
            .bind(ms(retention))
            .bind(&buckets)
            .fetch_all(&self.pool)
            .await)?;
        let mut completed: std::collections::HashSet<(String, String, i64)> =
            rows.into_iter().collect();
        // each completed row answers one lease; a repeat of it is stale, as it would be in sequence
        Ok((0..done.len())
            .map(|i| {
                if completed.remove(&(scopes[i].to_owned(), ids[i].to_owned(), tokens[i])) {
                    Ok(())
                } else {
                    Err(Error::LeaseLost)
                }
            })
            .collect())
    }
}

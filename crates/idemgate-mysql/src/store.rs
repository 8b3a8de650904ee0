//! `MySqlStore`.

use std::sync::Arc;
use std::time::Duration;

use idemgate_core::backend::{ForgetStep, RecordRow, TOKENS_PER_MS, time_from_ms};
use idemgate_core::{
    Claim, ClaimOptions, Error, Fingerprint, Forgotten, Key, Lease, Outcome, Record, Result, State,
    Store,
};
use sqlx::mysql::{MySqlPoolOptions, MySqlRow};
use sqlx::{MySqlPool, Row};

use crate::error::{check_ident, keys_condition, my};

/// The database clock in milliseconds, fixed for the statement.
pub(crate) const NOW: &str = "CAST(ROUND(UNIX_TIMESTAMP(NOW(3)) * 1000) AS SIGNED)";

const COLUMNS: &str = "fingerprint, state, token, lease_until, outcome, completed_at, created_at, expires_at, attempts";

/// Builds a [`MySqlStore`].
#[derive(Debug, Clone)]
pub struct MySqlStoreBuilder {
    url: Option<String>,
    pool: Option<MySqlPool>,
    table: String,
    max_connections: u32,
    acquire_timeout: Duration,
}

impl MySqlStoreBuilder {
    /// The database URL (`mysql://user@host:port/db`).
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// An existing pool, shared with the application.
    pub fn with_pool(mut self, pool: MySqlPool) -> Self {
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

    /// Builds the store; connections open on first use. Call [`MySqlStore::migrate`] once.
    pub fn build(self) -> Result<MySqlStore> {
        check_ident(&self.table)?;
        let pool = match (self.pool, self.url) {
            (Some(pool), _) => pool,
            (None, Some(url)) => my(MySqlPoolOptions::new()
                .max_connections(self.max_connections)
                .acquire_timeout(self.acquire_timeout)
                .connect_lazy(&url))?,
            (None, None) => {
                return Err(Error::Config {
                    message: "MySqlStore needs with_url or with_pool".into(),
                });
            }
        };
        Ok(MySqlStore {
            pool,
            sql: Arc::new(Statements::new(&self.table)),
            table: self.table,
        })
    }
}

/// The [`Store`] contract on MySQL 8 and MariaDB 10.5+.
///
/// A claim is one `INSERT … ON DUPLICATE KEY UPDATE` whose assignments apply only when the
/// stored record is free; the first assignment stamps the claim's random nonce, the others
/// follow it. Under the row lock that statement took, a `SELECT … FOR UPDATE` in the same
/// transaction reads the outcome: our nonce means acquired.
///
/// # Clone
/// Cheap: clones share the connection pool.
#[derive(Debug, Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    table: String,
    sql: Arc<Statements>,
}

impl Statements {
    fn claim_rows(&self, n: usize) -> String {
        // one row per key: scope, id, fingerprint, lease, lease + retention, nonce
        // the clock is read once, by the first row, and reused by the others
        let first = format!(
            "(?, ?, ?, 0, {NOW} * {TOKENS_PER_MS}, (@idemgate_now := {NOW}) + ?, NULL, NULL, @idemgate_now, @idemgate_now + ?, 1, ?)"
        );
        let rest = format!(
            "(?, ?, ?, 0, @idemgate_now * {TOKENS_PER_MS}, @idemgate_now + ?, NULL, NULL, @idemgate_now, @idemgate_now + ?, 1, ?)"
        );
        let rows: Vec<&str> = std::iter::once(first.as_str())
            .chain(std::iter::repeat_n(rest.as_str(), n.saturating_sub(1)))
            .collect();
        self.claim.replace("{rows}", &rows.join(", "))
    }

    fn select_rows(&self, cond: &str) -> String {
        format!("{}({cond}) FOR UPDATE", self.select)
    }
}

#[derive(Debug)]
struct Statements {
    ddl: Vec<String>,
    claim: String,
    select: String,
    complete: String,
    release: String,
    renew: String,
    renewed: String,
    get: String,
    purge: String,
    forget: String,
}

impl Statements {
    fn new(t: &str) -> Self {
        let mine = "nonce = VALUES(nonce)";
        let expired = "expires_at <= VALUES(created_at)";
        Statements {
            ddl: vec![format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    scope VARBINARY(255) NOT NULL,
                    id VARBINARY(255) NOT NULL,
                    fingerprint VARBINARY(32),
                    state TINYINT NOT NULL,
                    token BIGINT NOT NULL,
                    lease_until BIGINT,
                    outcome LONGBLOB,
                    completed_at BIGINT,
                    created_at BIGINT NOT NULL,
                    expires_at BIGINT NOT NULL,
                    attempts INT NOT NULL,
                    nonce BIGINT NOT NULL,
                    PRIMARY KEY (scope, id),
                    KEY {t}_expires_at (expires_at)
                 ) ENGINE=InnoDB"
            )],
            // ? scope, id, fingerprint, lease ms, lease + retention ms, nonce. Assignments run in
            // order and see earlier ones, so `nonce` decides first and `expires_at` goes last.
            claim: format!(
                "INSERT INTO {t} (scope, id, fingerprint, state, token, lease_until, outcome,
                                  completed_at, created_at, expires_at, attempts, nonce)
                 VALUES {{rows}}
                 ON DUPLICATE KEY UPDATE
                    nonce = IF({expired} OR (state = 0 AND lease_until <= VALUES(created_at)
                                AND (fingerprint IS NULL OR VALUES(fingerprint) IS NULL
                                     OR fingerprint = VALUES(fingerprint))),
                               VALUES(nonce), nonce),
                    fingerprint = IF({mine}, IF({expired}, VALUES(fingerprint),
                                                 COALESCE(fingerprint, VALUES(fingerprint))), fingerprint),
                    attempts = IF({mine}, IF({expired}, 1, attempts + 1), attempts),
                    created_at = IF({mine} AND {expired}, VALUES(created_at), created_at),
                    token = IF({mine}, token + 1, token),
                    state = IF({mine}, 0, state),
                    lease_until = IF({mine}, VALUES(lease_until), lease_until),
                    outcome = IF({mine}, NULL, outcome),
                    completed_at = IF({mine}, NULL, completed_at),
                    expires_at = IF({mine}, VALUES(expires_at), expires_at)"
            ),
            select: format!("SELECT {COLUMNS}, nonce, {NOW}, scope, id FROM {t} WHERE "),
            complete: format!(
                "UPDATE {t} SET state = 1, outcome = ?, completed_at = {NOW}, lease_until = NULL,
                    expires_at = {NOW} + ?
                 WHERE scope = ? AND id = ? AND state = 0 AND token = ?"
            ),
            release: format!(
                "UPDATE {t} SET lease_until = LEAST(lease_until, {NOW}), fingerprint = NULL
                 WHERE scope = ? AND id = ? AND state = 0 AND token = ?"
            ),
            // expires_at first: it reads the old lease_until
            renew: format!(
                "UPDATE {t} SET expires_at = GREATEST(expires_at, {NOW} + ? + (expires_at - lease_until)),
                    lease_until = {NOW} + ?
                 WHERE scope = ? AND id = ? AND state = 0 AND token = ?"
            ),
            renewed: format!("SELECT lease_until FROM {t} WHERE scope = ? AND id = ?"),
            get: format!("SELECT {COLUMNS} FROM {t} WHERE scope = ? AND id = ? AND expires_at > {NOW}"),
            purge: format!("DELETE FROM {t} WHERE expires_at <= {NOW} ORDER BY expires_at LIMIT ?"),
            // run on the row locked by `select_rows`
            forget: format!(
                "UPDATE {t} SET state = 0, token = ?, lease_until = ?, fingerprint = NULL,
                    outcome = NULL, completed_at = NULL
                 WHERE scope = ? AND id = ? AND token = ?"
            ),
        }
    }
}

pub(crate) use idemgate_sql::millis as ms;

fn token_param(lease: &Lease) -> i64 {
    i64::try_from(lease.token()).unwrap_or(-1)
}

fn row(r: &MySqlRow) -> std::result::Result<RecordRow, sqlx::Error> {
    Ok(RecordRow {
        fingerprint: r.try_get(0)?,
        state: r.try_get::<i8, _>(1)?.into(),
        token: r.try_get(2)?,
        lease_until: r.try_get(3)?,
        outcome: r.try_get(4)?,
        completed_at: r.try_get(5)?,
        created_at: r.try_get(6)?,
        expires_at: r.try_get(7)?,
        attempts: r.try_get::<i32, _>(8)?.into(),
    })
}

/// What a claim reports from the row read back under its lock: our nonce means acquired.
fn decide(key: &Key, fp: Option<&Fingerprint>, r: &MySqlRow, nonce: i64) -> Result<Claim> {
    let stored = my(row(r))?;
    if my(r.try_get::<i64, _>(9))? == nonce {
        return Ok(Claim::Acquired(Lease::new(
            key.clone(),
            u64::try_from(stored.token).unwrap_or(0),
            time_from_ms(stored.lease_until.unwrap_or_default()),
            u32::try_from(stored.attempts).unwrap_or(u32::MAX),
        )));
    }
    let rec = stored.into_record(key, "mysql")?;
    if let (Some(s), Some(g)) = (rec.fingerprint, fp)
        && s != *g
    {
        return Ok(Claim::Mismatch { stored: s });
    }
    Ok(match rec.state {
        State::Completed { .. } => Claim::Completed(rec),
        State::InProgress { lease_until, .. } => Claim::InProgress {
            lease_until,
            attempts: rec.attempts,
        },
    })
}

impl MySqlStore {
    /// Claims distinct keys in one transaction: one multi-row upsert (each row with its own
    /// nonce), one locking read of the rows.
    async fn claim_many_inner(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let nonces: Vec<i64> = claims.iter().map(|_| rand::random()).collect();
        let mut tx = my(self.pool.begin().await)?;
        let text = self.sql.claim_rows(claims.len());
        let mut q = sqlx::query(&text);
        for ((key, fp), nonce) in claims.iter().zip(&nonces) {
            q = q
                .bind(key.scope())
                .bind(key.id())
                .bind(fp.map(|f| f.as_bytes().to_vec()))
                .bind(ms(opts.lease))
                .bind(ms(opts.lease).saturating_add(ms(opts.retention)))
                .bind(*nonce);
        }
        my(q.execute(&mut *tx).await)?;
        let (cond, params) = keys_condition(claims.iter().map(|(k, _)| k));
        let text = self.sql.select_rows(&cond);
        let mut q = sqlx::query(&text);
        for p in &params {
            q = q.bind(*p);
        }
        let rows = my(q.fetch_all(&mut *tx).await)?;
        my(tx.commit().await)?;
        let mut by_key = std::collections::HashMap::new();
        for r in &rows {
            by_key.insert(
                (
                    my(r.try_get::<Vec<u8>, _>(11))?,
                    my(r.try_get::<Vec<u8>, _>(12))?,
                ),
                r,
            );
        }
        claims
            .iter()
            .zip(&nonces)
            .map(|((key, fp), nonce)| {
                let r = by_key
                    .get(&(
                        key.scope().as_bytes().to_vec(),
                        key.id().as_bytes().to_vec(),
                    ))
                    .ok_or_else(|| Error::Corrupt {
                        backend: "mysql",
                        reason: format!("claimed row of {key} not found"),
                    })?;
                decide(key, fp.as_ref(), r, *nonce)
            })
            .collect()
    }

    /// A builder: URL or pool, table, pool size.
    pub fn builder() -> MySqlStoreBuilder {
        MySqlStoreBuilder {
            url: None,
            pool: None,
            table: "idemgate_records".into(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }

    /// A store on `IDEMGATE_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`).
    pub fn from_env() -> Result<Self> {
        let url = std::env::var("IDEMGATE_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
        Self::builder().with_url(url).build()
    }

    /// Creates the records table if missing.
    pub async fn migrate(&self) -> Result<()> {
        let mut conn = my(self.pool.acquire().await)?;
        idemgate_sql::migrate(
            &mut *conn,
            &self.table,
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
                "nonce",
            ],
        )
        .await
    }

    /// The connection pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    async fn fenced(&self, text: &str, lease: &Lease, head: &[i64]) -> Result<()> {
        let mut q = sqlx::query(text);
        for v in head {
            q = q.bind(*v);
        }
        let done = my(q
            .bind(lease.key().scope())
            .bind(lease.key().id())
            .bind(token_param(lease))
            .execute(&self.pool)
            .await)?;
        // the connection reports matched rows (CLIENT_FOUND_ROWS), so an update to equal values
        // still counts
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }
}

impl Store for MySqlStore {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        Ok(self
            .claim_many_inner(&[(key.clone(), fp.copied())], opts)
            .await?
            .remove(0))
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        let mut q = sqlx::query(&self.sql.complete)
            .bind(outcome.encode())
            .bind(ms(retention));
        q = q
            .bind(lease.key().scope())
            .bind(lease.key().id())
            .bind(token_param(lease));
        let done = my(q.execute(&self.pool).await)?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        self.fenced(&self.sql.release, &lease, &[]).await
    }

    async fn forget(&self, key: &Key, force: bool) -> Result<Forgotten> {
        let mut tx = my(self.pool.begin().await)?;
        let text = self.sql.select_rows("scope = ? AND id = ?");
        let r = my(sqlx::query(&text)
            .bind(key.scope())
            .bind(key.id())
            .fetch_optional(&mut *tx)
            .await)?;
        let Some(r) = r else {
            return Ok(Forgotten::Absent);
        };
        let (stored, now) = (my(row(&r))?, my(r.try_get::<i64, _>(10))?);
        let step = stored.forget_step(now, force);
        let ForgetStep::Tombstone {
            token, lease_until, ..
        } = step
        else {
            return Ok(step.answer());
        };
        my(sqlx::query(&self.sql.forget)
            .bind(token)
            .bind(lease_until)
            .bind(key.scope())
            .bind(key.id())
            .bind(stored.token)
            .execute(&mut *tx)
            .await)?;
        my(tx.commit().await)?;
        Ok(step.answer())
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        let mut tx = my(self.pool.begin().await)?;
        let done = my(sqlx::query(&self.sql.renew)
            .bind(ms(extend))
            .bind(ms(extend))
            .bind(lease.key().scope())
            .bind(lease.key().id())
            .bind(token_param(lease))
            .execute(&mut *tx)
            .await)?;
        if done.rows_affected() != 1 {
            return Err(Error::LeaseLost);
        }
        let (until,): (Option<i64>,) = my(sqlx::query_as(&self.sql.renewed)
            .bind(lease.key().scope())
            .bind(lease.key().id())
            .fetch_one(&mut *tx)
            .await)?;
        my(tx.commit().await)?;
        Ok(Lease::new(
            lease.key().clone(),
            lease.token(),
            time_from_ms(until.unwrap_or_default()),
            lease.attempt(),
        ))
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        let r = my(sqlx::query(&self.sql.get)
            .bind(key.scope())
            .bind(key.id())
            .fetch_optional(&self.pool)
            .await)?;
        r.map(|r| my(row(&r))?.into_record(key, "mysql"))
            .transpose()
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        let done = my(sqlx::query(&self.sql.purge)
            .bind(u64::try_from(limit).unwrap_or(u64::MAX))
            .execute(&self.pool)
            .await)?;
        Ok(done.rows_affected())
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        let mut seen = std::collections::HashSet::new();
        if claims.iter().all(|(k, _)| seen.insert(k)) {
            return self.claim_many_inner(claims, opts).await;
        }
        // a repeated key: claim in order, as the single forms would
        let mut out = Vec::with_capacity(claims.len());
        for (k, fp) in claims {
            out.push(self.claim(k, fp.as_ref(), opts).await?);
        }
        Ok(out)
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        // one multi-table UPDATE joins the leases; the rows it changed carry this batch's nonce
        let nonce: i64 = rand::random::<i64>() | 1;
        let rows = vec!["SELECT ? AS s, ? AS d, ? AS tok, ? AS o"; done.len()].join(" UNION ALL ");
        let t = &self.table;
        let update = format!(
            "UPDATE {t} r JOIN ({rows}) u ON r.scope = u.s AND r.id = u.d AND r.token = u.tok
                SET r.state = 1, r.outcome = u.o, r.completed_at = {NOW}, r.lease_until = NULL,
                    r.expires_at = {NOW} + ?, r.nonce = ?
              WHERE r.state = 0"
        );
        let (cond, params) = keys_condition(done.iter().map(|(l, _)| l.key()));
        let select = format!(
            "SELECT CAST(scope AS CHAR), CAST(id AS CHAR), token FROM {t} WHERE nonce = ? AND ({cond})"
        );
        let mut tx = my(self.pool.begin().await)?;
        let mut q = sqlx::query(&update);
        for (lease, outcome) in done {
            q = q
                .bind(lease.key().scope())
                .bind(lease.key().id())
                .bind(token_param(lease))
                .bind(outcome.encode());
        }
        my(q.bind(ms(retention)).bind(nonce).execute(&mut *tx).await)?;
        let mut q = sqlx::query_as::<_, (String, String, i64)>(&select).bind(nonce);
        for p in &params {
            q = q.bind(*p);
        }
        let mut completed: std::collections::HashSet<(String, String, i64)> =
            my(q.fetch_all(&mut *tx).await)?.into_iter().collect();
        my(tx.commit().await)?;
        // each changed row answers one lease; a repeat of it is stale, as it would be in sequence
        Ok(done
            .iter()
            .map(|(l, _)| {
                let k = (
                    l.key().scope().to_owned(),
                    l.key().id().to_owned(),
                    token_param(l),
                );
                if completed.remove(&k) {
                    Ok(())
                } else {
                    Err(Error::LeaseLost)
                }
            })
            .collect())
    }
}

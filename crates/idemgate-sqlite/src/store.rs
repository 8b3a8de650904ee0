//! `SqliteStore`: the Store contract in one SQLite file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use idemgate_core::backend::{ForgetStep, RecordRow, TOKENS_PER_MS, later, to_millis};
use idemgate_core::{
    Claim, ClaimOptions, Clock, Error, Fingerprint, Forgotten, Key, Lease, Outcome, Record, Result,
    State, Store, SystemClock,
};
use rusqlite::{Connection, OptionalExtension, Row, params};
use tokio::sync::oneshot;

use crate::conn::{check_table, migrate};
use crate::error::{corrupt, sql};

/// SQLite's `synchronous` setting: what a committed write survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Synchronous {
    /// Every commit is fsynced: survives a power loss. The default.
    #[default]
    Full,
    /// The WAL is fsynced at checkpoints only: survives a process crash (SIGKILL), but a power
    /// loss may forget the last commits, and with them completed keys.
    Normal,
}

/// Builds a [`SqliteStore`].
#[derive(Debug)]
pub struct SqliteStoreBuilder {
    path: Option<PathBuf>,
    table: String,
    busy_timeout: Duration,
    synchronous: Synchronous,
    batch: usize,
    clock: Arc<dyn Clock>,
}

impl SqliteStoreBuilder {
    /// The database file (created if missing). Required; `":memory:"` for a private in-memory
    /// database.
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        self.path = Some(path.as_ref().to_owned());
        self
    }

    /// The records table (default `idemgate_records`).
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// How long to wait for another process's write lock before failing with
    /// `Error::Unavailable` (default 5 s).
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The durability of commits (default [`Synchronous::Full`]).
    pub fn with_synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// The most operations committed together in one transaction (default 128; 1 turns group
    /// commit off).
    pub fn with_max_batch(mut self, ops: usize) -> Self {
        self.batch = ops.max(1);
        self
    }

    /// The clock that judges expiry (default: the system clock, shared by every process on the
    /// machine).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Opens the file, applies the schema and starts the writer thread.
    pub fn build(self) -> Result<SqliteStore> {
        let path = self.path.ok_or_else(|| Error::Config {
            message: "SqliteStore needs a path (with_path)".into(),
        })?;
        check_table(&self.table)?;
        let conn = open_connection(&path, self.busy_timeout, self.synchronous)?;
        let sql_text = Statements::new(&self.table);
        migrate(
            &conn,
            &self.table,
            std::slice::from_ref(&sql_text.ddl),
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
        )?;
        let (tx, rx) = mpsc::channel::<Job>();
        let clock = Arc::clone(&self.clock);
        let batch = self.batch;
        std::thread::Builder::new()
            .name("idemgate-sqlite".into())
            .spawn(move || {
                Writer {
                    conn,
                    sql: sql_text,
                    clock,
                    batch,
                }
                .run(rx)
            })
            .map_err(|e| Error::Backend {
                backend: "sqlite",
                source: Box::new(e),
            })?;
        Ok(SqliteStore {
            inner: Arc::new(Inner { tx, path }),
        })
    }
}

/// Opens a connection in WAL mode with a busy timeout; a file that is not SQLite fails here.
pub(crate) fn open_connection(
    path: &Path,
    busy_timeout: Duration,
    synchronous: Synchronous,
) -> Result<Connection> {
    let conn = sql(Connection::open(path))?;
    sql(conn.busy_timeout(busy_timeout))?;
    let mode: String = sql(conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)))?;
    if mode != "wal" && mode != "memory" {
        return Err(Error::Config {
            message: format!("{} cannot use WAL (journal mode {mode})", path.display()),
        });
    }
    let sync = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    sql(conn.execute_batch(&format!("PRAGMA synchronous = {sync}")))?;
    Ok(conn)
}

/// A [`Store`] in a SQLite file: the embedded, persistent default.
///
/// Every claim is one atomic `INSERT … ON CONFLICT DO UPDATE … WHERE <free> RETURNING`
/// against the `(scope, id)` primary key, inside a write transaction, so processes that share the
/// file exclude each other through SQLite's write lock (waiting up to the busy timeout).
/// Within a process, one writer thread owns the connection and commits the operations that
/// arrive together in one transaction (group commit): each caller is answered only after the
/// transaction holding its operation is durable.
///
/// # Clone
/// Clones share the writer thread; it stops when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (or creates) the store in `path` with the default settings.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::builder().with_path(path).build()
    }

    /// A builder for the table, durability, busy timeout, batching and clock.
    pub fn builder() -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            path: None,
            table: "idemgate_records".into(),
            busy_timeout: Duration::from_secs(5),
            synchronous: Synchronous::Full,
            batch: 128,
            clock: Arc::new(SystemClock),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn call<T>(&self, op: Op, wrap: fn(Answer) -> Option<T>) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Job { op, reply })
            .map_err(|_| stopped())?;
        let answer = rx.await.map_err(|_| stopped())??;
        wrap(answer).ok_or_else(|| corrupt("writer answered another operation"))
    }
}

fn stopped() -> Error {
    Error::Unavailable {
        backend: "sqlite",
        source: "the sqlite writer thread stopped".into(),
    }
}

enum Op {
    Claim(Key, Option<Fingerprint>, ClaimOptions),
    Complete(Lease, Outcome, Duration),
    Release(Lease),
    Renew(Lease, Duration),
    Get(Key),
    Purge(usize),
    Forget(Key, bool),
    ClaimMany(Vec<(Key, Option<Fingerprint>)>, ClaimOptions),
    CompleteMany(Vec<(Lease, Outcome)>, Duration),
}

enum Answer {
    Claim(Claim),
    Unit,
    Lease(Lease),
    Record(Option<Record>),
    Count(u64),
    Claims(Vec<Claim>),
    Units(Vec<Result<()>>),
    Forgotten(Forgotten),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Answer>>,
}

struct Statements {
    ddl: String,
    claim: String,
    select: String,
    complete: String,
    release: String,
    renew: String,
    get: String,
    purge: String,
    forget: String,
}

const COLUMNS: &str = "fingerprint, state, token, lease_until, outcome, completed_at, created_at, expires_at, attempts";

impl Statements {
    fn new(t: &str) -> Self {
        Statements {
            ddl: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    scope TEXT NOT NULL,
                    id TEXT NOT NULL,
                    fingerprint BLOB,
                    state INTEGER NOT NULL,
                    token INTEGER NOT NULL,
                    lease_until INTEGER,
                    outcome BLOB,
                    completed_at INTEGER,
                    created_at INTEGER NOT NULL,
                    expires_at INTEGER NOT NULL,
                    attempts INTEGER NOT NULL,
                    PRIMARY KEY (scope, id)
                 ) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at);"
            ),
            // ?1 scope ?2 id ?3 fingerprint ?4 now ?5 lease_until ?6 expires_at
            // SET expressions all read the row as it was before the update.
            claim: format!(
                "INSERT INTO {t} (scope, id, fingerprint, state, token, lease_until, outcome,
                                  completed_at, created_at, expires_at, attempts)
                 VALUES (?1, ?2, ?3, 0, max(?4 * {TOKENS_PER_MS}, 1), ?5, NULL, NULL, ?4, ?6, 1)
                 ON CONFLICT (scope, id) DO UPDATE SET
                    fingerprint = CASE WHEN expires_at <= ?4 THEN ?3
                                       ELSE coalesce(fingerprint, ?3) END,
                    state = 0,
                    token = token + 1,
                    lease_until = ?5,
                    outcome = NULL,
                    completed_at = NULL,
                    created_at = CASE WHEN expires_at <= ?4 THEN ?4 ELSE created_at END,
                    attempts = CASE WHEN expires_at <= ?4 THEN 1 ELSE attempts + 1 END,
                    expires_at = ?6
                 WHERE expires_at <= ?4
                    OR (state = 0 AND lease_until <= ?4
                        AND (fingerprint IS NULL OR ?3 IS NULL OR fingerprint = ?3))
                 RETURNING token, attempts"
            ),
            select: format!("SELECT {COLUMNS} FROM {t} WHERE scope = ?1 AND id = ?2"),
            complete: format!(
                "UPDATE {t} SET state = 1, outcome = ?4, completed_at = ?5, lease_until = NULL,
                    expires_at = ?6
                 WHERE scope = ?1 AND id = ?2 AND state = 0 AND token = ?3"
            ),
            release: format!(
                "UPDATE {t} SET lease_until = min(lease_until, ?4), fingerprint = NULL
                 WHERE scope = ?1 AND id = ?2 AND state = 0 AND token = ?3"
            ),
            renew: format!(
                "UPDATE {t} SET lease_until = ?4,
                    expires_at = max(expires_at, ?4 + (expires_at - lease_until))
                 WHERE scope = ?1 AND id = ?2 AND state = 0 AND token = ?3"
            ),
            get: format!(
                "SELECT {COLUMNS} FROM {t} WHERE scope = ?1 AND id = ?2 AND expires_at > ?3"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE (scope, id) IN
                    (SELECT scope, id FROM {t} WHERE expires_at <= ?1 LIMIT ?2)"
            ),
            // compare-and-set on the state and token read (another process may share the file)
            forget: format!(
                "UPDATE {t} SET state = 0, token = ?5, lease_until = ?6, fingerprint = NULL,
                    outcome = NULL, completed_at = NULL
                 WHERE scope = ?1 AND id = ?2 AND token = ?3 AND state = ?4
                   AND (?7 OR state = 1 OR lease_until <= ?6)"
            ),
        }
    }
}

fn ms(t: SystemTime) -> i64 {
    i64::try_from(to_millis(t)).unwrap_or(i64::MAX)
}

fn token(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn count(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Reads a row of `COLUMNS`; damaged values are `Corrupt`, not panics.
fn record(key: &Key, row: &Row<'_>) -> rusqlite::Result<Result<Record>> {
    Ok(record_row(row)?.into_record(key, "sqlite"))
}

fn record_row(row: &Row<'_>) -> rusqlite::Result<RecordRow> {
    Ok(RecordRow {
        fingerprint: row.get(0)?,
        state: row.get(1)?,
        token: row.get(2)?,
        lease_until: row.get(3)?,
        outcome: row.get(4)?,
        completed_at: row.get(5)?,
        created_at: row.get(6)?,
        expires_at: row.get(7)?,
        attempts: row.get(8)?,
    })
}

/// Waits for the next job: spins briefly first, because a caller that just got its answer often
/// sends again within microseconds, and waking a parked thread costs far more than that.
fn next_job(rx: &mpsc::Receiver<Job>) -> Option<Job> {
    let spin_until = std::time::Instant::now() + Duration::from_micros(50);
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if std::time::Instant::now() < spin_until => {
                std::thread::yield_now();
            }
            Err(mpsc::TryRecvError::Empty) => return rx.recv().ok(),
        }
    }
}

struct Writer {
    conn: Connection,
    sql: Statements,
    clock: Arc<dyn Clock>,
    batch: usize,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut jobs = Vec::with_capacity(self.batch);
        while let Some(first) = next_job(&rx) {
            jobs.push(first);
            while jobs.len() < self.batch {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.commit_group(&mut jobs);
        }
    }

    /// Runs the jobs in one transaction and answers them after it commits; if the transaction
    /// fails, every job gets the error (none of them took effect).
    fn commit_group(&mut self, jobs: &mut Vec<Job>) {
        let answers: Result<Vec<Result<Answer>>> = (|| {
            sql(self.conn.execute_batch("BEGIN IMMEDIATE"))?;
            let mut answers = Vec::with_capacity(jobs.len());
            for job in jobs.iter() {
                let answer = self.execute(&job.op);
                // a failed statement may have left the transaction in any state: abandon it all
                if let Err(e) = answer {
                    if !matches!(e, Error::LeaseLost | Error::Corrupt { .. }) {
                        let _ = self.conn.execute_batch("ROLLBACK");
                        return Err(e);
                    }
                    answers.push(Err(e));
                    continue;
                }
                answers.push(answer);
            }
            if let Err(e) = sql(self.conn.execute_batch("COMMIT")) {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(e);
            }
            Ok(answers)
        })();
        match answers {
            Ok(answers) => {
                for (job, answer) in jobs.drain(..).zip(answers) {
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                let text = e.to_string();
                let retryable = e.is_retryable();
                let mut first = Some(e);
                for job in jobs.drain(..) {
                    let e = first.take().unwrap_or_else(|| {
                        let source = text.clone().into();
                        if retryable {
                            Error::Unavailable {
                                backend: "sqlite",
                                source,
                            }
                        } else {
                            Error::Backend {
                                backend: "sqlite",
                                source,
                            }
                        }
                    });
                    let _ = job.reply.send(Err(e));
                }
            }
        }
    }

    /// Runs an update guarded by the lease's key and token (`?1`, `?2`, `?3`, then `extra` as
    /// `?4…`): one row changed, or the lease is stale and nothing changed.
    fn fenced(&self, text: &str, lease: &Lease, extra: &[&dyn rusqlite::ToSql]) -> Result<()> {
        let token = i64::try_from(lease.token()).unwrap_or(-1);
        let head: [&dyn rusqlite::ToSql; 3] = [&lease.key().scope(), &lease.key().id(), &token];
        let mut stmt = sql(self.conn.prepare_cached(text))?;
        let n = sql(stmt.execute(rusqlite::params_from_iter(head.iter().chain(extra))))?;
        if n == 1 {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }

    fn execute(&self, op: &Op) -> Result<Answer> {
        let now = self.clock.now();
        let c = &self.conn;
        match op {
            Op::Claim(key, fp, opts) => {
                let lease_until = later(now, opts.lease);
                let expires_at = later(lease_until, opts.retention);
                let fp_bytes = fp.as_ref().map(|f| f.as_bytes().as_slice());
                let mut stmt = sql(c.prepare_cached(&self.sql.claim))?;
                let won: Option<(i64, i64)> = sql(stmt
                    .query_row(
                        params![
                            key.scope(),
                            key.id(),
                            fp_bytes,
                            ms(now),
                            ms(lease_until),
                            ms(expires_at)
                        ],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional())?;
                if let Some((tok, attempts)) = won {
                    return Ok(Answer::Claim(Claim::Acquired(Lease::new(
                        key.clone(),
                        token(tok),
                        lease_until,
                        count(attempts),
                    ))));
                }
                let mut stmt = sql(c.prepare_cached(&self.sql.select))?;
                let rec = sql(stmt.query_row(params![key.scope(), key.id()], |r| record(key, r)))??;
                if let (Some(stored), Some(given)) = (rec.fingerprint, fp)
                    && stored != *given
                {
                    return Ok(Answer::Claim(Claim::Mismatch { stored }));
                }
                Ok(Answer::Claim(match rec.state {
                    State::Completed { .. } => Claim::Completed(rec),
                    State::InProgress { lease_until, .. } => Claim::InProgress {
                        lease_until,
                        attempts: rec.attempts,
                    },
                }))
            }
            Op::Complete(lease, outcome, retention) => {
                self.fenced(
                    &self.sql.complete,
                    lease,
                    params![outcome.encode(), ms(now), ms(later(now, *retention))],
                )?;
                Ok(Answer::Unit)
            }
            Op::Release(lease) => {
                self.fenced(&self.sql.release, lease, params![ms(now)])?;
                Ok(Answer::Unit)
            }
            Op::Renew(lease, extend) => {
                let until = later(now, *extend);
                self.fenced(&self.sql.renew, lease, params![ms(until)])?;
                Ok(Answer::Lease(Lease::new(
                    lease.key().clone(),
                    lease.token(),
                    until,
                    lease.attempt(),
                )))
            }
            Op::Get(key) => {
                let mut stmt = sql(c.prepare_cached(&self.sql.get))?;
                let rec = sql(stmt
                    .query_row(params![key.scope(), key.id(), ms(now)], |r| record(key, r))
                    .optional())?;
                Ok(Answer::Record(rec.transpose()?))
            }
            Op::ClaimMany(claims, opts) => {
                let mut out = Vec::with_capacity(claims.len());
                for (key, fp) in claims {
                    match self.execute(&Op::Claim(key.clone(), *fp, *opts))? {
                        Answer::Claim(c) => out.push(c),
                        _ => return Err(corrupt("claim answered another operation")),
                    }
                }
                Ok(Answer::Claims(out))
            }
            Op::CompleteMany(done, retention) => {
                let mut out = Vec::with_capacity(done.len());
                for (lease, outcome) in done {
                    out.push(
                        match self.fenced(
                            &self.sql.complete,
                            lease,
                            params![outcome.encode(), ms(now), ms(later(now, *retention))],
                        ) {
                            Err(e) if !matches!(e, Error::LeaseLost) => return Err(e),
                            r => r,
                        },
                    );
                }
                Ok(Answer::Units(out))
            }
            Op::Forget(key, force) => {
                for _ in 0..8 {
                    let mut stmt = sql(c.prepare_cached(&self.sql.select))?;
                    let stored = sql(stmt
                        .query_row(params![key.scope(), key.id()], record_row)
                        .optional())?;
                    let Some(stored) = stored else {
                        return Ok(Answer::Forgotten(Forgotten::Absent));
                    };
                    let step = stored.forget_step(ms(now), *force);
                    let ForgetStep::Tombstone {
                        token,
                        lease_until,
                        completed,
                    } = step
                    else {
                        return Ok(Answer::Forgotten(step.answer()));
                    };
                    let mut stmt = sql(c.prepare_cached(&self.sql.forget))?;
                    let n = sql(stmt.execute(params![
                        key.scope(),
                        key.id(),
                        stored.token,
                        i64::from(completed),
                        token,
                        lease_until,
                        force
                    ]))?;
                    if n == 1 {
                        return Ok(Answer::Forgotten(step.answer()));
                    }
                }
                Err(Error::Unavailable {
                    backend: "sqlite",
                    source: "the key changed state on every try".into(),
                })
            }
            Op::Purge(limit) => {
                let mut stmt = sql(c.prepare_cached(&self.sql.purge))?;
                let n =
                    sql(stmt.execute(params![ms(now), i64::try_from(*limit).unwrap_or(i64::MAX)]))?;
                Ok(Answer::Count(n as u64))
            }
        }
    }
}

impl Store for SqliteStore {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        self.call(Op::Claim(key.clone(), fp.copied(), *opts), |a| match a {
            Answer::Claim(c) => Some(c),
            _ => None,
        })
        .await
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        self.call(
            Op::Complete(lease.clone(), outcome.clone(), retention),
            |a| match a {
                Answer::Unit => Some(()),
                _ => None,
            },
        )
        .await
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        self.call(Op::Release(lease), |a| match a {
            Answer::Unit => Some(()),
            _ => None,
        })
        .await
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        self.call(Op::Renew(lease.clone(), extend), |a| match a {
            Answer::Lease(l) => Some(l),
            _ => None,
        })
        .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        self.call(Op::Get(key.clone()), |a| match a {
            Answer::Record(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        self.call(Op::Purge(limit), |a| match a {
            Answer::Count(n) => Some(n),
            _ => None,
        })
        .await
    }

    async fn forget(&self, key: &Key, force: bool) -> Result<Forgotten> {
        self.call(Op::Forget(key.clone(), force), |a| match a {
            Answer::Forgotten(f) => Some(f),
            _ => None,
        })
        .await
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        // one job: the whole batch runs in one transaction
        self.call(Op::ClaimMany(claims.to_vec(), *opts), |a| match a {
            Answer::Claims(c) => Some(c),
            _ => None,
        })
        .await
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        self.call(Op::CompleteMany(done.to_vec(), retention), |a| match a {
            Answer::Units(u) => Some(u),
            _ => None,
        })
        .await
    }
}

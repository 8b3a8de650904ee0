//! The effect ledger: one row per event whose `applied` counter and the shared balance are
//! incremented by every application of the effect, deliberately not idempotently, so the
//! ledger tells afterwards how often each event's effect happened.
//!
//! An effect given a derived key ([`Key::derive`]) is recorded under that key first and applied
//! only if the key is new: the external system honours idempotency keys, as a payment API does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemgate::core::Key;
use rusqlite::OptionalExtension;
use sqlx::{MySqlConnection, PgConnection};

use super::Event;
use crate::BoxError;

/// A SQLite connection shared by a process's tasks.
type Lite = Arc<Mutex<rusqlite::Connection>>;

/// Where the effects land.
#[derive(Clone)]
pub(crate) enum Ledger {
    /// The ledger's file, and a file beside it for the poison events' failure counts: a
    /// handler counts its failure while its inbox transaction may hold the ledger file's write
    /// lock.
    Sqlite(Lite, Lite, Tables),
    Postgres(sqlx::PgPool, Tables),
    MySql(sqlx::MySqlPool, Tables),
}

/// The ledger's tables, named after the run and phase.
#[derive(Clone, Debug)]
pub(crate) struct Tables {
    pub(crate) effects: String,
    pub(crate) balance: String,
    pub(crate) keys: String,
    /// How often each poison event's handler has failed so far.
    pub(crate) failures: String,
    /// Per ordering key: the highest sequence applied, and effects applied behind it.
    pub(crate) order: String,
}

impl Tables {
    pub(crate) fn new(prefix: &str) -> Self {
        Tables {
            effects: format!("{prefix}_effects"),
            balance: format!("{prefix}_balance"),
            keys: format!("{prefix}_keys"),
            failures: format!("{prefix}_failures"),
            order: format!("{prefix}_order"),
        }
    }
}

/// What the ledger says of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Events applied at least once.
    pub(crate) touched: u64,
    /// Events never applied.
    pub(crate) lost: u64,
    /// Events applied more than once.
    pub(crate) twice: u64,
    /// Applications in all.
    pub(crate) applications: u64,
    /// The balance equals the sum of amount × applications.
    pub(crate) balance_ok: bool,
    /// Effects applied after a later event of their ordering key.
    pub(crate) out_of_order: u64,
    /// The balance.
    pub(crate) total: i64,
}

/// Is `url` a PostgreSQL URL?
pub(crate) fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The file of a `sqlite:PATH` (or `sqlite://PATH`) URL.
pub(crate) fn sqlite_path(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("sqlite:")?;
    Some(PathBuf::from(path.strip_prefix("//").unwrap_or(path)))
}

/// Opens a SQLite file for the ledger.
fn open_sqlite(path: &Path) -> Result<Lite, BoxError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(60))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(Arc::new(Mutex::new(conn)))
}

/// Is `url` a MySQL or MariaDB URL?
pub(crate) fn is_mysql(url: &str) -> bool {
    url.starts_with("mysql://") || url.starts_with("mariadb://")
}

impl Ledger {
    /// Connects to the ledger at `url` (`sqlite:PATH`, `postgres://…`, `mysql://…`).
    pub(crate) async fn open(url: &str, prefix: &str, pool: u32) -> Result<Self, BoxError> {
        let tables = Tables::new(prefix);
        if let Some(path) = sqlite_path(url) {
            let mut failures = path.clone().into_os_string();
            failures.push("-failures");
            return Ok(Ledger::Sqlite(
                open_sqlite(&path)?,
                open_sqlite(Path::new(&failures))?,
                tables,
            ));
        }
        if is_postgres(url) {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(pool)
                .connect(url)
                .await?;
            return Ok(Ledger::Postgres(pool, tables));
        }
        if is_mysql(url) {
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(pool)
                .connect(&url.replacen("mariadb://", "mysql://", 1))
                .await?;
            return Ok(Ledger::MySql(pool, tables));
        }
        Err(
            format!("unsupported ledger URL {url:?}: use sqlite:PATH, postgres://… or mysql://…")
                .into(),
        )
    }

    fn tables(&self) -> &Tables {
        match self {
            Ledger::Sqlite(_, _, t) | Ledger::Postgres(_, t) | Ledger::MySql(_, t) => t,
        }
    }

    /// Creates the tables and one zero row per event.
    pub(crate) async fn create(&self, events: &[Event]) -> Result<(), BoxError> {
        let t = self.tables().clone();
        let ddl = [
            format!(
                "CREATE TABLE {} (event_id VARCHAR(64) PRIMARY KEY, amount INTEGER NOT NULL, \
                 applied INTEGER NOT NULL DEFAULT 0)",
                t.effects
            ),
            format!(
                "CREATE TABLE {} (id INTEGER PRIMARY KEY, total BIGINT NOT NULL)",
                t.balance
            ),
            format!("INSERT INTO {} (id, total) VALUES (1, 0)", t.balance),
            format!("CREATE TABLE {} (k VARCHAR(255) PRIMARY KEY)", t.keys),
            format!(
                "CREATE TABLE {} (k VARCHAR(64) PRIMARY KEY, last BIGINT NOT NULL, \
                 behind BIGINT NOT NULL)",
                t.order
            ),
            format!(
                "INSERT INTO {} (k, last, behind) VALUES {}",
                t.order,
                (0..super::KEYS)
                    .map(|i| format!("('{}', -1, 0)", super::key_of(i)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ];
        let poison: Vec<&Event> = events.iter().filter(|e| e.fails > 0).collect();
        let failures_table = format!(
            "CREATE TABLE {} (event_id VARCHAR(64) PRIMARY KEY, failed BIGINT NOT NULL)",
            t.failures
        );
        let failures = format!("INSERT INTO {} (event_id, failed) VALUES ", t.failures);
        match self {
            Ledger::Sqlite(conn, failed, _) => {
                let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                let tx = conn.transaction()?;
                for stmt in &ddl {
                    tx.execute(stmt, [])?;
                }
                {
                    let mut insert = tx.prepare(&format!(
                        "INSERT INTO {} (event_id, amount) VALUES (?1, ?2)",
                        t.effects
                    ))?;
                    for e in events {
                        insert.execute(rusqlite::params![e.id, e.amount])?;
                    }
                }
                tx.commit()?;
                let mut failed = failed.lock().unwrap_or_else(|e| e.into_inner());
                let tx = failed.transaction()?;
                tx.execute(&failures_table, [])?;
                {
                    let mut insert = tx.prepare(&format!("{failures}(?1, 0)"))?;
                    for e in &poison {
                        insert.execute([&e.id])?;
                    }
                }
                tx.commit()?;
            }
            Ledger::Postgres(pool, _) => {
                for stmt in ddl.iter().chain([&failures_table]) {
                    sqlx::query(stmt).execute(pool).await?;
                }
                for chunk in events.chunks(1000) {
                    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
                        "INSERT INTO {} (event_id, amount) ",
                        t.effects
                    ));
                    q.push_values(chunk, |mut row, e| {
                        row.push_bind(&e.id).push_bind(e.amount);
                    });
                    q.build().execute(pool).await?;
                }
                for e in &poison {
                    sqlx::query(&format!("{failures}($1, 0)"))
                        .bind(&e.id)
                        .execute(pool)
                        .await?;
                }
            }
            Ledger::MySql(pool, _) => {
                for stmt in ddl.iter().chain([&failures_table]) {
                    sqlx::query(stmt).execute(pool).await?;
                }
                for chunk in events.chunks(1000) {
                    let mut q = sqlx::QueryBuilder::<sqlx::MySql>::new(format!(
                        "INSERT INTO {} (event_id, amount) ",
                        t.effects
                    ));
                    q.push_values(chunk, |mut row, e| {
                        row.push_bind(&e.id).push_bind(e.amount);
                    });
                    q.build().execute(pool).await?;
                }
                for e in &poison {
                    sqlx::query(&format!("{failures}(?, 0)"))
                        .bind(&e.id)
                        .execute(pool)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Whether this run of a poison event's handler is to fail: counts the failure, committed
    /// at once (outside any transaction the handler rolls back), while fewer than `e.fails`
    /// happened.
    pub(crate) async fn planned_failure(&self, e: &Event) -> Result<bool, BoxError> {
        if e.fails == 0 {
            return Ok(false);
        }
        let t = self.tables();
        let fails = i64::from(e.fails);
        let failed = match self {
            Ledger::Sqlite(_, conn, _) => {
                let q = format!(
                    "UPDATE {} SET failed = failed + 1 WHERE event_id = ?1 AND failed < ?2",
                    t.failures
                );
                let conn = Arc::clone(conn);
                let id = e.id.clone();
                tokio::task::spawn_blocking(move || {
                    conn.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .execute(&q, rusqlite::params![id, fails])
                })
                .await??
                    == 1
            }
            Ledger::Postgres(pool, _) => {
                let q = format!(
                    "UPDATE {} SET failed = failed + 1 WHERE event_id = $1 AND failed < $2",
                    t.failures
                );
                let done = sqlx::query(&q)
                    .bind(&e.id)
                    .bind(fails)
                    .execute(pool)
                    .await?;
                done.rows_affected() == 1
            }
            Ledger::MySql(pool, _) => {
                let q = format!(
                    "UPDATE {} SET failed = failed + 1 WHERE event_id = ? AND failed < ?",
                    t.failures
                );
                let done = sqlx::query(&q)
                    .bind(&e.id)
                    .bind(fails)
                    .execute(pool)
                    .await?;
                done.rows_affected() == 1
            }
        };
        Ok(failed)
    }

    /// How often each event's effect was applied.
    pub(crate) async fn applications(&self) -> Result<Vec<(String, i64)>, BoxError> {
        let t = self.tables();
        let cast = match self {
            Ledger::MySql(..) => "SIGNED",
            _ => "BIGINT",
        };
        let q = format!(
            "SELECT event_id, CAST(applied AS {cast}) FROM {}",
            t.effects
        );
        Ok(match self {
            Ledger::Sqlite(conn, _, _) => {
                let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                let mut stmt = conn.prepare(&q)?;
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?
            }
            Ledger::Postgres(pool, _) => sqlx::query_as(&q).fetch_all(pool).await?,
            Ledger::MySql(pool, _) => sqlx::query_as(&q).fetch_all(pool).await?,
        })
    }

    /// Drops the tables.
    pub(crate) async fn drop_tables(&self) -> Result<(), BoxError> {
        let t = self.tables();
        for table in [&t.effects, &t.balance, &t.keys, &t.failures, &t.order] {
            let stmt = format!("DROP TABLE IF EXISTS {table}");
            match self {
                Ledger::Sqlite(conn, failed, _) => {
                    let conn = if *table == t.failures { failed } else { conn };
                    conn.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .execute(&stmt, [])?;
                }
                Ledger::Postgres(pool, _) => {
                    sqlx::query(&stmt).execute(pool).await?;
                }
                Ledger::MySql(pool, _) => {
                    sqlx::query(&stmt).execute(pool).await?;
                }
            }
        }
        Ok(())
    }

    /// Applies `e` in a transaction of its own; with `derived`, only if that key is new.
    /// `false`: the derived key was known, nothing applied.
    pub(crate) async fn apply(&self, e: &Event, derived: Option<&Key>) -> Result<bool, BoxError> {
        match self {
            Ledger::Sqlite(conn, _, t) => {
                let conn = Arc::clone(conn);
                let (t, e, derived) = (t.clone(), e.clone(), derived.map(Key::to_string));
                tokio::task::spawn_blocking(move || -> Result<bool, BoxError> {
                    let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                    let tx =
                        conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let fresh = match &derived {
                        Some(k) => {
                            tx.execute(
                                &format!("INSERT OR IGNORE INTO {} (k) VALUES (?1)", t.keys),
                                [k],
                            )? == 1
                        }
                        None => true,
                    };
                    if fresh {
                        apply_sqlite_on(&tx, &t, &e)?;
                    }
                    tx.commit()?;
                    Ok(fresh)
                })
                .await?
            }
            Ledger::Postgres(pool, t) => {
                let mut tx = pool.begin().await?;
                if let Some(k) = derived {
                    let q = format!(
                        "INSERT INTO {} (k) VALUES ($1) ON CONFLICT DO NOTHING",
                        t.keys
                    );
                    if sqlx::query(&q)
                        .bind(k.to_string())
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 0
                    {
                        return Ok(false);
                    }
                }
                apply_pg(&mut tx, t, e).await?;
                tx.commit().await?;
                Ok(true)
            }
            Ledger::MySql(pool, t) => {
                let mut tx = pool.begin().await?;
                if let Some(k) = derived {
                    let q = format!("INSERT IGNORE INTO {} (k) VALUES (?)", t.keys);
                    if sqlx::query(&q)
                        .bind(k.to_string())
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 0
                    {
                        return Ok(false);
                    }
                }
                apply_mysql(&mut tx, t, e).await?;
                tx.commit().await?;
                Ok(true)
            }
        }
    }

    /// How often `event_id`'s effect has been applied.
    pub(crate) async fn applied(&self, event_id: &str) -> Result<u64, BoxError> {
        let t = self.tables();
        let n: i64 = match self {
            Ledger::Sqlite(conn, _, _) => conn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .query_row(
                    &format!("SELECT applied FROM {} WHERE event_id = ?1", t.effects),
                    [event_id],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0),
            Ledger::Postgres(pool, _) => {
                let q = format!(
                    "SELECT applied::BIGINT FROM {} WHERE event_id = $1",
                    t.effects
                );
                sqlx::query_scalar(&q)
                    .bind(event_id)
                    .fetch_optional(pool)
                    .await?
                    .unwrap_or(0)
            }
            Ledger::MySql(pool, _) => {
                let q = format!(
                    "SELECT CAST(applied AS SIGNED) FROM {} WHERE event_id = ?",
                    t.effects
                );
                sqlx::query_scalar(&q)
                    .bind(event_id)
                    .fetch_optional(pool)
                    .await?
                    .unwrap_or(0)
            }
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Up to 10 events never applied, to look for in the logs.
    pub(crate) async fn lost_ids(&self) -> Result<Vec<String>, BoxError> {
        let q = format!(
            "SELECT event_id FROM {} WHERE applied = 0 ORDER BY event_id LIMIT 10",
            self.tables().effects
        );
        Ok(match self {
            Ledger::Sqlite(conn, _, _) => {
                let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                let mut stmt = conn.prepare(&q)?;
                stmt.query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?
            }
            Ledger::Postgres(pool, _) => sqlx::query_scalar(&q).fetch_all(pool).await?,
            Ledger::MySql(pool, _) => sqlx::query_scalar(&q).fetch_all(pool).await?,
        })
    }

    /// Counts every event's applications.
    pub(crate) async fn tally(&self) -> Result<Tally, BoxError> {
        let t = self.tables();
        let cast = match self {
            Ledger::MySql(..) => "SIGNED",
            _ => "BIGINT",
        };
        let q = format!(
            "SELECT CAST(COALESCE(SUM(CASE WHEN applied > 0 THEN 1 ELSE 0 END), 0) AS {cast}),
                    CAST(COALESCE(SUM(CASE WHEN applied = 0 THEN 1 ELSE 0 END), 0) AS {cast}),
                    CAST(COALESCE(SUM(CASE WHEN applied > 1 THEN 1 ELSE 0 END), 0) AS {cast}),
                    CAST(COALESCE(SUM(applied), 0) AS {cast}),
                    CAST(COALESCE(SUM(amount * applied), 0) AS {cast}),
                    (SELECT CAST(total AS {cast}) FROM {} WHERE id = 1),
                    (SELECT CAST(COALESCE(SUM(behind), 0) AS {cast}) FROM {})
               FROM {}",
            t.balance, t.order, t.effects
        );
        let row: (i64, i64, i64, i64, i64, i64, i64) = match self {
            Ledger::Sqlite(conn, _, _) => conn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .query_row(&q, [], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })?,
            Ledger::Postgres(pool, _) => sqlx::query_as(&q).fetch_one(pool).await?,
            Ledger::MySql(pool, _) => sqlx::query_as(&q).fetch_one(pool).await?,
        };
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(Tally {
            touched: n(row.0),
            lost: n(row.1),
            twice: n(row.2),
            applications: n(row.3),
            balance_ok: row.4 == row.5,
            out_of_order: n(row.6),
            total: row.5,
        })
    }
}

/// The effect inside the caller's transaction (Inbox mode: the inbox's own); `$p` is the
/// database's placeholder.
macro_rules! apply_in_tx {
    ($name:ident, $conn:ty, $p:literal, $order:expr, $db:literal) => {
        #[doc = concat!("The effect inside a ", $db, " transaction (Inbox mode: the inbox's own).")]
        pub(crate) async fn $name(conn: &mut $conn, t: &Tables, e: &Event) -> sqlx::Result<()> {
            let applied = format!(
                "UPDATE {} SET applied = applied + 1 WHERE event_id = {}",
                t.effects, $p
            );
            sqlx::query(&applied)
                .bind(&e.id)
                .execute(&mut *conn)
                .await?;
            let total = format!(
                "UPDATE {} SET total = total + {} WHERE id = 1",
                t.balance, $p
            );
            sqlx::query(&total)
                .bind(e.amount)
                .execute(&mut *conn)
                .await?;
            // `behind` first: MySQL assigns left to right, with the new values
            let [p1, p2, p3] = $order;
            let order = format!(
                "UPDATE {} SET behind = behind + CASE WHEN last > {p1} THEN 1 ELSE 0 END, \
                 last = GREATEST(last, {p2}) WHERE k = {p3}",
                t.order
            );
            sqlx::query(&order)
                .bind(i64::from(e.seq))
                .bind(i64::from(e.seq))
                .bind(&e.key)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }
    };
}

apply_in_tx!(
    apply_pg,
    PgConnection,
    "$1",
    ["$1", "$2", "$3"],
    "PostgreSQL"
);
apply_in_tx!(apply_mysql, MySqlConnection, "?", ["?", "?", "?"], "MySQL");

/// The effect inside a SQLite inbox transaction.
#[allow(clippy::unused_async)]
pub(crate) async fn apply_sqlite(
    tx: &mut idemgate::sqlite::SqliteTx,
    t: &Tables,
    e: &Event,
) -> rusqlite::Result<()> {
    apply_sqlite_on(tx, t, e)
}

/// The effect on a SQLite connection inside a transaction.
fn apply_sqlite_on(conn: &rusqlite::Connection, t: &Tables, e: &Event) -> rusqlite::Result<()> {
    conn.execute(
        &format!(
            "UPDATE {} SET applied = applied + 1 WHERE event_id = ?1",
            t.effects
        ),
        [&e.id],
    )?;
    conn.execute(
        &format!("UPDATE {} SET total = total + ?1 WHERE id = 1", t.balance),
        [e.amount],
    )?;
    conn.execute(
        &format!(
            "UPDATE {} SET behind = behind + (last > ?1), last = MAX(last, ?1) WHERE k = ?2",
            t.order
        ),
        rusqlite::params![e.seq, e.key],
    )?;
    Ok(())
}

//! A rusqlite connection as `idemgate-sql`'s connection, so SQLite runs the SQL the backends
//! share (migrations, offsets, the event log).

use std::future::Future;

use idemgate_core::Result;
use idemgate_sql::{Arg, Dialect, Kind, SqlConn, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql};

use crate::error::sql;

/// A borrowed SQLite connection for the SQL the backends share (its futures never wait:
/// SQLite runs in the caller's thread). Its transactions are `BEGIN IMMEDIATE`, or savepoints
/// inside an open one.
#[derive(Debug)]
pub struct Lite<'a> {
    conn: &'a Connection,
    // for each open level: whether it is a savepoint
    levels: Vec<bool>,
}

impl<'a> Lite<'a> {
    /// Wraps `conn`.
    pub fn new(conn: &'a Connection) -> Self {
        Lite {
            conn,
            levels: Vec::new(),
        }
    }
}

/// Runs `f` on a fresh connection to the database file at `path`, for an operator's reads
/// (`idemgate explain --inbox`).
pub fn with_connection<T>(
    path: impl AsRef<std::path::Path>,
    f: impl FnOnce(&mut Lite<'_>) -> Result<T>,
) -> Result<T> {
    let conn = sql(Connection::open(path))?;
    f(&mut Lite::new(&conn))
}

/// Runs a future of the shared SQL code on a [`Lite`] connection to its end (it never waits),
/// for callers without an async runtime:
/// `ready(log.append(&mut Lite::new(&conn), "stream", "evt-1", b".."))`.
pub fn ready<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => {
            unreachable!("SQLite statements complete in the calling thread")
        }
    }
}

struct Param<'a>(Arg<'a>);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Arg::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Arg::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(i)),
            Arg::Int32(i) => ToSqlOutput::Borrowed(ValueRef::Integer(i.into())),
            Arg::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Arg::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            _ => ToSqlOutput::Borrowed(ValueRef::Null),
        })
    }
}

// a borrowed rusqlite connection is not `Send`; its futures run to their end in the calling
// thread (`ready`), never on another
#[allow(clippy::future_not_send)]
impl SqlConn for Lite<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn execute(&mut self, statement: &str, args: &[Arg<'_>]) -> Result<u64> {
        let params: Vec<Param<'_>> = args.iter().map(|a| Param(*a)).collect();
        let mut stmt = sql(self.conn.prepare_cached(statement))?;
        let n = sql(stmt.execute(rusqlite::params_from_iter(params.iter())))?;
        Ok(n as u64)
    }

    async fn fetch(
        &mut self,
        statement: &str,
        args: &[Arg<'_>],
        kinds: &[Kind],
    ) -> Result<Vec<Vec<Value>>> {
        let params: Vec<Param<'_>> = args.iter().map(|a| Param(*a)).collect();
        let mut stmt = sql(self.conn.prepare_cached(statement))?;
        let rows = sql(
            stmt.query_map(rusqlite::params_from_iter(params.iter()), |row| {
                kinds
                    .iter()
                    .enumerate()
                    .map(|(i, kind)| {
                        Ok(match (kind, row.get_ref(i)?) {
                            (_, ValueRef::Null) => Value::Null,
                            (Kind::Int | Kind::Int32, v) => Value::Int(v.as_i64()?),
                            (Kind::Text, v) => Value::Text(v.as_str()?.to_owned()),
                            (Kind::Blob, v) => Value::Blob(v.as_blob()?.to_vec()),
                            (_, v) => Value::Blob(v.as_bytes()?.to_vec()),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<Value>>>()
            }),
        )?;
        sql(rows.collect())
    }

    async fn batch(&mut self, statements: &str) -> Result<()> {
        sql(self.conn.execute_batch(statements))
    }

    async fn begin(&mut self) -> Result<()> {
        let savepoint = !self.conn.is_autocommit();
        sql(self.conn.execute_batch(if savepoint {
            "SAVEPOINT idemgate"
        } else {
            "BEGIN IMMEDIATE"
        }))?;
        self.levels.push(savepoint);
        Ok(())
    }

    async fn commit(&mut self) -> Result<()> {
        match self.levels.pop() {
            Some(true) => sql(self.conn.execute_batch("RELEASE idemgate")),
            _ => sql(self.conn.execute_batch("COMMIT")),
        }
    }

    async fn rollback(&mut self) -> Result<()> {
        match self.levels.pop() {
            Some(true) => sql(self
                .conn
                .execute_batch("ROLLBACK TO idemgate; RELEASE idemgate")),
            _ => sql(self.conn.execute_batch("ROLLBACK")),
        }
    }
}

/// Checks that `name` is a plain identifier, so it can be spliced into SQL.
pub(crate) fn check_table(name: &str) -> Result<()> {
    Dialect::Sqlite.check_table(name)
}

/// Brings `component` (a table) to version `steps.len()` on `conn` (the shared migration
/// algorithm; see `idemgate_sql::migrate`).
pub(crate) fn migrate(
    conn: &Connection,
    component: &str,
    steps: &[String],
    columns: &[&str],
) -> Result<()> {
    ready(idemgate_sql::migrate(
        &mut Lite::new(conn),
        component,
        steps,
        columns,
    ))
}

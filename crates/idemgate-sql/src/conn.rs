//! The few operations the shared SQL code needs from a connection, whatever its driver.

use std::future::Future;

use idemgate_core::Result;

use crate::Dialect;

/// A statement parameter.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Arg<'a> {
    /// Text.
    Text(&'a str),
    /// A 64-bit integer.
    Int(i64),
    /// A 32-bit integer.
    Int32(i32),
    /// Bytes.
    Blob(&'a [u8]),
    /// SQL `NULL` (in a text column).
    Null,
}

/// The type a result column is read as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// A 64-bit integer.
    Int,
    /// A 32-bit integer.
    Int32,
    /// Text (MySQL byte strings are read as UTF-8).
    Text,
    /// Bytes.
    Blob,
}

/// A value read from a result column.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Value {
    /// SQL `NULL`.
    Null,
    /// An integer (32-bit columns too).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Value {
    /// The integer, or `None`.
    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The text, or `None`.
    pub fn into_text(self) -> Option<String> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The bytes, or `None`.
    pub fn into_blob(self) -> Option<Vec<u8>> {
        match self {
            Value::Blob(b) => Some(b),
            _ => None,
        }
    }
}

/// A connection the shared SQL code runs statements on: PostgreSQL and MySQL through sqlx (with
/// this crate's `postgres` and `mysql` features), SQLite through `idemgate-sqlite`'s adapter.
/// Statements are written with `?` placeholders and spelled for the connection's
/// [`Dialect`] by [`Dialect::sql`].
pub trait SqlConn {
    /// The connection's dialect.
    fn dialect(&self) -> Dialect;

    /// Runs one statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> impl Future<Output = Result<u64>>;

    /// Runs one query, reading each row's columns as `kinds`.
    fn fetch(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
        kinds: &[Kind],
    ) -> impl Future<Output = Result<Vec<Vec<Value>>>>;

    /// Runs statements separated by `;` (DDL), without parameters.
    fn batch(&mut self, sql: &str) -> impl Future<Output = Result<()>>;

    /// Opens a transaction, or a savepoint inside the open one.
    fn begin(&mut self) -> impl Future<Output = Result<()>>;

    /// Commits the innermost transaction (releases its savepoint).
    fn commit(&mut self) -> impl Future<Output = Result<()>>;

    /// Rolls the innermost transaction back (to its savepoint).
    fn rollback(&mut self) -> impl Future<Output = Result<()>>;
}

/// Runs `f` in a transaction on `conn` (a savepoint inside an open one): committed if it
/// returns `Ok`, rolled back if it returns an error.
pub async fn in_transaction<C: SqlConn, T>(
    conn: &mut C,
    f: impl AsyncFnOnce(&mut C) -> Result<T>,
) -> Result<T> {
    conn.begin().await?;
    match f(conn).await {
        Ok(t) => {
            conn.commit().await?;
            Ok(t)
        }
        Err(e) => {
            let _ = conn.rollback().await;
            Err(e)
        }
    }
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
mod sqlx_conn {
    use idemgate_core::{Error, Result};
    use sqlx::Row;

    use sqlx::TransactionManager;

    use super::{Arg, Kind, SqlConn, Value};
    use crate::{Dialect, classify_for};

    macro_rules! sqlx_conn {
        ($conn:ty, $db:ty, $dialect:expr) => {
            // a scope of its own, so each database has its own `bind`
            const _: () = {
                /// `q` with `args` bound in order.
                fn bind<'q>(
                    mut q: sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
                    args: &[Arg<'q>],
                ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
                    for a in args {
                        q = match *a {
                            Arg::Text(s) => q.bind(s),
                            Arg::Int(i) => q.bind(i),
                            Arg::Int32(i) => q.bind(i),
                            Arg::Blob(b) => q.bind(b),
                            Arg::Null => q.bind(None::<&str>),
                        };
                    }
                    q
                }

                impl SqlConn for $conn {
                    fn dialect(&self) -> Dialect {
                        $dialect
                    }

                    async fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64> {
                        let done = bind(sqlx::query::<$db>(sql), args)
                            .execute(&mut *self)
                            .await
                            .map_err(classify_for($dialect))?;
                        Ok(done.rows_affected())
                    }

                    async fn fetch(
                        &mut self,
                        sql: &str,
                        args: &[Arg<'_>],
                        kinds: &[Kind],
                    ) -> Result<Vec<Vec<Value>>> {
                        let rows = bind(sqlx::query::<$db>(sql), args)
                            .fetch_all(&mut *self)
                            .await
                            .map_err(classify_for($dialect))?;
                        rows.iter()
                            .map(|row| {
                                kinds
                                    .iter()
                                    .enumerate()
                                    .map(|(i, kind)| {
                                        let v = match kind {
                                            Kind::Int => row
                                                .try_get::<Option<i64>, _>(i)
                                                .map(|v| v.map_or(Value::Null, Value::Int)),
                                            Kind::Int32 => {
                                                row.try_get::<Option<i32>, _>(i).map(|v| {
                                                    v.map_or(Value::Null, |v| Value::Int(v.into()))
                                                })
                                            }
                                            Kind::Text => row
                                                .try_get::<Option<Vec<u8>>, _>(i)
                                                .map(|v| {
                                                    v.map_or(Value::Null, |b| {
                                                        Value::Text(
                                                            String::from_utf8_lossy(&b)
                                                                .into_owned(),
                                                        )
                                                    })
                                                })
                                                .or_else(|_| {
                                                    row.try_get::<Option<String>, _>(i)
                                                        .map(|v| v.map_or(Value::Null, Value::Text))
                                                }),
                                            Kind::Blob => row
                                                .try_get::<Option<Vec<u8>>, _>(i)
                                                .map(|v| v.map_or(Value::Null, Value::Blob)),
                                        };
                                        v.map_err(|e| Error::Corrupt {
                                            backend: $dialect.backend(),
                                            reason: e.to_string(),
                                        })
                                    })
                                    .collect()
                            })
                            .collect()
                    }

                    async fn batch(&mut self, sql: &str) -> Result<()> {
                        // through the executor's boxed future, which is `Send` for every lifetime
                        let conn: &mut $conn = self;
                        sqlx::Executor::execute(conn, sqlx::raw_sql(sql))
                            .await
                            .map_err(classify_for($dialect))?;
                        Ok(())
                    }

                    async fn begin(&mut self) -> Result<()> {
                        <$db as sqlx::Database>::TransactionManager::begin(self, None)
                            .await
                            .map_err(classify_for($dialect))
                    }

                    async fn commit(&mut self) -> Result<()> {
                        <$db as sqlx::Database>::TransactionManager::commit(self)
                            .await
                            .map_err(classify_for($dialect))
                    }

                    async fn rollback(&mut self) -> Result<()> {
                        <$db as sqlx::Database>::TransactionManager::rollback(self)
                            .await
                            .map_err(classify_for($dialect))
                    }
                }
            };
        };
    }

    #[cfg(feature = "postgres")]
    sqlx_conn!(sqlx::PgConnection, sqlx::Postgres, Dialect::Postgres);
    #[cfg(feature = "mysql")]
    sqlx_conn!(sqlx::MySqlConnection, sqlx::MySql, Dialect::MySql);
}

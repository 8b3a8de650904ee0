//! What an operator reads back: one key's inbox row.

use idemgate_core::{Key, Result};

use crate::{Arg, Dialect, Kind, SqlConn, Table};

/// One key's row in an inbox table: when its message was applied and until when the key is
/// kept (milliseconds since the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxRow {
    /// When the transaction that applied the message recorded the key.
    pub processed_at: i64,
    /// When the key stops counting as seen (and may be purged).
    pub expires_at: i64,
}

/// `key`'s row in the inbox table `table`, if any.
pub async fn inbox_row<C: SqlConn>(
    conn: &mut C,
    table: &str,
    key: &Key,
) -> Result<Option<InboxRow>> {
    let d = conn.dialect();
    let t = Table::new(d, table);
    let rows = conn
        .fetch(
            &d.sql(&format!(
                "SELECT processed_at, expires_at FROM {} WHERE scope = ? AND id = ?",
                t.name()?
            )),
            &[Arg::Text(key.scope()), Arg::Text(key.id())],
            &[Kind::Int, Kind::Int],
        )
        .await?;
    rows.into_iter()
        .next()
        .map(|r| match (r[0].int(), r[1].int()) {
            (Some(processed_at), Some(expires_at)) => Ok(InboxRow {
                processed_at,
                expires_at,
            }),
            _ => Err(idemgate_core::Error::Corrupt {
                backend: backend(d),
                reason: format!("the inbox row of {key} has a NULL time"),
            }),
        })
        .transpose()
}

fn backend(d: Dialect) -> &'static str {
    match d {
        Dialect::Postgres => "postgres",
        Dialect::MySql => "mysql",
        Dialect::Sqlite => "sqlite",
    }
}

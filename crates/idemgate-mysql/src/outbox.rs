//! The transactional outbox on MySQL and MariaDB.

use std::time::Duration;

use idemgate_core::{Outgoing, Result};
use idemgate_sql::OutboxTable;
use sqlx::MySqlPool;

use crate::MySqlTx;
use crate::error::my;

/// The transactional outbox on MySQL and MariaDB: [`enqueue`](idemgate_core::Outbox::enqueue)
/// writes the message in the caller's [`MySqlTx`] (the transaction a
/// [`MySqlInbox`](crate::MySqlInbox) opens), and a relay (`idemgate_consumer::Relay`) publishes
/// it after the commit. A relay waiting for rows polls (`Relay::with_poll`).
#[derive(Debug, Clone)]
pub struct MySqlOutbox {
    pool: MySqlPool,
    table: OutboxTable,
}

impl MySqlOutbox {
    /// An outbox on `pool` in table `idemgate_outbox`. Call [`migrate`](Self::migrate) once
    /// first.
    pub fn new(pool: MySqlPool) -> Self {
        MySqlOutbox {
            pool,
            table: OutboxTable::new(),
        }
    }

    /// Another table: a lowercase identifier, or every call fails with `Error::Config`.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = self.table.with_table(table);
        self
    }

    /// The rows' statements, for inspection and tests.
    pub fn table(&self) -> &OutboxTable {
        &self.table
    }

    /// The pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Creates the tables if missing.
    pub async fn migrate(&self) -> Result<()> {
        let mut conn = my(self.pool.acquire().await)?;
        self.table.migrate(&mut *conn).await
    }

    async fn enqueue_in(&self, tx: &mut MySqlTx, msg: &Outgoing) -> Result<()> {
        self.table.enqueue(&mut **tx, msg).await
    }

    async fn wait_for(&self, timeout: Duration) -> bool {
        tokio::time::sleep(timeout).await;
        false
    }
}

idemgate_sql::sqlx_outbox!(MySqlOutbox, MySqlTx, crate::classify_error);

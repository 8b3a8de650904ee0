//! The conformance suite against the local MariaDB, one table per test.

use std::sync::atomic::{AtomicU32, Ordering};

use idemgate_mysql::MySqlStore;
use idemgate_testkit::conformance::Ctx;
use idemgate_testkit::service;

static N: AtomicU32 = AtomicU32::new(0);

async fn store() -> Option<MySqlStore> {
    let url = service::url("IDEMGATE_MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
    let table = format!(
        "idemgate_t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let store = MySqlStore::builder()
        .with_url(url)
        .with_table(table)
        .build()
        .unwrap();
    service::connect("MariaDB", async { store.migrate().await.map(|()| store) }).await
}

idemgate_testkit::conformance_tests!(async { store().await.map(Ctx::real_time) });

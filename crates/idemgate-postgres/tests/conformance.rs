//! The conformance suite against the local PostgreSQL, one table per test.

use std::sync::atomic::{AtomicU32, Ordering};

use idemgate_postgres::PostgresStore;
use idemgate_testkit::conformance::Ctx;
use idemgate_testkit::service;

static N: AtomicU32 = AtomicU32::new(0);

async fn store() -> Option<PostgresStore> {
    let url = service::url(
        "IDEMGATE_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let table = format!(
        "idemgate_t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let store = PostgresStore::builder()
        .with_url(url)
        .with_table(table)
        .build()
        .unwrap();
    service::connect("PostgreSQL", async {
        store.migrate().await.map(|()| store)
    })
    .await
}

idemgate_testkit::conformance_tests!(async { store().await.map(Ctx::real_time) });

/// The suite through `CachedStore`: the cache answers replays and nothing else.
mod cached {
    use super::*;
    use idemgate_core::CachedStore;

    idemgate_testkit::conformance_tests!(async {
        store().await.map(|s| Ctx::real_time(CachedStore::new(s)))
    });
}

/// The same suite on a partitioned table: keys spread over two bucket partitions and the
/// default partition.
mod partitioned {
    use super::*;
    use idemgate_core::Key;
    use idemgate_postgres::Partitions;

    fn bucket(key: &Key) -> idemgate_core::Result<i64> {
        Ok(i64::from(
            key.id().bytes().fold(0u8, |a, b| a.wrapping_add(b)) % 3,
        ))
    }

    async fn store() -> Option<PostgresStore> {
        let url = service::url(
            "IDEMGATE_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        );
        let table = format!(
            "idemgate_p{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let store = PostgresStore::builder()
            .with_url(url)
            .with_table(table)
            .with_partitions(Partitions::by(bucket))
            .build()
            .unwrap();
        service::connect("PostgreSQL", async {
            store.migrate().await?;
            store.create_partitions(0, 2).await.map(|()| store)
        })
        .await
    }

    idemgate_testkit::conformance_tests!(async { store().await.map(Ctx::real_time) });
}

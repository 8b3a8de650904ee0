//! The conformance suite against the local Redis and the local 3-master Redis Cluster, one key
//! prefix per test.

use std::sync::atomic::{AtomicU32, Ordering};

use idemgate_redis::RedisStore;
use idemgate_testkit::conformance::Ctx;
use idemgate_testkit::service;

static N: AtomicU32 = AtomicU32::new(0);

fn prefix() -> String {
    format!(
        "idemgate-test:{}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

mod standalone {
    use super::*;

    idemgate_testkit::conformance_tests!(async {
        standalone_store()
            .await
            .map(|s| Ctx::real_time(s).self_expiring())
    });
}

mod cluster {
    use super::*;

    async fn store() -> Option<RedisStore> {
        let nodes = service::url(
            "IDEMGATE_REDIS_CLUSTER_URLS",
            "redis://127.0.0.1:7001,redis://127.0.0.1:7002,redis://127.0.0.1:7003",
        );
        let nodes: Vec<String> = nodes.split(',').map(str::to_owned).collect();
        service::connect(
            "Redis Cluster",
            RedisStore::builder()
                .with_cluster_nodes(nodes)
                .with_key_prefix(prefix())
                .build(),
        )
        .await
    }

    idemgate_testkit::conformance_tests!(async {
        store().await.map(|s| Ctx::real_time(s).self_expiring())
    });
}

/// The suite through `CachedStore`: the cache answers replays and nothing else.
mod cached {
    use super::*;
    use idemgate_core::CachedStore;

    idemgate_testkit::conformance_tests!(async {
        standalone_store()
            .await
            .map(|s| Ctx::real_time(CachedStore::new(s)).self_expiring())
    });
}

async fn standalone_store() -> Option<RedisStore> {
    let url = service::url("IDEMGATE_REDIS_URL", "redis://127.0.0.1:6379");
    service::connect(
        "Redis",
        RedisStore::builder()
            .with_url(url)
            .with_key_prefix(prefix())
            .build(),
    )
    .await
}

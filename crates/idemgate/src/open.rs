//! Opening a store from a URL.

use idemgate_core::{BoxStore, Error, MemoryStore, StoreExt};

/// Opens the store a URL names, migrated and ready, as a [`BoxStore`]:
///
/// | URL | store | feature |
/// |---|---|---|
/// | `memory:` | [`MemoryStore`] (this process only) | - |
/// | `sqlite:PATH` or `sqlite://PATH` | `SqliteStore` on the file at `PATH` | `sqlite` |
/// | `postgres://…`, `postgresql://…` | `PostgresStore` | `postgres` |
/// | `mysql://…`, `mariadb://…` | `MySqlStore` | `mysql` |
/// | `redis://…`, `rediss://…` | `RedisStore` | `redis` |
/// | `redis+cluster://host:port,host:port,…` | `RedisStore` on a Redis Cluster | `redis` |
///
/// A URL of a scheme whose feature is off, or of no known scheme, is [`Error::Config`], and so
/// is a URL that lacks what its scheme needs (a path, a node).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use idemgate::{Gate, Key, Run};
///
/// let dir = tempfile::tempdir()?;
/// let url = format!("sqlite:{}", dir.path().join("dedup.db").display());
/// let gate = Gate::new(idemgate::open(&url).await?);
/// let key = Key::new("orders", "o-1")?;
/// let run = gate.run(&key, None, |_| async { Ok::<_, String>(7) }).await.unwrap();
/// assert_eq!(run, Run::Fresh(7));
/// assert!(matches!(idemgate::open("ftp://x").await, Err(idemgate::Error::Config { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub async fn open(url: &str) -> Result<BoxStore, Error> {
    if url == "memory:" {
        return Ok(MemoryStore::new().boxed());
    }
    if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(config("sqlite: needs a path, as in sqlite:./dedup.db"));
        }
        return sqlite(path);
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return postgres(url).await;
    }
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        return mysql(&url.replacen("mariadb://", "mysql://", 1)).await;
    }
    if let Some(nodes) = url.strip_prefix("redis+cluster://") {
        let nodes: Vec<String> = nodes
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|n| format!("redis://{n}"))
            .collect();
        if nodes.is_empty() {
            return Err(config("redis+cluster:// needs host:port,host:port,…"));
        }
        return redis_cluster(nodes).await;
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return redis(url).await;
    }
    Err(config(&format!(
        "unsupported store URL {url:?}: use memory:, sqlite:PATH, postgres://…, mysql://…, \
         redis://… or redis+cluster://host:port,…"
    )))
}

fn config(message: &str) -> Error {
    Error::Config {
        message: message.to_owned(),
    }
}

#[cfg(not(all(
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql",
    feature = "redis"
)))]
fn needs(feature: &str) -> Error {
    config(&format!(
        "this store URL needs idemgate's `{feature}` feature, which this build does not have"
    ))
}

#[cfg(feature = "sqlite")]
fn sqlite(path: &str) -> Result<BoxStore, Error> {
    Ok(idemgate_sqlite::SqliteStore::open(path)?.boxed())
}

#[cfg(not(feature = "sqlite"))]
fn sqlite(_: &str) -> Result<BoxStore, Error> {
    Err(needs("sqlite"))
}

#[cfg(feature = "postgres")]
async fn postgres(url: &str) -> Result<BoxStore, Error> {
    let store = idemgate_postgres::PostgresStore::builder()
        .with_url(url)
        .build()?;
    store.migrate().await?;
    Ok(store.boxed())
}

#[cfg(not(feature = "postgres"))]
async fn postgres(_: &str) -> Result<BoxStore, Error> {
    Err(needs("postgres"))
}

#[cfg(feature = "mysql")]
async fn mysql(url: &str) -> Result<BoxStore, Error> {
    let store = idemgate_mysql::MySqlStore::builder()
        .with_url(url)
        .build()?;
    store.migrate().await?;
    Ok(store.boxed())
}

#[cfg(not(feature = "mysql"))]
async fn mysql(_: &str) -> Result<BoxStore, Error> {
    Err(needs("mysql"))
}

#[cfg(feature = "redis")]
async fn redis(url: &str) -> Result<BoxStore, Error> {
    Ok(idemgate_redis::RedisStore::builder()
        .with_url(url)
        .build()
        .await?
        .boxed())
}

#[cfg(feature = "redis")]
async fn redis_cluster(nodes: Vec<String>) -> Result<BoxStore, Error> {
    Ok(idemgate_redis::RedisStore::builder()
        .with_cluster_nodes(nodes)
        .build()
        .await?
        .boxed())
}

#[cfg(not(feature = "redis"))]
async fn redis(_: &str) -> Result<BoxStore, Error> {
    Err(needs("redis"))
}

#[cfg(not(feature = "redis"))]
async fn redis_cluster(_: Vec<String>) -> Result<BoxStore, Error> {
    Err(needs("redis"))
}

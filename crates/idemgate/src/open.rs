//! Opening a store from a URL.

use idemgate_core::{BoxStore, Error, MemoryStore, StoreExt, Warning};

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
/// | `dynamodb://TABLE?region=…&endpoint=…` | `DynamoStore` (see `DynamoStore::from_url`) | `dynamodb` |
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
    Ok(open_checked(url).await?.0)
}

/// [`open`], and what it found wrong with the store's settings (also logged at `warn`): a
/// Redis server that keeps no append-only file or evicts keys. A program without a `tracing`
/// subscriber prints them.
///
/// ```no_run
/// # async fn run() -> Result<(), idemgate::Error> {
/// let (store, warnings) = idemgate::open_checked("redis://127.0.0.1:6379").await?;
/// for w in &warnings {
///     eprintln!("warning: {w}");
/// }
/// # Ok(()) }
/// ```
pub async fn open_checked(url: &str) -> Result<(BoxStore, Vec<Warning>), Error> {
    let unchecked = |store: BoxStore| (store, Vec::new());
    if url == "memory:" {
        return Ok(unchecked(MemoryStore::new().boxed()));
    }
    if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(config("sqlite: needs a path, as in sqlite:./dedup.db"));
        }
        return sqlite(path).map(unchecked);
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return postgres(url).await.map(unchecked);
    }
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        return mysql(&url.replacen("mariadb://", "mysql://", 1))
            .await
            .map(unchecked);
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
    if url.starts_with("dynamodb://") {
        return dynamodb(url).await.map(unchecked);
    }
    Err(config(&format!(
        "unsupported store URL {url:?}: use memory:, sqlite:PATH, postgres://…, mysql://…, \
         redis://…, redis+cluster://host:port,… or dynamodb://TABLE"
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
    feature = "redis",
    feature = "dynamodb"
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
async fn redis(url: &str) -> Result<(BoxStore, Vec<Warning>), Error> {
    let store = idemgate_redis::RedisStore::builder()
        .with_url(url)
        .build()
        .await?;
    let warnings = store.warnings().to_vec();
    Ok((store.boxed(), warnings))
}

#[cfg(feature = "redis")]
async fn redis_cluster(nodes: Vec<String>) -> Result<(BoxStore, Vec<Warning>), Error> {
    let store = idemgate_redis::RedisStore::builder()
        .with_cluster_nodes(nodes)
        .build()
        .await?;
    let warnings = store.warnings().to_vec();
    Ok((store.boxed(), warnings))
}

#[cfg(feature = "dynamodb")]
async fn dynamodb(url: &str) -> Result<BoxStore, Error> {
    let store = idemgate_dynamodb::DynamoStore::from_url(url)?;
    store.migrate().await?;
    Ok(store.boxed())
}

#[cfg(not(feature = "dynamodb"))]
async fn dynamodb(_: &str) -> Result<BoxStore, Error> {
    Err(needs("dynamodb"))
}

#[cfg(not(feature = "redis"))]
async fn redis(_: &str) -> Result<(BoxStore, Vec<Warning>), Error> {
    Err(needs("redis"))
}

#[cfg(not(feature = "redis"))]
async fn redis_cluster(_: Vec<String>) -> Result<(BoxStore, Vec<Warning>), Error> {
    Err(needs("redis"))
}

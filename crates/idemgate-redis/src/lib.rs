//! Redis backend for idemgate: [`RedisStore`], on standalone Redis and on Redis Cluster.
//!
//! Every operation is one Lua script (`EVALSHA`, falling back to `EVAL` on `NOSCRIPT`), atomic
//! on the server and timed by the server's `TIME`. A record is one hash, so it lives in one slot
//! and the store works unchanged on a cluster; its key expires at the record's `expires_at`,
//! so Redis reclaims the memory by itself.
//!
//! **Durability**: a Redis that keeps nothing on disk forgets every key on restart and lets
//! duplicates through. [`RedisStore::check_durability`] tells, and
//! [`RedisStoreBuilder::build`] warns (`tracing`) when it finds no persistence.
//!
//! ```no_run
//! # async fn example() -> Result<(), idemgate_core::Error> {
//! use idemgate_core::Gate;
//! use idemgate_redis::RedisStore;
//!
//! let store = RedisStore::builder().with_url("redis://127.0.0.1:6379").with_key_prefix("orders:").build().await?;
//! let gate = Gate::new(store);
//! # Ok(()) }
//! ```

mod scripts;
mod store;

pub use store::{Durability, RedisStore, RedisStoreBuilder};

//! `RedisStore`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use idemgate_core::backend::{RecordRow, duration_millis, time_from_ms};
use idemgate_core::{
    Claim, ClaimOptions, Error, Fingerprint, Forgotten, Key, Lease, Outcome, Record, Result, Store,
    Warning,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, RedisError, Script, ScriptInvocation, Value};

use crate::scripts;

fn classify(e: RedisError) -> Error {
    let retryable = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
                    | redis::ServerErrorKind::BusyLoading
            )
        );
    if retryable {
        Error::Unavailable {
            backend: "redis",
            source: Box::new(e),
        }
    } else if matches!(e.kind(), redis::ErrorKind::InvalidClientConfig) {
        Error::Config {
            message: e.to_string(),
        }
    } else {
        Error::Backend {
            backend: "redis",
            source: Box::new(e),
        }
    }
}

fn corrupt(reason: impl Into<String>) -> Error {
    Error::Corrupt {
        backend: "redis",
        reason: reason.into(),
    }
}

/// What a Redis server keeps on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// The append-only file is on: completed keys survive a restart (up to `appendfsync`).
    AppendOnly,
    /// Only RDB snapshots: a restart forgets the keys written since the last snapshot.
    Snapshots,
    /// Nothing: a restart forgets every key and lets duplicates through.
    None,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Builds a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    urls: Vec<String>,
    cluster: bool,
    prefix: String,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl RedisStoreBuilder {
    /// How long one connection attempt may take (default 2 s); an unreachable server is
    /// `Error::Unavailable` after a few attempts.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a command may wait for its answer (default 5 s).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// A standalone server (`redis://host:port/db`).
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.urls = vec![url.into()];
        self.cluster = false;
        self
    }

    /// A Redis Cluster, from one or more of its nodes (`redis://host:port`).
    pub fn with_cluster_nodes<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.urls = nodes.into_iter().map(Into::into).collect();
        self.cluster = true;
        self
    }

    /// A prefix for every key (default `idemgate:`), to share a server between stores.
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Connects, and warns when the server keeps nothing on disk.
    pub async fn build(self) -> Result<RedisStore> {
        let conn = if self.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(self.urls.clone())
                .connection_timeout(self.connect_timeout)
                .response_timeout(self.response_timeout)
                .retries(3)
                .build()
                .map_err(classify)?;
            Conn::Cluster(client.get_async_connection().await.map_err(classify)?)
        } else {
            let url = self.urls.first().ok_or_else(|| Error::Config {
                message: "RedisStore needs with_url or with_cluster_nodes".into(),
            })?;
            let client = redis::Client::open(url.as_str()).map_err(classify)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.connect_timeout))
                .set_response_timeout(Some(self.response_timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            Conn::Single(
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(classify)?,
            )
        };
        let store = RedisStore {
            conn,
            clock: Arc::new(ServerClock::default()),
            prefix: Arc::from(self.prefix),
            scripts: Arc::new(Scripts {
                claim: Script::new(&scripts::claim()),
                complete: Script::new(&scripts::complete()),
                release: Script::new(&scripts::release()),
                renew: Script::new(&scripts::renew()),
                get: Script::new(&scripts::get()),
                forget: Script::new(&scripts::forget()),
            }),
            warnings: Arc::new([]),
        };
        store.sync_clock().await?;
        let warnings = store.check().await;
        for w in &warnings {
            tracing::warn!(code = w.code, "{w}");
        }
        Ok(RedisStore {
            warnings: warnings.into(),
            ..store
        })
    }
}

struct Scripts {
    claim: Script,
    complete: Script,
    release: Script,
    renew: Script,
    get: Script,
    forget: Script,
}

/// The [`Store`] contract on Redis and Redis Cluster.
///
/// Fencing tokens of a new record start at [`first_token`](idemgate_core::backend::first_token) of the
/// server's clock, so they keep growing even after Redis expired an earlier record of the same
/// key. A fresh claim is a plain `SET NX` written by the client, so its token comes from the
/// server's clock as the client measured it (`TIME` when the store connects, and again on the
/// first claim after ten seconds); every other claim reads `TIME` on the server. `purge_expired` has nothing to do
/// (Redis expires records itself) and returns 0.
///
/// # Clone
/// Cheap: clones share the multiplexed connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    clock: Arc<ServerClock>,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
    warnings: Arc<[Warning]>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.conn {
            Conn::Single(_) => "standalone",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("kind", &kind)
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(duration_millis(d)).unwrap_or(i64::MAX)
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("a number field is not a number")),
        other => Err(corrupt(format!("expected a number, got {other:?}"))),
    }
}

fn opt_int(v: &Value) -> Result<Option<i64>> {
    match v {
        Value::Nil => Ok(None),
        v => int(v).map(Some),
    }
}

fn opt_bytes(v: &Value) -> Result<Option<Vec<u8>>> {
    match v {
        Value::Nil => Ok(None),
        Value::BulkString(b) => Ok(Some(b.clone())),
        other => Err(corrupt(format!("expected bytes, got {other:?}"))),
    }
}

fn hex_fp(hex: &[u8]) -> Result<Fingerprint> {
    std::str::from_utf8(hex)
        .ok()
        .and_then(|h| h.parse().ok())
        .ok_or_else(|| corrupt("a stored fingerprint is not 64 hex digits"))
}

/// The nine `RecordRow` fields in script order.
fn row(f: &[Value]) -> Result<RecordRow> {
    if f.len() != 9 {
        return Err(corrupt(format!("a record has {} fields", f.len())));
    }
    let need = |v: &Value| opt_int(v)?.ok_or_else(|| corrupt("a record field is missing"));
    let fingerprint = match opt_bytes(&f[0])? {
        Some(hex) => Some(hex_fp(&hex)?.as_bytes().to_vec()),
        None => None,
    };
    Ok(RecordRow {
        fingerprint,
        state: need(&f[1])?,
        token: need(&f[2])?,
        lease_until: opt_int(&f[3])?,
        outcome: opt_bytes(&f[4])?,
        completed_at: opt_int(&f[5])?,
        created_at: need(&f[6])?,
        expires_at: need(&f[7])?,
        attempts: need(&f[8])?,
    })
}

impl RedisStore {
    /// A builder: URL or cluster nodes, key prefix.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder {
            urls: Vec::new(),
            cluster: false,
            prefix: "idemgate:".into(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
        }
    }

    /// A store on `IDEMGATE_REDIS_URL` (default `redis://127.0.0.1:6379`).
    pub async fn from_env() -> Result<Self> {
        let url =
            std::env::var("IDEMGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        Self::builder().with_url(url).build().await
    }

    /// What was found wrong with the server's settings when the store was built (see
    /// [`check`](Self::check)); also logged at `warn`.
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// Checks the server's settings: a `Warning` when it keeps no append-only file
    /// (`"redis-no-aof"`: a restart forgets completed keys), when it may evict keys before they
    /// expire (`"redis-eviction"`), or when the settings cannot be read (`"redis-config"`: a
    /// managed Redis may refuse `CONFIG GET`).
    pub async fn check(&self) -> Vec<Warning> {
        let mut warnings = Vec::new();
        match self.check_durability().await {
            Ok(Durability::AppendOnly) => {}
            Ok(d) => warnings.push(Warning::new(
                "redis-no-aof",
                format!(
                    "the Redis server keeps no append-only file ({}): a restart forgets \
                     completed keys and lets duplicates through; set appendonly yes",
                    match d {
                        Durability::Snapshots => "only RDB snapshots",
                        _ => "nothing on disk",
                    }
                ),
            )),
            Err(e) => warnings.push(Warning::new(
                "redis-config",
                format!("could not read the Redis persistence settings: {e}"),
            )),
        }
        match self.check_eviction().await {
            Ok(None) => {}
            Ok(Some(policy)) => warnings.push(Warning::new(
                "redis-eviction",
                format!(
                    "the Redis server evicts keys when its memory is full (maxmemory-policy \
                     {policy}): a record can vanish before it expires and let a duplicate \
                     through; set maxmemory-policy noeviction"
                ),
            )),
            Err(e) => warnings.push(Warning::new(
                "redis-config",
                format!("could not read the Redis eviction policy: {e}"),
            )),
        }
        warnings
    }

    /// What the server keeps on disk (`CONFIG GET appendonly` and `save`).
    pub async fn check_durability(&self) -> Result<Durability> {
        let aof: Vec<String> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("appendonly"))
            .await?;
        if aof.get(1).is_some_and(|v| v == "yes") {
            return Ok(Durability::AppendOnly);
        }
        let save: Vec<String> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("save"))
            .await?;
        Ok(if save.get(1).is_some_and(|v| !v.trim().is_empty()) {
            Durability::Snapshots
        } else {
            Durability::None
        })
    }

    /// The server's maxmemory policy when it may evict keys before they expire (anything but
    /// `noeviction`, read with `CONFIG GET maxmemory-policy`); `None` when it never evicts.
    ///
    /// An evicting policy only acts when `maxmemory` is reached, but then it drops records
    /// (the `volatile-*` policies pick among exactly the keys idemgate writes, since every
    /// record has an expiry) and a duplicate arriving afterwards runs again.
    pub async fn check_eviction(&self) -> Result<Option<String>> {
        let policy: Vec<String> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"))
            .await?;
        Ok(policy.get(1).filter(|p| *p != "noeviction").cloned())
    }

    /// Measures the server's clock against this host's (`TIME`), for the tokens of fresh claims.
    async fn sync_clock(&self) -> Result<()> {
        let before = std::time::SystemTime::now();
        let (secs, micros): (u64, u64) = self.query(&redis::cmd("TIME")).await?;
        let after = std::time::SystemTime::now();
        // the server read its clock about halfway through the round trip
        let local = idemgate_core::backend::to_millis(before)
            .saturating_add(idemgate_core::backend::to_millis(after))
            / 2;
        let server = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let offset =
            i64::try_from(server).unwrap_or(i64::MAX) - i64::try_from(local).unwrap_or(i64::MAX);
        self.clock.offset_ms.store(offset, Ordering::Relaxed);
        self.clock
            .synced_at_ms
            .store(idemgate_core::backend::to_millis(after), Ordering::Relaxed);
        Ok(())
    }

    /// The server's clock as last measured, re-measured when that is over
    /// [`ServerClock::RESYNC_MS`] old.
    async fn server_now(&self) -> Result<std::time::SystemTime> {
        let local = idemgate_core::backend::to_millis(std::time::SystemTime::now());
        let synced = self.clock.synced_at_ms.load(Ordering::Relaxed);
        if local.abs_diff(synced) > ServerClock::RESYNC_MS {
            self.sync_clock().await?;
        }
        Ok(self.clock.now())
    }

    /// Runs a raw command on the store's connection (for operations and tests).
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
        .map_err(classify)
    }

    /// The Redis key of a record: the prefix, then the scope length-prefixed, then the id.
    fn key(&self, key: &Key) -> String {
        let (scope, id) = (key.scope(), key.id());
        let mut out = String::with_capacity(self.prefix.len() + 4 + scope.len() + id.len());
        out.push_str(&self.prefix);
        out.push_str(itoa::Buffer::new().format(scope.len()));
        out.push(':');
        out.push_str(scope);
        out.push_str(id);
        out
    }

    async fn invoke(&self, inv: &ScriptInvocation<'_>) -> Result<Value> {
        match &self.conn {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
        }
        .map_err(classify)
    }

    /// A claim whose `SET NX` found the key taken: the claim script decides.
    async fn claim_taken(
        &self,
        key: &Key,
        redis_key: String,
        fp_hex: String,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        let mut inv = self.scripts.claim.key(redis_key);
        inv.arg(fp_hex).arg(ms(opts.lease)).arg(ms(opts.retention));
        let Value::Array(reply) = self.invoke(&inv).await? else {
            return Err(corrupt("the claim script answered a non-array"));
        };
        let kind = reply.first().map(int).transpose()?;
        match (kind, reply.len()) {
            (Some(1), 4) => Ok(Claim::Acquired(Lease::new(
                key.clone(),
                u64::try_from(int(&reply[1])?).unwrap_or(0),
                time_from_ms(int(&reply[3])?),
                u32::try_from(int(&reply[2])?).unwrap_or(u32::MAX),
            ))),
            (Some(2), 10) => Ok(Claim::Completed(
                row(&reply[1..])?.into_record(key, "redis")?,
            )),
            (Some(3), 2) => {
                let fp = opt_bytes(&reply[1])?
                    .ok_or_else(|| corrupt("mismatch without a fingerprint"))?;
                Ok(Claim::Mismatch {
                    stored: hex_fp(&fp)?,
                })
            }
            (Some(4), 3) => Ok(Claim::InProgress {
                lease_until: time_from_ms(int(&reply[1])?),
                attempts: u32::try_from(int(&reply[2])?).unwrap_or(u32::MAX),
            }),
            _ => Err(corrupt(format!("the claim script answered {reply:?}"))),
        }
    }

    /// Sends `pipe` (`n` commands) as one pipeline on the standalone connection: one answer per
    /// command, a server error as `Value::ServerError` in its place.
    async fn pipelined(
        &self,
        c: &ConnectionManager,
        pipe: &redis::Pipeline,
        n: usize,
    ) -> Result<Vec<Value>> {
        use redis::aio::ConnectionLike;
        if n == 0 {
            // nothing to send (the connection would wait for answers that never come)
            return Ok(Vec::new());
        }
        let replies = c
            .clone()
            .req_packed_commands(pipe, 0, n)
            .await
            .map_err(classify)?;
        if replies.len() == n {
            Ok(replies)
        } else {
            Err(corrupt(format!(
                "{} answers to a pipeline of {n}",
                replies.len()
            )))
        }
    }

    /// `claim_many` of distinct keys on a standalone server: every `SET NX` in one pipeline,
    /// then the claim script for the keys that were taken.
    async fn claim_pipelined(
        &self,
        c: &ConnectionManager,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        let mut pipe = redis::pipe();
        let mut pending = Vec::with_capacity(claims.len());
        let now = self.server_now().await?;
        for (key, fp) in claims {
            let fresh = Fresh::new(fp.as_ref(), now);
            let redis_key = self.key(key);
            pipe.add_command(fresh.set(&redis_key, opts));
            pending.push((redis_key, fresh));
        }
        let replies = self.pipelined(c, &pipe, claims.len()).await?;
        let mut out = Vec::with_capacity(claims.len());
        for (((key, _), (redis_key, fresh)), reply) in claims.iter().zip(pending).zip(replies) {
            out.push(match reply {
                Value::Nil => self.claim_taken(key, redis_key, fresh.fp_hex, opts).await?,
                Value::ServerError(e) => return Err(classify(e.into())),
                _ => fresh.acquired(key, opts),
            });
        }
        Ok(out)
    }

    /// `complete_many` of distinct keys on a standalone server: every completion script in one
    /// pipeline; a completion the server could not run (its script cache was flushed) runs again
    /// on its own, which loads the script.
    async fn complete_pipelined(
        &self,
        c: &ConnectionManager,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        let retention = ms(retention).max(1).to_string().into_bytes();
        let args: Vec<[Vec<u8>; 2]> = done
            .iter()
            .map(|(_, outcome)| [outcome.encode(), retention.clone()])
            .collect();
        let mut pipe = redis::pipe();
        for ((lease, _), args) in done.iter().zip(&args) {
            pipe.invoke_script(&self.fenced_invocation(&self.scripts.complete, lease, args));
        }
        let replies = self.pipelined(c, &pipe, done.len()).await?;
        let mut out = Vec::with_capacity(done.len());
        for (((lease, _), args), reply) in done.iter().zip(&args).zip(replies) {
            let v = match reply {
                Value::ServerError(e) if e.code() == "NOSCRIPT" => {
                    self.fenced(&self.scripts.complete, lease, args).await
                }
                Value::ServerError(e) => return Err(classify(e.into())),
                other => fenced_reply(&other),
            };
            out.push(match v {
                Err(e) if !matches!(e, Error::LeaseLost) => return Err(e),
                r => r.map(drop),
            });
        }
        Ok(out)
    }

    /// A fenced script's call: the record's key, the lease's token, then `args`.
    fn fenced_invocation<'s>(
        &self,
        script: &'s Script,
        lease: &Lease,
        args: &[Vec<u8>],
    ) -> ScriptInvocation<'s> {
        let mut inv = script.key(self.key(lease.key()));
        inv.arg(lease.token());
        for a in args {
            inv.arg(a.as_slice());
        }
        inv
    }

    async fn fenced(&self, script: &Script, lease: &Lease, args: &[Vec<u8>]) -> Result<i64> {
        let inv = self.fenced_invocation(script, lease, args);
        fenced_reply(&self.invoke(&inv).await?)
    }
}

/// A fenced script's answer: its number, or `LeaseLost` when it refused (-1).
fn fenced_reply(v: &Value) -> Result<i64> {
    let v = int(v)?;
    if v < 0 { Err(Error::LeaseLost) } else { Ok(v) }
}

/// The server's clock as this client measured it: the offset from the host's clock, and when it
/// was measured (host milliseconds).
#[derive(Debug, Default)]
struct ServerClock {
    offset_ms: AtomicI64,
    synced_at_ms: AtomicU64,
}

impl ServerClock {
    /// How old a measurement may get before the next fresh claim measures again.
    const RESYNC_MS: u64 = 10_000;

    fn now(&self) -> std::time::SystemTime {
        let local = idemgate_core::backend::to_millis(std::time::SystemTime::now());
        let offset = self.offset_ms.load(Ordering::Relaxed);
        idemgate_core::backend::from_millis(local.saturating_add_signed(offset))
    }
}

/// A fresh claim's record, written by the client with one `SET NX PX` (no script): it stores the
/// lease and retention lengths, not times, and the scripts read its times off the key's TTL.
struct Fresh {
    // when the claim was made, on the server's clock as measured: its token and the lease's end
    // derive from it
    now: std::time::SystemTime,
    fp_hex: String,
}

impl Fresh {
    fn new(fp: Option<&Fingerprint>, now: std::time::SystemTime) -> Self {
        Fresh {
            now,
            fp_hex: fp.map(Fingerprint::to_hex).unwrap_or_default(),
        }
    }

    fn token(&self) -> u64 {
        idemgate_core::backend::first_token(self.now)
    }

    fn set(&self, redis_key: &str, opts: &ClaimOptions) -> redis::Cmd {
        // `1|n|token|lease|0|retention|1|fingerprint||`, written without `core::fmt` (the
        // client's own work per claim competes with the server for the same cores)
        let (lease, retention) = (ms(opts.lease), ms(opts.retention));
        let mut record = Vec::with_capacity(48 + self.fp_hex.len());
        let mut num = itoa::Buffer::new();
        record.extend_from_slice(b"1|n|");
        record.extend_from_slice(num.format(self.token()).as_bytes());
        record.push(b'|');
        record.extend_from_slice(num.format(lease).as_bytes());
        record.extend_from_slice(b"|0|");
        record.extend_from_slice(num.format(retention).as_bytes());
        record.extend_from_slice(b"|1|");
        record.extend_from_slice(self.fp_hex.as_bytes());
        record.extend_from_slice(b"||");
        // sized up front: growing the command's buffers cost more than writing it
        let mut cmd = redis::Cmd::with_capacity(6, redis_key.len() + record.len() + 32);
        cmd.arg("SET")
            .arg(redis_key)
            .arg(record)
            .arg("NX")
            .arg("PX")
            .arg(lease.saturating_add(retention).max(1));
        cmd
    }

    fn acquired(&self, key: &Key, opts: &ClaimOptions) -> Claim {
        Claim::Acquired(Lease::new(
            key.clone(),
            self.token(),
            idemgate_core::backend::later(self.now, opts.lease),
            1,
        ))
    }
}

impl Store for RedisStore {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        let fresh = Fresh::new(fp, self.server_now().await?);
        let redis_key = self.key(key);
        // `OK`, or nil when the key is taken (read as a `Value`: no string to allocate)
        let set: Value = self.query(&fresh.set(&redis_key, opts)).await?;
        if set != Value::Nil {
            return Ok(fresh.acquired(key, opts));
        }
        self.claim_taken(key, redis_key, fresh.fp_hex, opts).await
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        self.fenced(
            &self.scripts.complete,
            lease,
            &[
                outcome.encode(),
                ms(retention).max(1).to_string().into_bytes(),
            ],
        )
        .await
        .map(drop)
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        self.fenced(&self.scripts.release, &lease, &[])
            .await
            .map(drop)
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        let until = self
            .fenced(
                &self.scripts.renew,
                lease,
                &[ms(extend).to_string().into_bytes()],
            )
            .await?;
        Ok(Lease::new(
            lease.key().clone(),
            lease.token(),
            time_from_ms(until),
            lease.attempt(),
        ))
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        match self.invoke(&self.scripts.get.key(self.key(key))).await? {
            Value::Nil => Ok(None),
            Value::Array(fields) => row(&fields)?.into_record(key, "redis").map(Some),
            other => Err(corrupt(format!("the get script answered {other:?}"))),
        }
    }

    async fn purge_expired(&self, _limit: usize) -> Result<u64> {
        // every record key carries PEXPIREAT = expires_at: Redis deletes them itself
        Ok(0)
    }

    async fn forget(&self, key: &Key, force: bool) -> Result<Forgotten> {
        let mut inv = self.scripts.forget.key(self.key(key));
        inv.arg(if force { "1" } else { "0" });
        let reply = self.invoke(&inv).await?;
        let bad = || corrupt(format!("the forget script answered {reply:?}"));
        let Value::Array(v) = &reply else {
            return Err(bad());
        };
        let arg = |i: usize| v.get(i).map(int).transpose();
        Ok(match (arg(0)?, arg(1)?) {
            (Some(0), _) => Forgotten::Absent,
            (Some(1), Some(token)) => Forgotten::Removed {
                token: u64::try_from(token).map_err(|_| bad())?,
            },
            (Some(2), Some(token)) => Forgotten::Tombstoned {
                token: u64::try_from(token).map_err(|_| bad())?,
            },
            (Some(3), Some(until)) => Forgotten::Held {
                lease_until: time_from_ms(until),
            },
            _ => return Err(bad()),
        })
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        let mut seen = std::collections::HashSet::new();
        if claims.iter().all(|(k, _)| seen.insert(k)) {
            if let Conn::Single(c) = &self.conn {
                return self.claim_pipelined(c, claims, opts).await;
            }
            // distinct keys are independent scripts: sent together on the multiplexed
            // connection, they share round trips (pipelining), on any cluster node
            let claims: Vec<(Key, Option<Fingerprint>)> = claims.to_vec();
            let opts = *opts;
            return self
                .each(claims, move |store, (key, fp)| async move {
                    store.claim(&key, fp.as_ref(), &opts).await
                })
                .await;
        }
        let mut out = Vec::with_capacity(claims.len());
        for (k, fp) in claims {
            out.push(self.claim(k, fp.as_ref(), opts).await?);
        }
        Ok(out)
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        // a repeated lease must see its first completion: keep those in order
        let mut seen = std::collections::HashSet::new();
        if !done.iter().all(|(l, _)| seen.insert(l.key())) {
            let mut out = Vec::with_capacity(done.len());
            for (l, o) in done {
                out.push(match self.complete(l, o, retention).await {
                    Err(e) if !matches!(e, Error::LeaseLost) => return Err(e),
                    r => r,
                });
            }
            return Ok(out);
        }
        if let Conn::Single(c) = &self.conn {
            return self.complete_pipelined(c, done, retention).await;
        }
        let done: Vec<(Lease, Outcome)> = done.to_vec();
        self.each(done, move |store, (lease, outcome)| async move {
            match store.complete(&lease, &outcome, retention).await {
                Err(e) if !matches!(e, Error::LeaseLost) => Err(e),
                r => Ok(r),
            }
        })
        .await
    }
}

impl RedisStore {
    /// Runs `f` for every item concurrently on clones of the store; answers in input order, or
    /// the first backend error.
    async fn each<I, T, F, Fut>(&self, items: Vec<I>, f: F) -> Result<Vec<T>>
    where
        I: Send + 'static,
        T: Send + 'static,
        F: Fn(RedisStore, I) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let mut set = tokio::task::JoinSet::new();
        let n = items.len();
        for (i, item) in items.into_iter().enumerate() {
            let fut = f(self.clone(), item);
            set.spawn(async move { (i, fut.await) });
        }
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.map_err(|e| Error::Backend {
                backend: "redis",
                source: Box::new(e),
            })?;
            out[i] = Some(r?);
        }
        Ok(out.into_iter().flatten().collect())
    }
}

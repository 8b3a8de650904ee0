//! Redis-specific behaviour: durability, a restart with AOF, cut connections, key expiry.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idemgate_core::{Claim, Error, Key, Lease, Outcome, Store, StoreExt};
use idemgate_redis::{Durability, RedisStore};
use idemgate_testkit::service;

static N: AtomicU32 = AtomicU32::new(0);

fn prefix() -> String {
    format!(
        "idemgate-rtest:{}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn local() -> Option<RedisStore> {
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

async fn acquire(store: &RedisStore, key: &Key) -> Lease {
    match store.claim_for(key, Duration::from_secs(60)).await.unwrap() {
        Claim::Acquired(l) => l,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn records_expire_with_the_record_and_durability_is_reported() {
    let Some(store) = local().await else { return };
    // this machine's Redis keeps nothing on disk, which the store must say
    let d = store.check_durability().await.unwrap();
    let expected = std::env::var("IDEMGATE_REDIS_DURABILITY").unwrap_or_else(|_| "none".into());
    if expected == "none" {
        assert_eq!(d, Durability::None);
        // and return, not only log: a program without a subscriber prints it
        let codes: Vec<&str> = store.warnings().iter().map(|w| w.code).collect();
        assert!(codes.contains(&"redis-no-aof"), "{:?}", store.warnings());
    }
    // an id of this run's own: records of earlier runs may still be alive
    let id = format!(
        "k{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let key = Key::new("ttl", &id).unwrap();
    let lease = acquire(&store, &key).await;
    store
        .complete(&lease, &Outcome::new(0, "x"), Duration::from_secs(30))
        .await
        .unwrap();
    let rec = store.get(&key).await.unwrap().unwrap();
    let keys: Vec<String> = store
        .query(redis::cmd("KEYS").arg("idemgate-rtest:*:ttl*"))
        .await
        .unwrap();
    let mine: Vec<&String> = keys
        .iter()
        .filter(|k| k.ends_with(&format!(":3:ttl{id}")))
        .collect();
    assert!(!mine.is_empty(), "record key not found among {keys:?}");
    let pttl: i64 = store.query(redis::cmd("PTTL").arg(mine[0])).await.unwrap();
    let left = rec
        .expires_at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        pttl > 0 && pttl <= 30_000,
        "PTTL {pttl} does not follow the record's expiry"
    );
    assert!((i64::try_from(left.as_millis()).unwrap() - pttl).abs() < 2_000);
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(port: u16, dir: &std::path::Path) -> Server {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is installed on this machine");
    Server(child)
}

async fn connect_retrying(url: &str) -> RedisStore {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match RedisStore::builder().with_url(url).build().await {
            Ok(s) => return s,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("redis on {url} never came up: {e}"),
        }
    }
}

/// With AOF (fsync always), completed records survive a SIGKILL of the server.
#[tokio::test(flavor = "multi_thread")]
async fn completed_records_survive_a_restart_with_aof() {
    if !service::required()
        && Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("skipping: redis-server not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let server = start_redis(port, dir.path());
    let store = connect_retrying(&url).await;
    assert_eq!(
        store.check_durability().await.unwrap(),
        Durability::AppendOnly
    );
    // this server is the test's own: its eviction policy can change
    assert_eq!(store.check_eviction().await.unwrap(), None);
    assert!(store.warnings().is_empty(), "{:?}", store.warnings());
    let set = |policy: &'static str| {
        let store = store.clone();
        async move {
            let ok: String = store
                .query(
                    redis::cmd("CONFIG")
                        .arg("SET")
                        .arg("maxmemory-policy")
                        .arg(policy),
                )
                .await
                .unwrap();
            assert_eq!(ok, "OK");
        }
    };
    set("volatile-lru").await;
    assert_eq!(
        store.check_eviction().await.unwrap().as_deref(),
        Some("volatile-lru"),
        "an evicting policy was not reported"
    );
    let found = store.check().await;
    assert!(
        found
            .iter()
            .any(|w| w.code == "redis-eviction" && w.message.contains("volatile-lru")),
        "{found:?}"
    );
    set("noeviction").await;
    let mut held = Vec::new();
    for i in 0..20 {
        let key = Key::new("aof", format!("k{i}")).unwrap();
        let lease = acquire(&store, &key).await;
        if i % 2 == 0 {
            store
                .complete(
                    &lease,
                    &Outcome::new(200, format!("done-{i}")),
                    Duration::from_secs(3600),
                )
                .await
                .unwrap();
        } else {
            held.push(lease);
        }
    }
    drop(server); // SIGKILL
    let _server = start_redis(port, dir.path());
    let store = connect_retrying(&url).await;
    for i in (0..20).step_by(2) {
        let key = Key::new("aof", format!("k{i}")).unwrap();
        let rec = store
            .get(&key)
            .await
            .unwrap()
            .expect("completed record lost in the restart");
        assert_eq!(rec.outcome().unwrap().body, format!("done-{i}").as_bytes());
        assert!(matches!(
            store.claim_for(&key, Duration::from_secs(1)).await.unwrap(),
            Claim::Completed(_)
        ));
    }
    // the leases held across the restart are still the owners, and only they
    for lease in held {
        assert!(matches!(
            store
                .claim_for(lease.key(), Duration::from_secs(1))
                .await
                .unwrap(),
            Claim::InProgress { .. }
        ));
        store
            .complete(&lease, &Outcome::new(0, "late"), Duration::from_secs(60))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_connection_is_unavailable_then_recovers() {
    let Some(store) = local().await else { return };
    let Some(admin) = local().await else { return };
    let key = Key::new("cut", "k").unwrap();
    let old = acquire(&store, &key).await;
    store.release(old.clone()).await.unwrap();
    let id: i64 = store.query(redis::cmd("CLIENT").arg("ID")).await.unwrap();
    let killed: i64 = admin
        .query(redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id))
        .await
        .unwrap();
    assert_eq!(killed, 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let fresh = loop {
        match store.claim_for(&key, Duration::from_secs(60)).await {
            Ok(Claim::Acquired(l)) => break l,
            Err(Error::Unavailable { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("after CLIENT KILL: {other:?}"),
        }
    };
    assert_eq!(fresh.token(), old.token() + 1, "a cut claim took effect");
    assert!(matches!(
        store
            .complete(&old, &Outcome::new(0, "zombie"), Duration::from_secs(60))
            .await,
        Err(Error::LeaseLost)
    ));
    store
        .complete(&fresh, &Outcome::new(0, "ok"), Duration::from_secs(60))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let e = RedisStore::builder()
        .with_url("redis://127.0.0.1:1")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert!(matches!(
        RedisStore::builder().build().await,
        Err(Error::Config { .. })
    ));
    assert!(
        RedisStore::builder()
            .with_url("not a url")
            .build()
            .await
            .is_err()
    );
}

/// Batches go out as one pipeline on a standalone server. A completion whose script the server
/// no longer has (`SCRIPT FLUSH`, a restart) runs again on its own and loads it; a taken key in
/// a claim batch goes through the claim script; a stale lease is refused in its own slot.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_batches_survive_a_flushed_script_cache() {
    let Some(store) = local().await else { return };
    let keys: Vec<Key> = (0..4)
        .map(|i| Key::new("pipe", format!("k{i}")).unwrap())
        .collect();
    let held = acquire(&store, &keys[3]).await;
    let opts = idemgate_core::ClaimOptions {
        lease: Duration::from_secs(60),
        retention: Duration::from_secs(60),
    };
    let batch: Vec<_> = keys.iter().map(|k| (k.clone(), None)).collect();
    let claims = store.claim_many(&batch, &opts).await.unwrap();
    let mut leases: Vec<Lease> = claims[..3]
        .iter()
        .map(|c| match c {
            Claim::Acquired(l) => l.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        matches!(claims[3], Claim::InProgress { .. }),
        "{:?}",
        claims[3]
    );
    let _: () = store
        .query(redis::cmd("SCRIPT").arg("FLUSH"))
        .await
        .unwrap();
    // the held key's lease, taken over in the meantime: stale in the batch
    store.release(held.clone()).await.unwrap();
    let _taker = acquire(&store, &keys[3]).await;
    leases.push(held);
    let done: Vec<_> = leases
        .iter()
        .map(|l| (l.clone(), Outcome::new(0, "ok")))
        .collect();
    let results = store
        .complete_many(&done, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
    assert!(matches!(results[3], Err(Error::LeaseLost)), "{results:?}");
    for k in &keys[..3] {
        assert!(matches!(
            store.claim_for(k, Duration::from_secs(60)).await.unwrap(),
            Claim::Completed(_)
        ));
    }
}

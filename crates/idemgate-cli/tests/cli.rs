//! The `idemgate` binary, run as a user runs it.

use std::process::{Command, Output};
use std::time::Duration;

use idemgate::core::{Claim, Key, Outcome, Store, StoreExt};
use idemgate::sqlite::SqliteStore;
use serde_json::Value;

fn idemgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(args)
        .output()
        .unwrap()
}

fn demo_json(extra: &[&str]) -> Value {
    let mut args = vec![
        "demo",
        "--events",
        "800",
        "--workers",
        "3",
        "--kills",
        "8",
        "--seed",
        "11",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = idemgate(&args);
    assert!(
        out.status.success(),
        "demo failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

fn n(v: &Value, run: &str, field: &str) -> u64 {
    v[run][field]
        .as_u64()
        .unwrap_or_else(|| panic!("{run}.{field} missing in {v}"))
}

#[test]
fn demo_inbox_mode_is_exactly_once_under_kills() {
    let v = demo_json(&[]);
    for run in ["naive", "idemgate"] {
        assert_eq!(n(&v, run, "events"), 800);
        assert_eq!(n(&v, run, "kills"), 8, "{run}: not the kills asked");
        assert!(
            n(&v, run, "deliveries") >= 880,
            "{run}: duplicates were not delivered"
        );
        assert_eq!(
            n(&v, run, "duplicate_deliveries"),
            n(&v, run, "deliveries") - 800
        );
        assert_eq!(
            n(&v, run, "lost"),
            0,
            "{run}: at-least-once delivery lost an effect"
        );
    }
    // 10 % published twice: without idempotency every one of them is applied twice
    assert!(n(&v, "naive", "applied_twice") >= 80, "{v}");
    assert_eq!(n(&v, "idemgate", "applied_twice"), 0, "{v}");
    // the embedded queue hands out a key's events one at a time
    assert_eq!(n(&v, "idemgate", "out_of_order"), 0, "{v}");
    assert_eq!(v["idemgate"]["balance_ok"], true);
}

#[test]
fn demo_gate_mode_is_exactly_once_with_derived_keys() {
    // leases and visibility long enough that only kills, never a slow machine, expire a lease
    let v = demo_json(&[
        "--mode",
        "gate",
        "--lease-ms",
        "3000",
        "--visibility-ms",
        "3000",
    ]);
    assert_eq!(v["idemgate"]["mode"], "gate");
    assert_eq!(n(&v, "idemgate", "kills"), 8, "{v}");
    assert_eq!(n(&v, "idemgate", "lost"), 0, "{v}");
    // the effect outside the store carries the key derived from the event's: a kill between
    // the effect and `complete` re-runs the handler, and the ledger applies nothing twice
    assert!(
        v["idemgate"]["kills_by_point"]["after-effect"]
            .as_u64()
            .is_some_and(|k| k > 0),
        "no kill in the window: {v}"
    );
    assert_eq!(n(&v, "idemgate", "applied_twice"), 0, "{v}");
    assert_eq!(n(&v, "idemgate", "extra_effects"), 0, "{v}");
    assert_eq!(n(&v, "idemgate", "out_of_order"), 0, "{v}");
    assert!(n(&v, "naive", "applied_twice") >= 80);
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    let max = u64::MAX.to_string();
    for (args, says) in [
        (
            &["demo", "--dup-rate", "2"][..],
            "invalid value '2' for '--dup-rate",
        ),
        (
            &["demo", "--events", "0"],
            "invalid value '0' for '--events",
        ),
        (
            &["demo", "--mode", "sometimes"],
            "invalid value 'sometimes' for '--mode",
        ),
        (
            &["demo", "--workers", "x"],
            "invalid value 'x' for '--workers",
        ),
        // time arithmetic on these would overflow: refused before any is done
        (
            &["demo", "--timeout-secs", &max],
            "for '--timeout-secs <TIMEOUT_SECS>': 18446744073709551615 is not in 1..=604800",
        ),
        (
            &["demo", "--kills", "4294967295"],
            "for '--kills <KILLS>': 4294967295 is not in 0..=100000",
        ),
        (&["demo", "--lease-ms", &max], "for '--lease-ms <LEASE_MS>'"),
        (
            &["chaos-worker", "--mode", "inbox", "--visibility-ms", &max],
            "for '--visibility-ms <VISIBILITY_MS>'",
        ),
        (
            &["bench", "http", "--clients", "0"],
            "for '--clients <CLIENTS>': 0 is not in 1..=4096",
        ),
        (
            &[
                "check-window",
                "--retention",
                "99999999999999999d",
                "--broker",
                "kafka",
            ],
            "is too long",
        ),
        (&["frobnicate"], "unrecognized subcommand 'frobnicate'"),
    ] {
        let out = idemgate(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(says),
            "{args:?} did not say {says:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
fn inspect_and_purge_a_sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let store = SqliteStore::open(&path).unwrap();
            let key = Key::new("orders", "o-1").unwrap();
            let Claim::Acquired(l) = store
                .claim_for(&key, Duration::from_secs(30))
                .await
                .unwrap()
            else {
                panic!()
            };
            store
                .complete(&l, &Outcome::new(201, "created"), Duration::from_secs(3600))
                .await
                .unwrap();
            let short = Key::new("orders", "o-2").unwrap();
            let Claim::Acquired(l) = store
                .claim_for(&short, Duration::from_secs(30))
                .await
                .unwrap()
            else {
                panic!()
            };
            store
                .complete(&l, &Outcome::new(201, "x"), Duration::ZERO)
                .await
                .unwrap();
        });
    let url = format!("sqlite:{}", path.display());
    let out = idemgate(&["inspect", "--store", &url, "orders/o-1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("completed") && text.contains("status 201") && text.contains("7 body bytes"),
        "{text}"
    );
    let out = idemgate(&["explain", "--store", &url, "--scope", "orders", "o-2"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("fresh: no live record"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = idemgate(&["purge", "--store", &url]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "purged 1 expired records"
    );

    let out = idemgate(&["inspect", "--store", "ftp://x", "--scope", "s", "k"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported store URL"));
    let out = idemgate(&["inspect", "--store", &url, "--scope", "s", "has space"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid key"));
    std::fs::write(dir.path().join("junk.db"), [7u8; 4096]).unwrap();
    let junk = format!("sqlite:{}", dir.path().join("junk.db").display());
    let out = idemgate(&["purge", "--store", &junk]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("corrupt or foreign"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `explain` answers what a duplicate would get; `forget` frees a key, refusing a live lease
/// without `--force`, and a forgotten lease's holder stays fenced.
#[test]
fn explain_and_forget_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let url = format!("sqlite:{}", path.display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let (done, live) = (
        Key::new("orders", "done").unwrap(),
        Key::new("orders", "live").unwrap(),
    );
    let zombie = rt.block_on(async {
        let Claim::Acquired(l) = store
            .claim_for(&done, Duration::from_secs(30))
            .await
            .unwrap()
        else {
            panic!()
        };
        store
            .complete(&l, &Outcome::new(201, "created"), Duration::from_secs(3600))
            .await
            .unwrap();
        let Claim::Acquired(l) = store
            .claim_for(&live, Duration::from_secs(3600))
            .await
            .unwrap()
        else {
            panic!()
        };
        l
    });
    let json = |key: &str| -> serde_json::Value {
        let out = idemgate(&["explain", "--json", "--store", &url, key]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = json("orders/done");
    assert_eq!(v["state"], "completed");
    assert_eq!(v["duplicate_now"]["gets"], "replay");
    assert_eq!(v["outcome"]["status"], 201);
    let v = json("orders/live");
    assert_eq!(v["state"], "in_progress");
    assert_eq!(v["duplicate_now"]["gets"], "in_progress");
    assert_eq!(v["token"], zombie.token());
    let words = idemgate(&["explain", "--store", &url, "orders/live"]);
    let words = String::from_utf8_lossy(&words.stdout);
    assert!(
        words.contains("409") && words.contains("lease_until"),
        "{words}"
    );

    let out = idemgate(&["forget", "--store", &url, "orders/done"]);
    assert!(out.status.success());
    assert_eq!(json("orders/done")["duplicate_now"]["gets"], "takeover");

    let out = idemgate(&["forget", "--store", &url, "orders/live"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a live lease was forgotten without --force"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(json("orders/live")["state"], "in_progress");
    let out = idemgate(&["forget", "--force", "--store", &url, "orders/live"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json("orders/live")["duplicate_now"]["gets"], "takeover");
    rt.block_on(async {
        let late = store
            .complete(
                &zombie,
                &Outcome::new(200, "zombie"),
                Duration::from_secs(60),
            )
            .await;
        assert!(matches!(late, Err(idemgate::Error::LeaseLost)), "{late:?}");
        let Claim::Acquired(next) = store
            .claim_for(&live, Duration::from_secs(30))
            .await
            .unwrap()
        else {
            panic!("a forgotten key was not free")
        };
        assert!(next.token() > zombie.token() + 1);
    });
}

/// `inspect` and `purge` on every server store, by URL.
#[test]
fn inspect_and_purge_server_stores_by_url() {
    let required = std::env::var("IDEMGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let urls = [
        env(
            "IDEMGATE_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        ),
        env("IDEMGATE_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
        env("IDEMGATE_REDIS_URL", "redis://127.0.0.1:6379"),
        "redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".to_owned(),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for url in urls {
        let id = format!("cli-{}-{}", std::process::id(), url.len());
        let made = rt.block_on(async {
            let store = idemgate_cli_test_open(&url).await?;
            let key = Key::new("cli", &id).unwrap();
            let Claim::Acquired(l) = store.claim_for(&key, Duration::from_secs(30)).await? else {
                panic!("{url}: key taken")
            };
            store
                .complete(&l, &Outcome::new(201, "made"), Duration::from_secs(600))
                .await
        });
        if let Err(e) = made {
            assert!(!required, "{url} unreachable: {e}");
            eprintln!("skipping {url}: {e}");
            continue;
        }
        let out = idemgate(&["inspect", "--store", &url, &format!("cli/{id}")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("completed") && text.contains("status 201"),
            "{url}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // this machine's Redis keeps nothing on disk: the CLI says so, with no subscriber
        let durability = env("IDEMGATE_REDIS_DURABILITY", "none");
        if url.starts_with("redis://") && durability == "none" {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("warning: the Redis server keeps no append-only file"),
                "{url}: {err}"
            );
        }
        let out = idemgate(&["purge", "--store", &url]);
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

async fn idemgate_cli_test_open(url: &str) -> Result<idemgate::BoxStore, idemgate::Error> {
    use idemgate::StoreExt;
    Ok(if let Some(nodes) = url.strip_prefix("redis+cluster://") {
        let nodes: Vec<String> = nodes.split(',').map(|n| format!("redis://{n}")).collect();
        idemgate::redis::RedisStore::builder()
            .with_cluster_nodes(nodes)
            .build()
            .await?
            .boxed()
    } else if url.starts_with("redis://") {
        idemgate::redis::RedisStore::builder()
            .with_url(url)
            .build()
            .await?
            .boxed()
    } else if url.starts_with("mysql://") {
        let s = idemgate::mysql::MySqlStore::builder()
            .with_url(url)
            .build()?;
        s.migrate().await?;
        s.boxed()
    } else {
        let s = idemgate::postgres::PostgresStore::builder()
            .with_url(url)
            .build()?;
        s.migrate().await?;
        s.boxed()
    })
}

/// `explain --inbox` reads a key's inbox row and `--positions` a consumer group's offsets.
#[test]
fn explain_an_inbox_row_and_kafka_positions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let later = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
        + 3_600_000;
    conn.execute_batch(&format!(
        "CREATE TABLE idemgate_inbox (scope TEXT NOT NULL, id TEXT NOT NULL,
            processed_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, PRIMARY KEY (scope, id));
         INSERT INTO idemgate_inbox VALUES ('orders', 'e-1', 1000, {later});
         CREATE TABLE idemgate_offsets (consumer_group TEXT NOT NULL, topic TEXT NOT NULL,
            part INTEGER NOT NULL, next_offset INTEGER NOT NULL,
            PRIMARY KEY (consumer_group, topic, part));
         INSERT INTO idemgate_offsets VALUES ('billing', 'orders', 0, 42), ('billing', 'orders', 1, 7);"
    ))
    .unwrap();
    let url = format!("sqlite:{}", path.display());
    let json = |args: &[&str]| -> Value {
        let out = idemgate(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = json(&[
        "explain",
        "--json",
        "--store",
        &url,
        "--inbox",
        "orders/e-1",
    ]);
    assert_eq!(v["duplicate_now"]["gets"], "skip", "{v}");
    assert_eq!(v["processed_at_ms"], 1000);
    let v = json(&[
        "explain",
        "--json",
        "--store",
        &url,
        "--inbox",
        "orders/e-2",
    ]);
    assert_eq!(v["duplicate_now"]["gets"], "fresh", "{v}");
    let v = json(&[
        "explain",
        "--json",
        "--store",
        &url,
        "--positions",
        "billing/orders",
    ]);
    assert_eq!(v["next_offsets"]["0"], 42, "{v}");
    assert_eq!(v["next_offsets"]["1"], 7, "{v}");
    let out = idemgate(&["explain", "--store", &url, "--positions", "no-slash"]);
    assert!(!out.status.success());
    let out = idemgate(&[
        "explain",
        "--store",
        "redis://127.0.0.1:6379",
        "--inbox",
        "a/b",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SQL databases"));
}

/// A `dynamodb://` URL opens the DynamoDB store (moto on :4567): explain and forget by URL.
#[test]
fn explain_and_forget_on_dynamodb_by_url() {
    let endpoint = std::env::var("IDEMGATE_DYNAMODB_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4567".to_owned());
    if std::net::TcpStream::connect(endpoint.trim_start_matches("http://")).is_err() {
        let required = std::env::var("IDEMGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        assert!(!required, "DynamoDB (moto) is not running at {endpoint}");
        return;
    }
    let url = format!(
        "dynamodb://idemgate_cli_{}?endpoint={endpoint}",
        std::process::id()
    );
    let out = idemgate(&["explain", "--json", "--store", &url, "orders/o-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "absent");
    let out = idemgate(&["forget", "--store", &url, "orders/o-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to forget"));
}

/// `--metrics ADDR` serves the running command's metrics: here `bench cache`'s cache hits.
#[test]
fn a_long_running_command_serves_its_metrics() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args([
            "--metrics",
            "127.0.0.1:0",
            "bench",
            "cache",
            "--store",
            "memory:",
            "--keys",
            "10",
            "--seconds",
            "3",
            "--rounds",
            "1",
            "--clients",
            "2",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("metrics at http://")
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"))
        .to_owned();
    let scrape = |path: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    assert!(scrape("/nothing").starts_with("HTTP/1.1 404"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape("/metrics");
        if text.contains("idemgate_cache_total{result=\"hit\"}") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cache metrics in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(child.wait().unwrap().success());
}

//! SQLite: the inbox conformance suite, and what is SQLite's own: crashes, foreign files, shared
//! files, the queue.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemgate_core::{
    BoxError, Claim, ClaimOptions, Error, Key, Lease, Outcome, State, Store, StoreExt,
};
use idemgate_sqlite::{
    SqliteInbox, SqliteOffsets, SqliteOutbox, SqliteQueue, SqliteStore, SqliteTx,
};
use idemgate_testkit::inbox_conformance::InboxCase;
use idemgate_testkit::outbox_conformance::OutboxCase;
use rusqlite::{Connection, TransactionBehavior};

const CHILD_ENV: &str = "IDEMGATE_SQLITE_CHILD_DB";

/// Not a test of its own: the child process of `killed_process_leaves_completed_records_and_fenced_leases`.
#[tokio::test]
async fn child_process_entry() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = SqliteStore::open(&path).unwrap();
    let opts = ClaimOptions::with_lease(Duration::from_millis(300));
    for i in 0..40 {
        let key = Key::new("crash", format!("k{i}")).unwrap();
        let Claim::Acquired(lease) = store.claim(&key, None, &opts).await.unwrap() else {
            panic!()
        };
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
            println!("held {i} {}", lease.token());
        }
    }
    println!("ready");
    // hold the leases until killed
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_process_leaves_completed_records_and_fenced_leases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // libtest may print its own "test ... " prefix on the same line
        if line.ends_with("ready") {
            break;
        }
        if let Some(rest) = line.split("held ").nth(1) {
            let (i, tok) = rest.split_once(' ').unwrap();
            held.push((i.parse::<u32>().unwrap(), tok.parse::<u64>().unwrap()));
        }
    }
    assert_eq!(held.len(), 20, "child did not report its leases");
    child.kill().unwrap(); // SIGKILL: no destructor, no clean close
    child.wait().unwrap();

    let store = SqliteStore::open(&path).unwrap();
    for i in (0..40).step_by(2) {
        let rec = store
            .get(&Key::new("crash", format!("k{i}")).unwrap())
            .await
            .unwrap()
            .expect("completed record lost");
        assert_eq!(rec.outcome().unwrap().body, format!("done-{i}").as_bytes());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, old) in held {
        let key = Key::new("crash", format!("k{i}")).unwrap();
        let lease = loop {
            match store
                .claim_for(&key, Duration::from_secs(60))
                .await
                .unwrap()
            {
                Claim::Acquired(l) => break l,
                Claim::InProgress { .. } if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!("k{i}: {other:?}"),
            }
        };
        assert!(lease.token() > old);
        let stale = Lease::new(key.clone(), old, lease.expires_at(), 1);
        assert!(matches!(
            store
                .complete(&stale, &Outcome::new(0, "zombie"), Duration::from_secs(60))
                .await,
            Err(Error::LeaseLost)
        ));
        store
            .complete(&lease, &Outcome::new(0, "owner"), Duration::from_secs(60))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn foreign_and_corrupt_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x42u8; 8192]).unwrap();
    let e = SqliteStore::open(&garbage).unwrap_err();
    assert!(
        matches!(e, Error::Corrupt { .. }),
        "garbage file gave {e:?}"
    );
    assert!(SqliteQueue::open(&garbage, "q").is_err());

    let foreign = dir.path().join("foreign.db");
    Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE idemgate_records (a, b)")
        .unwrap();
    let e = SqliteStore::open(&foreign).unwrap_err();
    assert!(
        matches!(&e, Error::Corrupt { reason, .. } if reason.contains("belongs to something else")),
        "{e:?}"
    );

    let newer = dir.path().join("newer.db");
    drop(SqliteStore::open(&newer).unwrap());
    Connection::open(&newer)
        .unwrap()
        .execute_batch("UPDATE idemgate_schema SET version = 99")
        .unwrap();
    assert!(matches!(
        SqliteStore::open(&newer),
        Err(Error::Corrupt { .. })
    ));

    assert!(matches!(
        SqliteStore::builder()
            .with_path(dir.path().join("x.db"))
            .with_table("no; drop")
            .build(),
        Err(Error::Config { .. })
    ));
    assert!(matches!(
        SqliteStore::builder().build(),
        Err(Error::Config { .. })
    ));
    let missing_dir = dir.path().join("no/such/dir/x.db");
    assert!(matches!(
        SqliteStore::open(&missing_dir),
        Err(Error::Unavailable { .. })
    ));
}

#[tokio::test]
async fn a_damaged_record_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = SqliteStore::open(&path).unwrap();
    let key = Key::new("s", "k").unwrap();
    let Claim::Acquired(l) = store.claim_for(&key, Duration::from_secs(5)).await.unwrap() else {
        panic!()
    };
    store
        .complete(&l, &Outcome::new(0, "x"), Duration::from_secs(60))
        .await
        .unwrap();
    Connection::open(&path)
        .unwrap()
        .execute_batch("UPDATE idemgate_records SET outcome = x'ff00'")
        .unwrap();
    assert!(matches!(store.get(&key).await, Err(Error::Corrupt { .. })));
    assert!(matches!(
        store.claim_for(&key, Duration::from_secs(5)).await,
        Err(Error::Corrupt { .. })
    ));
    // the store keeps working for other keys
    assert!(matches!(
        store
            .claim_for(&Key::new("s", "other").unwrap(), Duration::from_secs(5))
            .await,
        Ok(Claim::Acquired(_))
    ));
}

/// Four stores (four connections, as four processes would have) race on each key of one file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_sharing_a_file_exclude_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let stores: Vec<_> = (0..4).map(|_| SqliteStore::open(&path).unwrap()).collect();
    for round in 0..20 {
        let key = Key::new("shared", format!("k{round}")).unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (store, key, barrier) =
                    (stores[i % 4].clone(), key.clone(), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .claim_for(&key, Duration::from_secs(60))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Claim::Acquired(_)) {
                won += 1;
            }
        }
        assert_eq!(won, 1, "round {round}");
    }
}

/// Eight connections process the same 200 keys concurrently: each key's effect happens once.
#[test]
fn concurrent_inbox_transactions_apply_each_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE effects (id TEXT PRIMARY KEY, n INTEGER NOT NULL);").unwrap();
        SqliteInbox::new(Connection::open(&path).unwrap())
            .migrate_on(&conn)
            .unwrap();
    }
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut conn = Connection::open(&path).unwrap();
                conn.busy_timeout(Duration::from_secs(30)).unwrap();
                let inbox = SqliteInbox::new(Connection::open_in_memory().unwrap());
                let mut applied = 0;
                for i in 0..200 {
                    let key = Key::new("c", format!("e{i}")).unwrap();
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
                    if inbox.first_time_in(&tx, &key).unwrap() {
                        tx.execute("INSERT INTO effects (id, n) VALUES (?1, 1) ON CONFLICT (id) DO UPDATE SET n = n + 1", [key.id()]).unwrap();
                        applied += 1;
                    }
                    tx.commit().unwrap();
                }
                applied
            })
        })
        .collect();
    let applied: i32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(applied, 200);
    let conn = Connection::open(&path).unwrap();
    let (rows, max): (i64, i64) = conn
        .query_row("SELECT count(*), max(n) FROM effects", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((rows, max), (200, 1));
}

#[test]
fn queue_hides_redelivers_and_counts() {
    let clock = idemgate_core::ManualClock::new();
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteQueue::open_with_clock(dir.path().join("q.db"), "jobs", clock.clone()).unwrap();
    let other =
        SqliteQueue::open_with_clock(dir.path().join("q.db"), "other", clock.clone()).unwrap();
    q.send_batch([
        (&b"a"[..], Duration::ZERO),
        (&b"b"[..], Duration::ZERO),
        (&b"c"[..], Duration::from_secs(5)),
    ])
    .unwrap();
    other.send(b"elsewhere").unwrap();

    let first = q.receive(10, Duration::from_secs(30)).unwrap();
    assert_eq!(
        first.iter().map(|m| m.body.as_slice()).collect::<Vec<_>>(),
        [b"a", b"b"]
    );
    assert!(first.iter().all(|m| m.receive_count == 1));
    assert!(
        q.receive(10, Duration::from_secs(30)).unwrap().is_empty(),
        "in-flight or delayed messages were delivered"
    );
    assert!(q.delete(&first[0].receipt).unwrap());
    assert!(!q.delete(&first[0].receipt).unwrap(), "deleted twice");

    clock.advance(Duration::from_secs(31)); // "b" times out, "c" becomes visible
    let again = q.receive(10, Duration::from_secs(30)).unwrap();
    assert_eq!(again.len(), 2);
    let b = again.iter().find(|m| m.body == b"b").unwrap();
    assert_eq!(b.receive_count, 2, "a redelivery counts");
    assert!(
        !q.delete(&first[1].receipt).unwrap(),
        "a stale receipt deleted a redelivered message"
    );
    assert!(q.change_visibility(&b.receipt, Duration::ZERO).unwrap());
    let b2 = q.receive(1, Duration::from_secs(30)).unwrap();
    assert_eq!((b2[0].body.as_slice(), b2[0].receive_count), (&b"b"[..], 3));

    let s = q.stats().unwrap();
    assert_eq!((s.messages, s.in_flight, s.sent, s.receives), (2, 2, 3, 5));
    assert_eq!(other.stats().unwrap().messages, 1);
}

/// A message group is handed out one message at a time, in send order, and waits behind a
/// message that went back; other groups and ungrouped messages do not wait.
#[test]
fn queue_groups_wait_behind_their_oldest_message() {
    let clock = idemgate_core::ManualClock::new();
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteQueue::open_with_clock(dir.path().join("q.db"), "jobs", clock.clone()).unwrap();
    for (body, group) in [
        ("a1", "a"),
        ("b1", "b"),
        ("a2", "a"),
        ("a3", "a"),
        ("b2", "b"),
    ] {
        q.send_in_group(body.as_bytes(), group).unwrap();
    }
    q.send(b"free").unwrap();
    let bodies = |ms: &[idemgate_sqlite::Message]| {
        ms.iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect::<Vec<_>>()
    };
    let first = q.receive(10, Duration::from_secs(30)).unwrap();
    assert_eq!(bodies(&first), ["a1", "b1", "free"]);
    assert_eq!(first[0].group.as_deref(), Some("a"));
    assert_eq!(first[2].group, None);
    assert!(q.receive(10, Duration::from_secs(30)).unwrap().is_empty());
    // a1 goes back with a delay: a2 waits for it; b goes on
    assert!(
        q.change_visibility(&first[0].receipt, Duration::from_secs(5))
            .unwrap()
    );
    assert!(q.delete(&first[1].receipt).unwrap());
    assert_eq!(
        bodies(&q.receive(10, Duration::from_secs(30)).unwrap()),
        ["b2"]
    );
    clock.advance(Duration::from_secs(5));
    let again = q.receive(10, Duration::from_secs(30)).unwrap();
    assert_eq!(bodies(&again), ["a1"]);
    assert!(q.delete(&again[0].receipt).unwrap());
    assert_eq!(
        bodies(&q.receive(10, Duration::from_secs(30)).unwrap()),
        ["a2"]
    );
}

/// A queue file made before message groups is upgraded in place, its messages kept.
#[test]
fn queue_files_without_groups_are_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE idemgate_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
             INSERT INTO idemgate_schema VALUES ('idemgate_queue', 1);
             CREATE TABLE idemgate_queue (
                id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, body BLOB NOT NULL,
                sent_at INTEGER NOT NULL, visible_at INTEGER NOT NULL,
                receive_count INTEGER NOT NULL DEFAULT 0, receipt INTEGER NOT NULL DEFAULT 0);
             INSERT INTO idemgate_queue (queue, body, sent_at, visible_at) VALUES ('jobs', x'6f6c64', 0, 0);",
        )
        .unwrap();
    }
    let q = SqliteQueue::open(&path, "jobs").unwrap();
    q.send_in_group(b"new", "g").unwrap();
    let got = q.receive(10, Duration::from_secs(30)).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].body.as_slice(), got[0].group.as_deref()),
        (&b"old"[..], None)
    );
    assert_eq!(got[1].group.as_deref(), Some("g"));
}

/// A queue table already in the current shape but without its version record (the schema
/// table lost) is taken as it is: no step runs again on it.
#[test]
fn a_current_table_without_its_record_is_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    SqliteQueue::open(&path, "jobs")
        .unwrap()
        .send(b"kept")
        .unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("DROP TABLE idemgate_schema")
        .unwrap();
    let q = SqliteQueue::open(&path, "jobs").unwrap();
    let got = q.receive(10, Duration::from_secs(30)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body.as_slice(), b"kept");
}

/// Four processes' worth of connections drain one queue: every message is received, and while
/// each receive hides its messages no two receivers get the same one.
#[test]
fn queue_receivers_do_not_share_in_flight_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let q = SqliteQueue::open(&path, "work").unwrap();
    let bodies: Vec<Vec<u8>> = (0..400).map(|i: u32| i.to_le_bytes().to_vec()).collect();
    q.send_batch(bodies.iter().map(|b| (b.as_slice(), Duration::ZERO)))
        .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let q = SqliteQueue::open(&path, "work").unwrap();
                let mut got = Vec::new();
                loop {
                    let batch = q.receive(7, Duration::from_secs(600)).unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    for m in batch {
                        assert!(q.delete(&m.receipt).unwrap());
                        got.push(m.id);
                    }
                }
            })
        })
        .collect();
    let mut all: Vec<i64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!((n, all.len()), (400, 400));
    assert_eq!(q.stats().unwrap().messages, 0);
}

#[tokio::test]
async fn boxed_store_works_like_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("b.db")).unwrap().boxed();
    let key = Key::new("b", "k").unwrap();
    let Claim::Acquired(l) = store.claim_for(&key, Duration::from_secs(5)).await.unwrap() else {
        panic!()
    };
    store
        .complete(&l, &Outcome::new(1, "v"), Duration::from_secs(5))
        .await
        .unwrap();
    let rec = store.get(&key).await.unwrap().unwrap();
    assert!(matches!(rec.state, State::Completed { .. }));
}

#[test]
fn event_log_is_idempotent_gap_free_and_transactional() {
    use idemgate_sqlite::{Appended, Lite, SqliteEventLog, ready};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let mut conn = Connection::open(&path).unwrap();
    let log = SqliteEventLog::new();
    ready(log.migrate(&mut Lite::new(&conn))).unwrap();
    assert_eq!(
        ready(log.append(&mut Lite::new(&conn), "a", "e1", b"1")).unwrap(),
        Appended {
            seq: 1,
            fresh: true
        }
    );
    assert_eq!(
        ready(log.append(&mut Lite::new(&conn), "a", "e1", b"1")).unwrap(),
        Appended {
            seq: 1,
            fresh: false
        }
    );
    let tx = conn.transaction().unwrap();
    assert_eq!(
        ready(log.append(&mut Lite::new(&tx), "a", "e2", b"2"))
            .unwrap()
            .seq,
        2
    );
    tx.rollback().unwrap();
    assert_eq!(
        ready(log.append(&mut Lite::new(&conn), "a", "e3", b"3"))
            .unwrap()
            .seq,
        2,
        "a rolled-back append used a position"
    );
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let conn = Connection::open(&path).unwrap();
                conn.busy_timeout(Duration::from_secs(30)).unwrap();
                let log = SqliteEventLog::new();
                (0..30)
                    .filter(|i| {
                        ready(log.append(&mut Lite::new(&conn), "a", &format!("c{i}"), b"p"))
                            .unwrap()
                            .fresh
                    })
                    .count()
            })
        })
        .collect();
    let fresh: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(fresh, 30);
    let seqs: Vec<i64> = ready(log.read(&mut Lite::new(&conn), "a", 0, 100))
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=32).collect::<Vec<_>>());
}

/// The inbox conformance suite on SQLite.
struct SqliteCase {
    _dir: tempfile::TempDir,
    inbox: SqliteInbox,
    path: std::path::PathBuf,
}

impl InboxCase for SqliteCase {
    type Inbox = SqliteInbox;

    async fn open(retention: Duration) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let inbox = SqliteInbox::open(&path)
            .unwrap()
            .with_retention(retention)
            .with_offsets(SqliteOffsets::new());
        inbox.migrate().await.unwrap();
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE effects (event TEXT PRIMARY KEY, applied INTEGER NOT NULL)",
            )
            .unwrap();
        Some(SqliteCase {
            _dir: dir,
            inbox,
            path,
        })
    }

    fn inbox(&self) -> &SqliteInbox {
        &self.inbox
    }

    fn with_table(&self, table: &str) -> SqliteInbox {
        self.inbox.clone().with_table(table)
    }

    fn without_offsets(&self) -> SqliteInbox {
        SqliteInbox::open(&self.path)
            .unwrap()
            .with_table("inbox_without_offsets")
    }

    async fn migrate(inbox: &SqliteInbox) -> Result<(), Error> {
        inbox.migrate().await
    }

    async fn drop_table(&self, table: &str) {
        Connection::open(&self.path)
            .unwrap()
            .execute_batch(&format!("DROP TABLE {table}"))
            .unwrap();
    }

    async fn apply(&self, tx: &mut SqliteTx, event: &str) -> Result<(), BoxError> {
        tx.execute(
            "INSERT INTO effects (event, applied) VALUES (?1, 1)
             ON CONFLICT (event) DO UPDATE SET applied = applied + 1",
            [event],
        )?;
        Ok(())
    }

    async fn applied(&self) -> BTreeMap<String, (u64, Option<i64>)> {
        let conn = Connection::open(&self.path).unwrap();
        let mut stmt = conn.prepare("SELECT event, applied FROM effects").unwrap();
        stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0), None),
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }
}

idemgate_testkit::inbox_conformance_tests!(SqliteCase);

#[tokio::test]
async fn inbox_tables_are_identifiers() {
    let conn = Connection::open_in_memory().unwrap();
    let inbox = SqliteInbox::new(Connection::open_in_memory().unwrap()).with_table("bad; name");
    // every call that would run SQL on the table refuses, before any statement is sent
    assert!(matches!(inbox.migrate().await, Err(Error::Config { .. })));
    assert!(matches!(inbox.migrate_on(&conn), Err(Error::Config { .. })));
    let key = Key::new("c", "e").unwrap();
    assert!(matches!(
        inbox.first_time_in(&conn, &key),
        Err(Error::Config { .. })
    ));
    assert!(matches!(
        idemgate_core::Inbox::purge_expired(&inbox, 10).await,
        Err(Error::Config { .. })
    ));
    let offsets = idemgate_sqlite::SqliteOffsets::new().with_table("1st");
    assert!(matches!(
        idemgate_sqlite::ready(offsets.migrate(&mut idemgate_sqlite::Lite::new(&conn))),
        Err(Error::Config { .. })
    ));
    // nothing was created
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 0);
}

impl OutboxCase for SqliteCase {
    type Outbox = SqliteOutbox;

    async fn outbox(&self) -> SqliteOutbox {
        let outbox = SqliteOutbox::open(&self.path)
            .unwrap()
            .with_table(format!("outbox_{}", fastrand_table()));
        outbox.migrate().await.unwrap();
        outbox
    }
}

fn fastrand_table() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

idemgate_testkit::outbox_conformance_tests!(SqliteCase);

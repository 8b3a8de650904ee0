//! The broker commands (feature `brokers`), run as a user runs them.

use std::process::{Command, Output};
use std::time::Duration;

fn idemgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_window_reads_the_kafka_horizon_from_the_group_settings() {
    // 6 s session + 10 s poll interval + 5 s commit interval = 21 s
    let args = |retention| {
        idemgate(&[
            "check-window",
            "--retention",
            retention,
            "--broker",
            "kafka",
            "--url",
            "127.0.0.1:9092",
            "-X",
            "session.timeout.ms=6000",
            "-X",
            "max.poll.interval.ms=10000",
        ])
    };
    let short = args("20s");
    assert_eq!(short.status.code(), Some(1), "{short:?}");
    assert!(String::from_utf8_lossy(&short.stdout).contains("SHORTER"));
    let enough = args("1m");
    assert!(enough.status.success(), "{enough:?}");
    let bad = args("1w");
    assert_eq!(
        bad.status.code(),
        Some(2),
        "clap refuses a bad duration: {bad:?}"
    );
}

#[test]
fn check_window_reads_the_sqs_horizon_from_the_queue() {
    let endpoint = std::env::var("SQS_ENDPOINT").unwrap_or("http://127.0.0.1:4566".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sqs = idemgate::sqs::Sqs::local(&endpoint);
    let name = format!("idemgate-window-{}", std::process::id());
    let options = idemgate::sqs::QueueOptions::default()
        .with_visibility_timeout(Duration::from_secs(10))
        .with_max_receive_count(Some(5));
    let created = rt.block_on(sqs.create_queue(&name, options));
    let url = match created {
        Ok(url) => url,
        Err(e) if std::env::var("IDEMGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1") => {
            panic!("SQS is required but unreachable: {e}")
        }
        Err(e) => return eprintln!("skipping: SQS unreachable ({e})"),
    };
    // 10 s visibility × 5 receives = 50 s
    let check = |retention| {
        idemgate(&[
            "check-window",
            "--retention",
            retention,
            "--broker",
            "sqs",
            "--url",
            &endpoint,
            "--queue",
            &url,
        ])
    };
    let short = check("49s");
    assert_eq!(short.status.code(), Some(1), "{short:?}");
    let out = String::from_utf8_lossy(&short.stdout);
    assert!(out.contains("maxReceiveCount 5"), "{out}");
    assert!(check("50s").status.success());
}

/// `idemgate chaos` on the embedded queue (no server): real worker processes, real SIGKILLs
/// and a real SIGSTOP; every figure read from its JSON report.
fn chaos(extra: &[&str]) -> (Output, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.html");
    let mut args = vec![
        "chaos",
        "--events",
        "400",
        "--workers",
        "3",
        "--kills",
        "6",
        "--lease-ms",
        "600",
        "--visibility-ms",
        "1000",
        "--json",
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend(extra);
    let out = idemgate(&args);
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(
        html.contains("<svg") && html.contains("SIGKILL at"),
        "{html}"
    );
    (out, json)
}

#[test]
fn chaos_gate_mode_applies_every_effect_once_through_kills_and_a_zombie() {
    let (out, r) = chaos(&["--seed", "11", "--zombies", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (naive, idem) = (&r["naive"], &r["idemgate"]);
    for f in [naive, idem] {
        assert_eq!(f["events"], 400);
        assert_eq!(f["kills"], 6, "{f}");
        assert!(f["duplicate_deliveries"].as_u64().unwrap() >= 40, "{f}");
        assert_eq!(f["lost"], 0, "{f}");
    }
    assert_eq!(idem["applied_twice"], 0, "{idem}");
    assert_eq!(idem["zombies"], 1, "{idem}");
    assert!(idem["zombies_fenced"].as_u64().unwrap() >= 1, "{idem}");
    assert!(naive["applied_twice"].as_u64().unwrap() > 0, "{naive}");
    // the schedule is the seed's: the same kill plans every time
    let (_, again) = chaos(&["--seed", "11", "--zombies", "1", "--no-naive"]);
    assert_eq!(again["schedule"], r["schedule"]);
}

#[test]
fn chaos_without_derived_keys_shows_the_gate_window_and_fails() {
    // seed 17 plans two of its workers' lives to end at after-effect: the effect ran,
    // `complete` did not (a tail kill may land on a duplicate and stop before its ack instead)
    let (out, r) = chaos(&["--seed", "17", "--no-derived-keys", "--no-naive"]);
    let idem = &r["idemgate"];
    assert!(
        idem["kills_by_point"]["after-effect"].as_u64().unwrap() > 0,
        "{idem}"
    );
    assert!(idem["applied_twice"].as_u64().unwrap() > 0, "{idem}");
    assert_eq!(out.status.code(), Some(1), "applied twice fails the run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("applied twice"));
}

#[test]
fn chaos_refuses_flags_that_do_not_go_together() {
    for (args, says) in [
        (
            &["chaos", "--mode", "inbox", "--store", "redis://127.0.0.1"][..],
            "inbox mode needs a postgres://, mysql:// or sqlite: store",
        ),
        (
            &[
                "chaos",
                "--mode",
                "inbox",
                "--store",
                "postgres://x/y",
                "--zombies",
                "1",
            ][..],
            "--zombies needs gate mode",
        ),
        (
            &["chaos", "--store-restarts", "1"][..],
            "--store-restart-cmd",
        ),
        (&["chaos", "--cuts", "1"][..], "--cuts works on"),
    ] {
        let out = idemgate(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}: {out:?}"
        );
    }
}

/// `chaos --http` on SQLite: clients that disconnect and retry, the service killed at every
/// point; naive shows the damage, idemgate answers every request with its one effect.
#[test]
fn chaos_http_applies_every_request_once_through_kills_and_disconnects() {
    let out = idemgate(&[
        "chaos", "--http", "--events", "300", "--kills", "4", "--seed", "17", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = |run: &str, field: &str| v[run][field].as_u64().unwrap();
    for run in ["naive", "idemgate"] {
        assert_eq!(n(run, "events"), 300);
        assert_eq!(n(run, "kills"), 4, "{run}: not the kills asked");
        assert_eq!(n(run, "lost"), 0, "{run}: a client got no answer");
        for point in [
            "after-claim",
            "after-effect",
            "before-complete",
            "mid-response",
        ] {
            assert_eq!(
                v[run]["kills_by_point"][point], 1,
                "{run}: no kill at {point}"
            );
        }
    }
    assert!(n("naive", "retries") > 0 && n("idemgate", "disconnects") > 0);
    assert!(
        n("naive", "applied_twice") > 0,
        "the naive run shows no damage: {v}"
    );
    assert_eq!(n("idemgate", "applied_twice"), 0, "{v}");
    // a client that disconnects and retries never runs the handler a second time
    assert!(n("naive", "reran_without_kill") > 0, "{v}");
    assert_eq!(n("idemgate", "reran_without_kill"), 0, "{v}");
    assert_eq!(n("idemgate", "wrong_answers"), 0, "{v}");
    assert_eq!(n("idemgate", "unapplied"), 0, "{v}");
}

/// `idemgate chaos --bridge` on RabbitMQ: the bridge and the Python service killed in turn; the
/// naive chain applies events twice, the bridge through the proxy to a keyed service applies
/// each once.
#[test]
fn chaos_bridge_applies_every_event_once_through_kills_of_the_bridge_and_the_service() {
    let out = idemgate(&[
        "chaos", "--bridge", "--broker", "rabbitmq", "--events", "400", "--kills", "6", "--seed",
        "23", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = |run: &str, field: &str| v[run][field].as_u64().unwrap();
    for run in ["naive", "idemgate"] {
        assert_eq!(n(run, "events"), 400);
        assert_eq!(n(run, "kills_bridge"), 3, "{run}: {v}");
        assert_eq!(n(run, "kills_service"), 3, "{run}: {v}");
        assert_eq!(n(run, "lost"), 0, "{run}: {v}");
    }
    assert!(n("naive", "applied_twice") > 0, "{v}");
    assert_eq!(n("idemgate", "applied_twice"), 0, "{v}");
}

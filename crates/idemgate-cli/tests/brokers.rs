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
    let options =
        idemgate::sqs::QueueOptions::default().visibility_timeout(Duration::from_secs(10));
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

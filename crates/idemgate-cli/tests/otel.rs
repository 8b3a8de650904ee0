//! `--otlp` (feature `otel`): the bridge's delivery spans reach an OTLP/HTTP collector, here a
//! listener in the test that keeps what is POSTed to `/v1/traces`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A collector that answers 200 to every request and keeps the bodies sent to `/v1/traces`.
fn collector() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&got);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let kept = Arc::clone(&kept);
            std::thread::spawn(move || serve(stream, &kept));
        }
    });
    (port, got)
}

fn serve(stream: TcpStream, kept: &Mutex<Vec<u8>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut head = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        if head.starts_with("POST /v1/traces") {
            kept.lock().unwrap().extend_from_slice(&body);
        }
        out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
    }
}

/// The sidecar tests' Python service; its port.
fn upstream() -> (std::process::Child, u16) {
    let mut child = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../idemgate-sidecar/tests/common/upstream.py"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().parse().unwrap())
}

fn calls(port: u16) -> usize {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /calls HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1;
    let all: serde_json::Map<String, serde_json::Value> = serde_json::from_str(body).unwrap();
    all.len()
}

#[test]
fn the_bridge_exports_a_span_per_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let queue_file = dir.path().join("queue.db");
    let queue = idemgate::sqlite::SqliteQueue::open(&queue_file, "orders").unwrap();
    for i in 0..5 {
        queue
            .send_event(
                format!("{{\"n\": {i}}}").as_bytes(),
                &format!("otel-{i}"),
                None,
            )
            .unwrap();
    }
    let (collector_port, spans) = collector();
    let (mut service, port) = upstream();
    let store = format!("sqlite:{}", dir.path().join("bridge.db").display());
    let mut bridge = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .arg("--otlp")
        .arg(format!("http://127.0.0.1:{collector_port}"))
        .args([
            "bridge",
            "--broker",
            "embedded",
            "--from",
            "orders",
            "--queue-file",
        ])
        .arg(&queue_file)
        .args(["--store", &store, "--header", "x-user: bridge", "--to"])
        .arg(format!("http://127.0.0.1:{port}/events"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while calls(port) < 5 {
        assert!(
            Instant::now() < deadline,
            "the bridge delivered {} of 5",
            calls(port)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // a graceful stop flushes the last batch of spans
    let killed = Command::new("kill")
        .args(["-TERM", &bridge.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = bridge.wait().unwrap();
    let _ = service.kill();
    let _ = service.wait();
    assert!(status.success(), "the bridge ended with {status}");
    let got = spans.lock().unwrap().clone();
    let has = |s: &str| got.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(
        has("idemgate.delivery"),
        "no delivery span reached the collector ({} bytes)",
        got.len()
    );
    for i in 0..5 {
        assert!(
            has(&format!("otel-{i}")),
            "no span carries the event id otel-{i}"
        );
    }
}

//! `idemgate proxy` as a user starts it, in front of the Python service of the sidecar's tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

/// Kills the process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` and returns it with the first line it printed.
fn spawn(cmd: &mut Command) -> (Killed, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Killed(child), line.trim().to_owned())
}

/// One HTTP/1.1 request on its own connection: (status, head, body).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: 2\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n{}");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[test]
fn the_proxy_refuses_to_start_without_a_principal_source() {
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args([
            "proxy",
            "--upstream",
            "http://127.0.0.1:9",
            "--store",
            "memory:",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--principal-header"), "{err}");
}

#[test]
fn a_bad_route_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, "[[route]]\npath = \"/a\"\nlease = \"soon\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args([
            "proxy",
            "--upstream",
            "http://127.0.0.1:9",
            "--store",
            "memory:",
            "--unscoped",
        ])
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lease = \"soon\""), "{err}");
}

#[test]
fn the_proxy_replays_a_retry_serves_metrics_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (_upstream, port) = spawn(Command::new("python3").arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../idemgate-sidecar/tests/common/upstream.py"
    )));
    let store = format!("sqlite:{}", dir.path().join("keys.db").display());
    let (mut proxy, line) = spawn(Command::new(env!("CARGO_BIN_EXE_idemgate")).args([
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &format!("http://127.0.0.1:{port}"),
        "--store",
        &store,
        "--principal-header",
        "x-user",
    ]));
    let addr = line
        .strip_prefix("listening on ")
        .expect("the address first")
        .to_owned();
    let headers = [("x-user", "alice"), ("idempotency-key", "pay-1")];
    let (status, head, first) = request(&addr, "POST", "/payments", &headers);
    assert_eq!(status, 201, "{head}");
    let (status, head, again) = request(&addr, "POST", "/payments", &headers);
    assert_eq!(status, 201);
    assert!(head.contains("idempotent-replayed: true"), "{head}");
    assert_eq!(again, first);
    let (_, _, calls) = request(&format!("127.0.0.1:{port}"), "GET", "/calls", &[]);
    assert!(calls.contains("\"alice|pay-1\": 1"), "{calls}");
    let (status, _, metrics) = request(&addr, "GET", "/metrics", &[]);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("idemgate_http_total{outcome=\"replayed\"} 1"),
        "{metrics}"
    );
    let (status, _, _) = request(&addr, "GET", "/healthz", &[]);
    assert_eq!(status, 200);
    let pid = proxy.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = proxy.0.wait().unwrap();
    assert!(status.success(), "a graceful stop: {status}");
}

//! `idemgate bridge` as a user starts it: duplicates from a broker reach the Python service of
//! the sidecar's tests once each, through `idemgate proxy`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python service; its port.
fn upstream() -> (Killed, u16) {
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
    (Killed(child), line.trim().parse().unwrap())
}

/// `idemgate proxy` in front of the service on `port`, keys scoped by `x-user`; its address.
fn proxy(port: u16) -> (Killed, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["proxy", "--listen", "127.0.0.1:0", "--store", "memory:"])
        .args(["--principal-header", "x-user", "--upstream"])
        .arg(format!("http://127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    (Killed(child), addr)
}

/// `idemgate bridge` with `args`, delivering through `proxy` as principal `bridge`.
fn bridge(store: &str, proxy: &str, args: &[&str]) -> Killed {
    Killed(
        Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .arg("bridge")
            .args(args)
            .args(["--store", store, "--header", "x-user: bridge", "--to"])
            .arg(format!("http://{proxy}/events"))
            .spawn()
            .unwrap(),
    )
}

/// The service's call counts of the bridge's keys.
fn calls(port: u16) -> serde_json::Map<String, serde_json::Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /calls HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1;
    let all: serde_json::Map<String, serde_json::Value> = serde_json::from_str(body).unwrap();
    all.into_iter()
        .filter(|(k, _)| k.starts_with("bridge|"))
        .collect()
}

/// Waits until the service saw `n` distinct keys (60 s at most), then checks each came once.
fn expect_each_once(port: u16, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = calls(port);
        if seen.len() >= n {
            // a second copy would come right behind the first: give it the chance
            std::thread::sleep(Duration::from_millis(500));
            let seen = calls(port);
            assert_eq!(seen.len(), n, "{seen:?}");
            let twice: Vec<_> = seen.iter().filter(|(_, v)| **v != 1).collect();
            assert!(twice.is_empty(), "called more than once: {twice:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} after 60 s",
            seen.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_bridge_delivers_each_event_of_the_embedded_queue_once() {
    let dir = tempfile::tempdir().unwrap();
    let queue_file = dir.path().join("queue.db");
    let queue = idemgate::sqlite::SqliteQueue::open(&queue_file, "orders").unwrap();
    for _ in 0..2 {
        for i in 0..100 {
            queue
                .send_event(
                    format!("{{\"n\": {i}}}").as_bytes(),
                    &format!("order-{i}"),
                    None,
                )
                .unwrap();
        }
    }
    let (_service, port) = upstream();
    let (_proxy, addr) = proxy(port);
    let store = format!("sqlite:{}", dir.path().join("bridge.db").display());
    let queue_file = queue_file.display().to_string();
    let args = [
        "--broker",
        "embedded",
        "--queue-file",
        &queue_file,
        "--from",
        "orders",
    ];
    let _bridge = bridge(&store, &addr, &args);
    expect_each_once(port, 100);
}

#[cfg(feature = "brokers")]
mod brokers {
    use super::*;
    use idemgate::consumer::{Outgoing, Sink};
    use idemgate::core::EventId;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn events(destination: &str) -> Vec<Outgoing> {
        (0..2)
            .flat_map(|_| 0..100u64)
            .map(|i| {
                let id = EventId::sequence("bridge-test", i).unwrap();
                Outgoing::with_event_id(destination, format!("{{\"n\": {i}}}"), id)
            })
            .collect()
    }

    #[test]
    fn the_bridge_delivers_each_event_of_a_rabbitmq_queue_once() {
        let queue = format!("idemgate-bridge-{}", std::process::id());
        block_on(async {
            let rabbit = idemgate::rabbitmq::RabbitMq::connect("amqp://127.0.0.1:5672")
                .await
                .expect("RabbitMQ is required");
            rabbit.declare(&queue).await.unwrap();
            let sink = rabbit.sink().await.unwrap();
            for e in events(&queue) {
                sink.publish(&e).await.unwrap();
            }
        });
        let (_service, port) = upstream();
        let (_proxy, addr) = proxy(port);
        let dir = tempfile::tempdir().unwrap();
        let store = format!("sqlite:{}", dir.path().join("bridge.db").display());
        let _bridge = bridge(&store, &addr, &["--broker", "rabbitmq", "--from", &queue]);
        expect_each_once(port, 100);
    }

    #[test]
    fn the_bridge_delivers_each_event_of_a_nats_stream_once() {
        let stream = format!("idemgate-bridge-{}", std::process::id());
        let subject = format!("{stream}.orders");
        block_on(async {
            let nats = idemgate::nats::Nats::connect("nats://127.0.0.1:4222")
                .await
                .expect("NATS is required");
            // the second copies come after the stream's duplicate window: they reach the
            // stream, and the bridge's Gate absorbs them
            nats.stream(
                &stream,
                vec![format!("{stream}.>")],
                Duration::from_millis(100),
            )
            .await
            .unwrap();
            let sink = nats.sink();
            for (i, e) in events(&subject).iter().enumerate() {
                if i == 100 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                sink.publish(e).await.unwrap();
            }
        });
        let (_service, port) = upstream();
        let (_proxy, addr) = proxy(port);
        let dir = tempfile::tempdir().unwrap();
        let store = format!("sqlite:{}", dir.path().join("bridge.db").display());
        let args = ["--broker", "nats", "--from", &stream, "--subject", &subject];
        let _bridge = bridge(&store, &addr, &args);
        expect_each_once(port, 100);
        block_on(async {
            let nats = idemgate::nats::Nats::connect("nats://127.0.0.1:4222")
                .await
                .unwrap();
            let _ = nats.delete_stream(&stream).await;
        });
    }
}

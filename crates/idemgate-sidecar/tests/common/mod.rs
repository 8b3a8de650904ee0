//! The Python service behind the proxy and the bridge in the tests.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use idemgate::{MemoryStore, StoreExt};
use idemgate_sidecar::{Proxy, ProxyOptions, Routes};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The Python service; killed when dropped.
pub struct Upstream {
    _child: Child,
    pub port: u16,
}

pub async fn python_upstream(port: Option<u16>) -> Upstream {
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/common/upstream.py"
    ));
    if let Some(p) = port {
        cmd.arg(p.to_string());
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs the upstream service");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("the upstream starts within 10 s")
    .unwrap();
    Upstream {
        _child: child,
        port: line.trim().parse().expect("the upstream prints its port"),
    }
}

/// The upstream's call counts, by `principal|key`.
pub async fn calls(upstream: &Upstream) -> serde_json::Value {
    reqwest::get(format!("http://127.0.0.1:{}/calls", upstream.port))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A proxy serving on a free port until `stop` is sent.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<Result<bool, idemgate_sidecar::ProxyError>>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn shut_down(mut self) -> bool {
        let _ = self.stop.take().expect("once").send(());
        self.served.await.unwrap().unwrap()
    }
}

pub async fn proxy(
    upstream_port: u16,
    routes: &str,
    opts: impl FnOnce(ProxyOptions) -> ProxyOptions,
) -> Running {
    let routes = if routes.is_empty() {
        Routes::guard_all()
    } else {
        Routes::from_toml(routes).unwrap()
    };
    let options = opts(ProxyOptions::new(
        format!("http://127.0.0.1:{upstream_port}").parse().unwrap(),
        Some("x-user".parse().unwrap()),
    ));
    let proxy = Proxy::new(MemoryStore::new().boxed(), routes, options).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(proxy.serve(listener, async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stop: Some(stop),
        served,
    }
}

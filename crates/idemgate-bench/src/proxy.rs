//! `idemgate bench proxy`: `idemgate proxy` guarding every POST, the same proxy guarding
//! nothing, and nginx as a plain reverse proxy, in front of one upstream, loaded by wrk.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Args;
use http_body_util::Full;
use hyper::body::Bytes;
use idemgate_sidecar::{Proxy, ProxyOptions, Route, Routes};

use crate::{BoxError, median};

/// `idemgate bench proxy`.
#[derive(Debug, Args)]
pub struct ProxyBench {
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3600))]
    seconds: u32,
    /// Rounds; ratios are taken within each round, then their median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Open connections (wrk `-c`).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    connections: u32,
    /// wrk's threads (`-t`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// The Redis store of the Redis rows.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Leave nginx out (where it is not installed: `scripts/bench-tools` installs it).
    #[arg(long)]
    no_nginx: bool,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

/// One wrk measurement.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

const ROWS: [&str; 6] = [
    "nginx",
    "proxy, nothing guarded",
    "proxy, memory store, fresh keys",
    "proxy, Redis store, fresh keys",
    "proxy, memory store, replays",
    "proxy, Redis store, replays",
];

const FRESH: &str = r#"
local counter = 0
local n = 0
function setup(thread)
  thread:set("tid", n)
  n = n + 1
end
function init(args)
  prefix = args[1] or "k"
end
request = function()
  counter = counter + 1
  local key = prefix .. "-" .. tid .. "-" .. counter
  return wrk.format("POST", "/orders", {["Idempotency-Key"] = key, ["X-User"] = "bench",
    ["Content-Type"] = "application/json"}, '{"amount": 100}')
end
"#;

const REPLAY: &str = r#"
local counter = 0
function init(args)
  prefix = args[1] or "k"
end
request = function()
  counter = counter + 1
  local key = prefix .. "-" .. (counter % 100)
  return wrk.format("POST", "/orders", {["Idempotency-Key"] = key, ["X-User"] = "bench",
    ["Content-Type"] = "application/json"}, '{"amount": 100}')
end
"#;

const NGINX: &str = r#"
worker_processes 2;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  upstream service { server {upstream}; keepalive 64; }
  server {
    listen {listen};
    location / {
      proxy_pass http://service;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
"#;

/// Runs the benchmark.
pub(crate) fn run(b: ProxyBench) -> Result<ExitCode, BoxError> {
    let dir = tempfile::tempdir()?;
    let wrk = which("wrk").ok_or("wrk is not installed: scripts/bench-tools installs it")?;
    let nginx = if b.no_nginx {
        None
    } else {
        Some(
            which("nginx")
                .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.exists()))
                .ok_or("nginx is not installed: scripts/bench-tools installs it (or --no-nginx)")?,
        )
    };
    std::fs::write(dir.path().join("fresh.lua"), FRESH)?;
    std::fs::write(dir.path().join("replay.lua"), REPLAY)?;

    // the upstream on one thread, the proxies on two: the machine's two cores, as nginx's two
    // workers have them
    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let upstream = upstream_rt.block_on(upstream())?;
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let redis = b.redis.clone();
    let (unguarded, memory, on_redis) = proxy_rt.block_on(async move {
        let memory = idemgate::open("memory:").await?;
        let on_redis = idemgate::open(&redis).await?;
        let guarded = || {
            let mut route = Route::new("/{*path}");
            // the bench's records go away soon after
            route.retention = Duration::from_secs(300);
            Routes::from_routes(vec![route])
        };
        Ok::<_, BoxError>((
            serve(memory.clone(), Routes::from_routes(Vec::new())?, upstream).await?,
            serve(memory, guarded()?, upstream).await?,
            serve(on_redis, guarded()?, upstream).await?,
        ))
    })?;
    let nginx_addr = match &nginx {
        Some(bin) => Some(start_nginx(bin, dir.path(), upstream)?),
        None => None,
    };

    let run_id = format!("{:08x}", rand_u32());
    let mut rounds: Vec<[Option<Load>; 6]> = Vec::new();
    for round in 0..b.rounds {
        let mut loads: [Option<Load>; 6] = [None; 6];
        let targets = [
            nginx_addr.as_ref().map(|(a, _)| (*a, "fresh.lua")),
            Some((unguarded, "fresh.lua")),
            Some((memory, "fresh.lua")),
            Some((on_redis, "fresh.lua")),
            Some((memory, "replay.lua")),
            Some((on_redis, "replay.lua")),
        ];
        for (i, target) in targets.iter().enumerate() {
            let Some((addr, script)) = target else {
                continue;
            };
            let prefix = format!("{run_id}-{round}-{i}");
            if *script == "replay.lua" {
                // each of the 100 keys once, so the measurement replays them
                proxy_rt.block_on(warm(*addr, &prefix))?;
            }
            let load = wrk_load(&wrk, &b, dir.path().join(script), *addr, &prefix)?;
            if !b.json {
                eprintln!(
                    "round {}: {:<32} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms{}",
                    round + 1,
                    ROWS[i],
                    load.rps,
                    load.p50_ms,
                    load.p99_ms,
                    if load.errors > 0 {
                        format!("  ({} errors)", load.errors)
                    } else {
                        String::new()
                    }
                );
            }
            loads[i] = Some(load);
        }
        rounds.push(loads);
    }
    if let Some((_, child)) = nginx_addr {
        stop(child);
    }

    let ratio = |a: usize, b: usize| {
        median(rounds.iter().filter_map(|r| match (r[a], r[b]) {
            (Some(x), Some(y)) if y.rps > 0.0 => Some(x.rps / y.rps),
            _ => None,
        }))
    };
    let med =
        |i: usize, f: fn(&Load) -> f64| median(rounds.iter().filter_map(|r| r[i].as_ref().map(f)));
    let rows: Vec<serde_json::Value> = ROWS
        .iter()
        .enumerate()
        .filter(|(i, _)| rounds.iter().any(|r| r[*i].is_some()))
        .map(|(i, name)| {
            serde_json::json!({
                "row": name,
                "rps": med(i, |l| l.rps),
                "p50_ms": med(i, |l| l.p50_ms),
                "p99_ms": med(i, |l| l.p99_ms),
                "errors": rounds.iter().filter_map(|r| r[i].map(|l| l.errors)).sum::<u64>(),
            })
        })
        .collect();
    let ratios = serde_json::json!({
        "memory_vs_unguarded": ratio(2, 1),
        "redis_vs_unguarded": ratio(3, 1),
        "memory_vs_nginx": ratio(2, 0),
        "redis_vs_nginx": ratio(3, 0),
        "unguarded_vs_nginx": ratio(1, 0),
        "memory_replay_vs_unguarded": ratio(4, 1),
        "redis_replay_vs_unguarded": ratio(5, 1),
    });
    if b.json {
        let out = serde_json::json!({
            "seconds": b.seconds, "rounds": b.rounds, "connections": b.connections,
            "threads": b.threads, "rows": rows, "ratios": ratios,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "idemgate bench proxy: {} rounds of {} s, wrk -t{} -c{}, medians",
            b.rounds, b.seconds, b.threads, b.connections
        );
        for r in &rows {
            println!(
                "{:<32} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
                r["row"].as_str().unwrap_or_default(),
                r["rps"].as_f64().unwrap_or_default(),
                r["p50_ms"].as_f64().unwrap_or_default(),
                r["p99_ms"].as_f64().unwrap_or_default()
            );
        }
        let fmt = |k: &str| format!("{:.2}", ratios[k].as_f64().unwrap_or_default());
        println!(
            "guarded / unguarded: memory {}, Redis {} (target 0.9)",
            fmt("memory_vs_unguarded"),
            fmt("redis_vs_unguarded")
        );
        if nginx.is_some() {
            println!(
                "guarded / nginx: memory {}, Redis {} (target 0.8); unguarded / nginx {}",
                fmt("memory_vs_nginx"),
                fmt("redis_vs_nginx"),
                fmt("unguarded_vs_nginx")
            );
        }
        println!(
            "replays / unguarded: memory {}, Redis {}",
            fmt("memory_replay_vs_unguarded"),
            fmt("redis_replay_vs_unguarded")
        );
    }
    drop(proxy_rt);
    drop(upstream_rt);
    Ok(ExitCode::SUCCESS)
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    nanos ^ std::process::id()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The upstream: 201 and a small JSON body to every request.
async fn upstream() -> Result<SocketAddr, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let mut res = http::Response::new(Full::new(Bytes::from_static(
                        br#"{"id":"ord_1","status":"created"}"#,
                    )));
                    *res.status_mut() = http::StatusCode::CREATED;
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, std::convert::Infallible>(res)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A proxy with `routes` on a free port, in front of `upstream`.
async fn serve(
    store: idemgate::BoxStore,
    routes: Routes,
    upstream: SocketAddr,
) -> Result<SocketAddr, BoxError> {
    let opts = ProxyOptions::new(
        format!("http://{upstream}").parse()?,
        Some(http::HeaderName::from_static("x-user")),
    );
    let proxy = Proxy::new(store, routes, opts)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(proxy.serve(listener, std::future::pending()));
    Ok(addr)
}

/// Sends each of the replay script's 100 keys once.
async fn warm(addr: SocketAddr, prefix: &str) -> Result<(), BoxError> {
    let client = reqwest::Client::new();
    for i in 0..100 {
        let res = client
            .post(format!("http://{addr}/orders"))
            .header("idempotency-key", format!("{prefix}-{i}"))
            .header("x-user", "bench")
            .header("content-type", "application/json")
            .body(r#"{"amount": 100}"#)
            .send()
            .await?;
        if !res.status().is_success() {
            return Err(format!("warming the replay keys: {}", res.status()).into());
        }
    }
    Ok(())
}

fn start_nginx(
    bin: &Path,
    dir: &Path,
    upstream: SocketAddr,
) -> Result<(SocketAddr, Child), BoxError> {
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let conf = NGINX
        .replace("{dir}", &dir.display().to_string())
        .replace("{upstream}", &upstream.to_string())
        .replace("{listen}", &listen.to_string());
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(listen).is_ok() {
            return Ok((listen, child));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    Err(format!("nginx did not start: {log}").into())
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One wrk run against `addr` with `script`; parses its summary.
fn wrk_load(
    wrk: &Path,
    b: &ProxyBench,
    script: PathBuf,
    addr: SocketAddr,
    prefix: &str,
) -> Result<Load, BoxError> {
    let out = Command::new(wrk)
        .arg(format!("-t{}", b.threads))
        .arg(format!("-c{}", b.connections))
        .arg(format!("-d{}s", b.seconds))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(format!("http://{addr}/orders"))
        .arg("--")
        .arg(prefix)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    parse_wrk(&text).ok_or_else(|| format!("wrk's output was not understood:\n{text}").into())
}

/// Requests/s, the 50th and 99th latency percentiles, and the non-2xx answers and socket
/// errors of wrk's summary.
fn parse_wrk(text: &str) -> Option<Load> {
    let mut load = Load::default();
    let ms = |v: &str| -> Option<f64> {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = n.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            "m" => n * 60_000.0,
            _ => return None,
        })
    };
    let mut rps = None;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", n] => rps = n.parse().ok(),
            ["50%", v] => load.p50_ms = ms(v)?,
            ["99%", v] => load.p99_ms = ms(v)?,
            ["Non-2xx", "or", "3xx", "responses:", n] => load.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                load.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    load.rps = rps?;
    Some(load)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 10s test @ http://127.0.0.1:1/orders
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  500.00us  20.00ms   90.00%
  Latency Distribution
     50%    1.95ms
     75%    2.20ms
     90%    2.60ms
     99%  850.00us
  150000 requests in 10.00s, 20.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  15000.50
Transfer/sec:      2.00MB
";
        let load = parse_wrk(text).unwrap();
        assert!((load.rps - 15000.5).abs() < 1e-9);
        assert!((load.p50_ms - 1.95).abs() < 1e-9);
        assert!((load.p99_ms - 0.85).abs() < 1e-9);
        assert_eq!(load.errors, 7);
        assert!(parse_wrk("nothing").is_none());
    }
}

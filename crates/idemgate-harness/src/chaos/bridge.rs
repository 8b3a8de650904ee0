//! `idemgate chaos --bridge`: a broker, `idemgate bridge`, `idemgate proxy` and a Python service,
//! with the bridge and the service SIGKILLed mid-run.
//!
//! Events (some published twice) wait on the broker. The idemgate chain is the bridge on its
//! own SQLite Gate store, POSTing through the proxy (its own SQLite store) to a service that
//! records the `Idempotency-Key` with its effect. The naive chain is the bridge on a store in
//! its memory (forgotten at every kill) POSTing straight to a service that applies whatever
//! comes. The supervisor kills the bridge and the service in turn while events flow, restarts
//! them, and counts each event's applications in the service's database.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use idemgate::core::{EventId, Outgoing};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::broker::{ChaosBroker, Producer, create_destination, delete_destination};
use super::{ChaosArgs, worker_exe};
use crate::BoxError;

const SERVICE: &str = include_str!("bridge_service.py");

/// What one chain did.
#[derive(Debug, Default, Serialize)]
struct Figures {
    events: u64,
    published: u64,
    kills_bridge: u32,
    kills_service: u32,
    lost: u64,
    applied_twice: u64,
    extra_applications: u64,
    seconds: f64,
}

/// `idemgate chaos --bridge`.
pub(crate) fn run(args: &ChaosArgs, seed: u64, base: &Path) -> Result<ExitCode, BoxError> {
    let refused = [
        (args.zombies > 0, "--zombies"),
        (args.cuts > 0, "--cuts"),
        (args.store_restarts > 0, "--store-restarts"),
        (args.broker_restarts > 0, "--broker-restarts"),
        (args.report.is_some(), "--report"),
        (args.ledger.is_some(), "--ledger"),
        (args.store.is_some(), "--store"),
        (args.fifo, "--fifo"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        return Err(format!("{flag} does not apply to --bridge").into());
    }
    if !bridged(args.broker) {
        return Err(format!(
            "--bridge runs on the embedded queue, RabbitMQ and NATS, not {}",
            args.broker.name()
        )
        .into());
    }
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| args.broker.default_url().to_owned());
    if !args.json {
        eprintln!(
            "idemgate chaos --bridge: {} broker; {} events, {} kills of the bridge and the service; seed {seed}",
            args.broker.name(),
            args.events,
            args.kills
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let naive = if args.no_naive {
        None
    } else {
        Some(rt.block_on(chain(args, seed, &url, base, false))?)
    };
    let idem = rt.block_on(chain(args, seed, &url, base, true))?;
    let naive_harmless = naive
        .as_ref()
        .is_some_and(|f| f.lost == 0 && f.applied_twice == 0);
    let short = idem.kills_bridge + idem.kills_service < args.kills;
    let failed = idem.lost > 0 || idem.applied_twice > 0 || naive_harmless || short;
    if short {
        eprintln!(
            "idemgate chaos --bridge: only {} of {} kills happened before the events were applied",
            idem.kills_bridge + idem.kills_service,
            args.kills
        );
    }
    if args.json {
        let out = serde_json::json!({
            "seed": seed, "broker": args.broker.name(), "naive": naive, "idemgate": idem,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let row = |name: &str, f: &Figures| {
            println!(
                "{name:<9} {:>5} events {:>5} published | kills: bridge {:>2}, service {:>2} | lost {:>4} | applied twice {:>4} ({} extra) | {:.0} s",
                f.events,
                f.published,
                f.kills_bridge,
                f.kills_service,
                f.lost,
                f.applied_twice,
                f.extra_applications,
                f.seconds
            );
        };
        if let Some(n) = &naive {
            row("naive", n);
        }
        row("idemgate", &idem);
        if naive_harmless {
            println!("the naive chain showed no damage: its kills missed");
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn bridged(b: ChaosBroker) -> bool {
    matches!(b.name(), "embedded" | "rabbitmq" | "nats")
}

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` (stderr to `log`) and waits up to 30 s for a first stdout line starting with
/// `ready`.
fn spawn_ready(cmd: &mut Command, log: &Path, ready: &str) -> Result<Proc, BoxError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| format!("{cmd:?} did not start within 30 s"))?;
    if !line.starts_with(ready) {
        return Err(format!("{cmd:?} did not start: {line:?}").into());
    }
    Ok(Proc(child))
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The processes of one chain, and how to start each again.
struct Chain<'a> {
    dir: &'a Path,
    service: Command,
    bridge: Command,
    log: std::path::PathBuf,
}

impl Chain<'_> {
    fn start_service(&mut self) -> Result<Proc, BoxError> {
        spawn_ready(&mut self.service, &self.log, "ready")
    }

    fn start_bridge(&mut self) -> Result<Proc, BoxError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("bridge.log"))?;
        Ok(Proc(
            self.bridge
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        ))
    }
}

/// Each event's applications, from the service's database.
fn applications(db: &Path) -> Result<std::collections::HashMap<String, u64>, BoxError> {
    let mut counts = std::collections::HashMap::new();
    if !db.exists() {
        return Ok(counts);
    }
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let mut stmt = conn.prepare("SELECT event, count(*) FROM effects GROUP BY event")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (event, n) = row?;
        counts.insert(event, u64::try_from(n).unwrap_or(0));
    }
    Ok(counts)
}

async fn chain(
    args: &ChaosArgs,
    seed: u64,
    url: &str,
    base: &Path,
    idem: bool,
) -> Result<Figures, BoxError> {
    let mode = if idem { "idemgate" } else { "naive" };
    let dir = base.join(format!("bridge-{mode}"));
    std::fs::create_dir_all(&dir)?;
    let ack_wait = Duration::from_secs(2);
    let name = format!("chaos-bridge-{mode}-{:08x}", rand::random::<u32>());
    let destination = create_destination(args.broker, url, &name, &dir, 1, ack_wait, false).await?;
    let producer = Producer::connect(args.broker, url, &destination, &dir, 1).await?;

    // the same events in both chains; a share of them published a second time, after the rest
    let mut rng = StdRng::seed_from_u64(seed);
    let run = format!("{seed:x}");
    let mut figures = Figures {
        events: args.events,
        ..Figures::default()
    };
    let mut again = Vec::new();
    for i in 0..args.events {
        let id = EventId::sequence(format!("bridge-{run}"), i)?;
        let payload =
            serde_json::json!({ "id": id.to_string(), "amount": rng.random_range(1..100) });
        let out = Outgoing::with_event_id(&destination, payload.to_string(), id);
        producer.publish_outgoing(&out).await?;
        if rng.random_bool(args.dup_rate.clamp(0.0, 1.0)) {
            again.push(out);
        }
    }
    for out in &again {
        producer.publish_outgoing(out).await?;
    }
    figures.published = args.events + again.len() as u64;
    drop(producer);

    let exe = worker_exe()?;
    let db = dir.join("service.db");
    let script = dir.join("bridge_service.py");
    std::fs::write(&script, SERVICE)?;
    let service_port = free_port()?;
    let mut service = Command::new("python3");
    service
        .arg(&script)
        .arg(&db)
        .arg(service_port.to_string())
        .arg(if idem { "keyed" } else { "naive" });
    let log = dir.join("processes.log");
    // the proxy, in the idemgate chain only; never killed
    let (_proxy, target) = if idem {
        let port = free_port()?;
        let mut cmd = Command::new(&exe);
        cmd.args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("http://127.0.0.1:{service_port}")])
            .args(["--principal-header", "x-bridge", "--timeout", "10s"])
            .arg("--store")
            .arg(format!("sqlite:{}", dir.join("proxy.db").display()));
        (
            Some(spawn_ready(&mut cmd, &log, "listening on")?),
            format!("http://127.0.0.1:{port}/apply"),
        )
    } else {
        (None, format!("http://127.0.0.1:{service_port}/apply"))
    };
    let mut bridge = Command::new(&exe);
    bridge
        .args(["bridge", "--broker", args.broker.name()])
        .args(["--to", &target, "--header", "x-bridge: chaos"])
        .args(["--lease", "2s", "--ack-wait", "2s", "--max-attempts", "100"])
        .args(["--timeout", "10s", "--concurrency", "8"]);
    if !url.is_empty() {
        bridge.args(["--broker-url", url]);
    }
    match args.broker.name() {
        "embedded" => {
            bridge
                .arg("--queue-file")
                .arg(dir.join("queue.db"))
                .args(["--from", &destination.replace('-', "_")]);
        }
        "nats" => {
            bridge
                .args(["--from", &destination])
                .args(["--subject", &format!("{destination}.events")])
                .args(["--dead-letter", &format!("{destination}.dead")]);
        }
        _ => {
            bridge.args(["--from", &destination]);
        }
    }
    if idem {
        bridge
            .arg("--store")
            .arg(format!("sqlite:{}", dir.join("bridge.db").display()));
    } else {
        bridge.args(["--store", "memory:"]);
    }
    let mut chain = Chain {
        dir: &dir,
        service,
        bridge,
        log,
    };

    let started = Instant::now();
    let mut service_proc = chain.start_service()?;
    let mut bridge_proc = chain.start_bridge()?;
    let deadline = started + Duration::from_secs(args.timeout_secs);
    // the kills spread over the run: the k-th once k/(kills+1) of the events were applied, and
    // never two within 150 ms (the restarted process works a little first)
    let mut kills_left = args.kills;
    let mut last_kill = Instant::now();
    let mut last = (0u64, Instant::now());
    let mut done_at: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let applied = applications(&db)?.len() as u64;
        if applied != last.0 {
            last = (applied, Instant::now());
        }
        // kills while events still flow: bridge and service in turn
        let k = u64::from(args.kills - kills_left) + 1;
        let due = args.events * k / (u64::from(args.kills) + 1);
        if kills_left > 0
            && applied < args.events
            && applied >= due.max(1)
            && last_kill.elapsed() > Duration::from_millis(150)
        {
            if (args.kills - kills_left).is_multiple_of(2) {
                drop(bridge_proc);
                figures.kills_bridge += 1;
                bridge_proc = chain.start_bridge()?;
            } else {
                drop(service_proc);
                figures.kills_service += 1;
                service_proc = chain.start_service()?;
            }
            kills_left -= 1;
            last_kill = Instant::now();
        }
        // a bridge that exited on its own (a broker it lost) starts again
        if bridge_proc.0.try_wait()?.is_some() {
            bridge_proc = chain.start_bridge()?;
        }
        if applied >= args.events {
            // a late second application comes right behind the first: wait a little for it
            let at = *done_at.get_or_insert_with(Instant::now);
            if at.elapsed() > ack_wait + Duration::from_secs(1) {
                break;
            }
        }
        if Instant::now() > deadline || last.1.elapsed() > Duration::from_secs(args.stall_secs) {
            break;
        }
    }
    figures.seconds = started.elapsed().as_secs_f64();
    drop(bridge_proc);
    drop(service_proc);
    let counts = applications(&db)?;
    figures.lost = args.events.saturating_sub(counts.len() as u64);
    figures.applied_twice = counts.values().filter(|n| **n > 1).count() as u64;
    figures.extra_applications = counts.values().map(|n| n.saturating_sub(1)).sum();
    let _ = delete_destination(args.broker, url, &destination).await;
    Ok(figures)
}

//! `idemgate chaos --http`: the HTTP layer under chaos.
//!
//! A real service *process* (`idemgate chaos-http-service`) serves `POST /pay` behind the
//! `IdempotencyLayer` (or, for the naive run, without it) on a SQLite, PostgreSQL or Redis
//! store. Its handler calls a downstream stub in the harness that counts calls and effects
//! apart: like a payment API, the stub applies one effect per `Idempotency-Key` it is sent, and
//! the service sends the key derived from the request's (`RequestKey::derive`). Many concurrent
//! clients send every event's request with the event id as its `Idempotency-Key`, give up on
//! some attempts after a short random timeout (a disconnect, often mid-handler), and retry
//! until they get a definite answer. The harness SIGKILLs the service at named points and
//! restarts it on the same port. At the end every event must have had exactly one effect and
//! a definite answer whose receipt is that effect's.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use clap::{Args, ValueEnum};
use idemgate::core::{
    BoxStore, Claim, ClaimOptions, Fingerprint, Key, Lease, Outcome, Record, Store, StoreExt,
};
use idemgate_http::{IdempotencyLayer, RequestKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{ChaosArgs, Event};
use crate::BoxError;
use crate::arm::Armed;

/// Where the service can be killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum HttpPoint {
    /// The handler started: the key is claimed, nothing sent downstream.
    AfterClaim,
    /// The downstream effect happened; the handler has not returned.
    AfterEffect,
    /// The handler returned; its response is not yet stored (naive: not yet sent).
    BeforeComplete,
    /// Half of the response body is produced.
    MidResponse,
}

impl HttpPoint {
    const ALL: [HttpPoint; 4] = [
        HttpPoint::AfterClaim,
        HttpPoint::AfterEffect,
        HttpPoint::BeforeComplete,
        HttpPoint::MidResponse,
    ];

    fn name(self) -> &'static str {
        match self {
            HttpPoint::AfterClaim => "after-claim",
            HttpPoint::AfterEffect => "after-effect",
            HttpPoint::BeforeComplete => "before-complete",
            HttpPoint::MidResponse => "mid-response",
        }
    }
}

/// What one phase measured.
#[derive(Debug, Default, Serialize)]
struct Figures {
    mode: &'static str,
    events: u64,
    /// HTTP attempts the clients made.
    requests: u64,
    /// Attempts after an event's first.
    retries: u64,
    /// Attempts the client gave up on before an answer (a timeout or a dropped connection).
    disconnects: u64,
    /// 409 answers (the first request with the key still running).
    conflicts: u64,
    kills: u64,
    kills_by_point: BTreeMap<&'static str, u64>,
    store_restarts: u64,
    connection_cuts: u64,
    /// Calls the service made downstream, and events called more than once.
    downstream_calls: u64,
    called_twice: u64,
    /// Events whose handler ran twice with no fault between the two runs (no kill of the
    /// service, no store restart or cut): a retry that ran the handler again.
    reran_without_kill: u64,
    /// Events whose client never got a definite answer.
    lost: u64,
    /// Events whose effect the downstream system applied more than once.
    applied_twice: u64,
    /// Events with no effect at all although their client got an answer.
    unapplied: u64,
    /// Answers whose receipt is not the effect's (a replay of another run's response).
    wrong_answers: u64,
    /// Definite refusals (4xx other than 409) the clients got.
    refused: u64,
    seconds: f64,
}

/// The harness side of `chaos --http`.
pub(crate) fn run(args: &ChaosArgs, seed: u64, base: &Path) -> Result<ExitCode, BoxError> {
    let store = match &args.store {
        Some(url) => url.clone(),
        None => format!("sqlite:{}", base.join("http-store.db").display()),
    };
    let refused = [
        (args.zombies > 0, "--zombies"),
        (args.broker_restarts > 0, "--broker-restarts"),
        (args.report.is_some(), "--report"),
        (args.ledger.is_some(), "--ledger"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        return Err(format!("{flag} does not apply to --http").into());
    }
    if args.store_restarts > 0 && args.store_restart_cmd.is_none() {
        return Err("--store-restarts needs --store-restart-cmd".into());
    }
    if args.cuts > 0
        && !(super::is_postgres(&store) || super::is_mysql(&store) || store.starts_with("redis://"))
    {
        return Err(format!(
            "--cuts works on a postgres://, mysql:// or redis:// store, not {store:?}"
        )
        .into());
    }
    if !args.json {
        eprintln!(
            "idemgate chaos --http: store {store}; {} events, {} clients, {} kills; seed {seed}",
            args.events,
            usize::from(args.workers) * args.concurrency,
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
        Some(rt.block_on(phase(args, seed, &store, base, false))?)
    };
    let idem = rt.block_on(phase(args, seed, &store, base, true))?;
    // without derived keys a kill between the effect and the completion re-applies the effect:
    // that window is what the run shows, so it does not fail on it
    let failed = idem.lost > 0
        || idem.reran_without_kill > 0
        || (idem.applied_twice > 0 && !args.no_derived_keys)
        || idem.unapplied > 0
        || idem.wrong_answers > 0
        || idem.refused > 0
        || idem.kills < u64::from(args.kills);
    if args.json {
        let out =
            serde_json::json!({ "seed": seed, "store": store, "naive": naive, "idemgate": idem });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(naive.as_ref(), &idem);
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_table(naive: Option<&Figures>, idem: &Figures) {
    type Row = (&'static str, fn(&Figures) -> u64);
    let rows: [Row; 16] = [
        ("events", |f| f.events),
        ("requests", |f| f.requests),
        ("  retries", |f| f.retries),
        ("  disconnects", |f| f.disconnects),
        ("  409 while running", |f| f.conflicts),
        ("kills (SIGKILL)", |f| f.kills),
        ("store restarts", |f| f.store_restarts),
        ("connection cuts", |f| f.connection_cuts),
        ("downstream calls", |f| f.downstream_calls),
        ("  events called twice", |f| f.called_twice),
        ("  run twice, no fault between", |f| f.reran_without_kill),
        ("lost (no definite answer)", |f| f.lost),
        ("effects applied twice", |f| f.applied_twice),
        ("answered, not applied", |f| f.unapplied),
        ("answers not the effect's", |f| f.wrong_answers),
        ("refused (4xx)", |f| f.refused),
    ];
    println!("{:<28} {:>12} {:>12}", "", "naive", "idemgate");
    for (name, get) in rows {
        let n = naive.map_or_else(|| "-".to_owned(), |f| get(f).to_string());
        println!("{name:<28} {n:>12} {:>12}", get(idem));
    }
    for point in HttpPoint::ALL {
        let at = |f: &Figures| f.kills_by_point.get(point.name()).copied().unwrap_or(0);
        let n = naive.map_or_else(|| "-".to_owned(), |f| at(f).to_string());
        println!(
            "{:<28} {n:>12} {:>12}",
            format!("  at {}", point.name()),
            at(idem)
        );
    }
}

/// The downstream system: counts calls and effects per event, and applies one effect per
/// idempotency key it is sent (none sent: every call is an effect).
#[derive(Default)]
struct Downstream {
    calls: HashMap<String, u64>,
    // for each event, the (service process generation, store faults so far) of every call
    callers: HashMap<String, Vec<(u64, u64)>>,
    // store restarts and cuts so far
    faults: u64,
    effects: HashMap<String, u64>,
    // the receipt of each event's first effect, and of each key's effect
    receipts: HashMap<String, String>,
    by_key: HashMap<String, String>,
    next: u64,
}

type Shared = Arc<Mutex<Downstream>>;

fn lock(d: &Shared) -> std::sync::MutexGuard<'_, Downstream> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

async fn effect(
    State(down): State<Shared>,
    headers: HeaderMap,
    axum::Json(e): axum::Json<Event>,
) -> String {
    // a remote API finishes what it was sent though its caller hangs up: axum would drop this
    // handler with the connection, so the work runs on a task of its own
    tokio::spawn(apply(down, headers, e))
        .await
        .unwrap_or_default()
}

async fn apply(down: Shared, headers: HeaderMap, e: Event) -> String {
    // a little latency, as a remote API has: client timeouts then fall mid-handler
    let ms =
        e.id.bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31) ^ u64::from(b))
            % 25;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let generation = headers
        .get("x-generation")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(u64::MAX);
    let mut d = lock(&down);
    *d.calls.entry(e.id.clone()).or_default() += 1;
    let faults = d.faults;
    d.callers
        .entry(e.id.clone())
        .or_default()
        .push((generation, faults));
    if let Some(receipt) = key.as_ref().and_then(|k| d.by_key.get(k)) {
        return receipt.clone();
    }
    d.next += 1;
    let receipt = format!("rcpt-{}", d.next);
    *d.effects.entry(e.id.clone()).or_default() += 1;
    d.receipts.entry(e.id).or_insert_with(|| receipt.clone());
    if let Some(k) = key {
        d.by_key.insert(k, receipt.clone());
    }
    receipt
}

/// A listener on `addr` that a restarted process can bind again at once.
fn listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// What a client's request came to.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    disconnects: AtomicU64,
    conflicts: AtomicU64,
    refused: AtomicU64,
    done: AtomicUsize,
    answers: Mutex<HashMap<String, String>>,
}

async fn phase(
    args: &ChaosArgs,
    seed: u64,
    store: &str,
    base: &Path,
    idempotent: bool,
) -> Result<Figures, BoxError> {
    let mode = if idempotent { "idemgate" } else { "naive" };
    let mut rng = StdRng::seed_from_u64(seed);
    let events: Arc<Vec<Event>> = Arc::new(
        (0..args.events)
            .map(|_| Event {
                id: idemgate::core::EventId::new().to_string(),
                amount: rng.random_range(1..=100),
                fails: 0,
                ..Event::default()
            })
            .collect(),
    );
    // the downstream stub
    let down: Shared = Arc::default();
    let stub = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let stub_url = format!("http://{}", stub.local_addr()?);
    let app = Router::new()
        .route("/effect", post(effect))
        .with_state(Arc::clone(&down));
    let stub_task = tokio::spawn(async move { axum::serve(stub, app).await });
    // the service's address: a free port, bound again by every restart
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut service = Service {
        args: vec![
            "chaos-http-service".into(),
            "--listen".into(),
            addr.to_string(),
            "--downstream".into(),
            stub_url,
            "--store".into(),
            store.to_owned(),
            "--lease-ms".into(),
            args.lease_ms.to_string(),
            "--mode".into(),
            mode.into(),
        ],
    };
    if args.no_derived_keys {
        service.args.push("--no-derived-keys".into());
    }
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    let mut proc = service.spawn(0, lines_tx.clone())?;
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let clients = usize::from(args.workers) * args.concurrency;
    let next = Arc::new(AtomicUsize::new(0));
    // the last tenth of the events waits while kills are due, and goes out a few at a time if
    // the clients run dry before they happened: every asked kill finds a request to stop
    let len = events.len();
    let released = Arc::new(AtomicUsize::new(if args.kills == 0 {
        len
    } else {
        len - len / 10
    }));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (events, tally, next) = (Arc::clone(&events), Arc::clone(&tally), Arc::clone(&next));
        let released = Arc::clone(&released);
        let base = format!("http://{addr}");
        let mut rng = StdRng::seed_from_u64(seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9));
        tasks.spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(4)
                .build()?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(e) = events.get(i) else {
                    return Ok::<(), BoxError>(());
                };
                while i >= released.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                request(&http, &base, e, &tally, &mut rng).await;
                tally.done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // the supervisor: arms the service's next kill as the run goes on, kills it where it
    // stopped, and starts it again
    let wanted = u64::from(args.kills);
    let mut kills = 0u64;
    // store restarts, then cuts, at even steps of progress
    let mut store_faults: Vec<(u64, bool)> = (0..args.store_restarts)
        .map(|j| {
            (
                args.events * u64::from(j + 1) / u64::from(args.store_restarts + 1),
                true,
            )
        })
        .chain((0..args.cuts).map(|j| {
            (
                args.events * u64::from(j + 1) / u64::from(args.cuts + 1),
                false,
            )
        }))
        .collect();
    store_faults.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    let (mut restarts, mut cuts) = (0u64, 0u64);
    // restarts run beside the supervisor, which goes on arming and making kills
    let mut faulting = tokio::task::JoinSet::new();
    let log = base.join(format!("http-{mode}.log"));
    let mut by_point: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut armed = false;
    let mut generation = 0u64;
    let first = rng.random_range(0..HttpPoint::ALL.len());
    let deadline = start + Duration::from_secs(args.timeout_secs);
    while !tasks.is_empty() {
        tokio::select! {
            joined = tasks.join_next() => {
                if let Some(joined) = joined {
                    joined??;
                }
            }
            line = lines.recv() => {
                let Some((g, line)) = line else { continue };
                let point = line
                    .strip_prefix("AT ")
                    .and_then(|p| HttpPoint::ALL.into_iter().find(|x| x.name() == p));
                if let (Some(point), true) = (point, g == generation) {
                    proc.child.kill()?;
                    proc.child.wait()?;
                    kills += 1;
                    armed = false;
                    *by_point.entry(point.name()).or_default() += 1;
                    generation += 1;
                    proc = service.spawn(generation, lines_tx.clone())?;
                }
            }
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        let done = tally.done.load(Ordering::Relaxed) as u64;
        // kill k of n once k/(n+1) of nine tenths of the events are answered: spread over the
        // run, retries included
        if !armed && kills < wanted && done >= args.events * 9 / 10 * (kills + 1) / (wanted + 1) {
            // every point in turn, from a seeded start
            let point = HttpPoint::ALL[(first + usize::try_from(kills)?) % HttpPoint::ALL.len()];
            // a service still starting reads the line once it runs
            crate::arm::arm(&mut proc.stdin, point.name())?;
            armed = true;
        }
        let out = released.load(Ordering::Relaxed);
        if out < len {
            if kills >= wanted {
                released.store(len, Ordering::Relaxed);
            } else if done >= out as u64 {
                released.store((out + clients).min(len), Ordering::Relaxed);
            }
        }
        if store_faults.last().is_some_and(|(at, _)| done >= *at) {
            let Some((_, restart)) = store_faults.pop() else {
                continue;
            };
            lock(&down).faults += 1;
            if restart {
                let cmd = args
                    .store_restart_cmd
                    .as_deref()
                    .unwrap_or("true")
                    .to_owned();
                let (log, down) = (log.clone(), Arc::clone(&down));
                faulting.spawn(async move {
                    let done = super::shell(&cmd, &log).await;
                    lock(&down).faults += 1;
                    done
                });
                restarts += 1;
            } else {
                super::cut(store).await?;
                lock(&down).faults += 1;
                cuts += 1;
            }
        }
        if Instant::now() > deadline {
            tasks.abort_all();
            break;
        }
    }
    while let Some(restart) = faulting.join_next().await {
        restart??;
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = proc.child.kill();
    let _ = proc.child.wait();
    stub_task.abort();

    let d = lock(&down);
    let answers = tally.answers.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = Figures {
        mode,
        events: args.events,
        requests: tally.requests.load(Ordering::Relaxed),
        disconnects: tally.disconnects.load(Ordering::Relaxed),
        conflicts: tally.conflicts.load(Ordering::Relaxed),
        refused: tally.refused.load(Ordering::Relaxed),
        kills,
        kills_by_point: by_point,
        store_restarts: restarts,
        connection_cuts: cuts,
        downstream_calls: d.calls.values().sum(),
        called_twice: d.calls.values().filter(|n| **n > 1).count() as u64,
        applied_twice: d.effects.values().filter(|n| **n > 1).count() as u64,
        reran_without_kill: d
            .callers
            .values()
            .filter(|g| (1..g.len()).any(|i| g[..i].contains(&g[i])))
            .count() as u64,
        seconds,
        ..Figures::default()
    };
    f.retries = f.requests.saturating_sub(f.events);
    for e in events.iter() {
        match answers.get(&e.id) {
            None => f.lost += 1,
            Some(receipt) => {
                if !d.effects.contains_key(&e.id) {
                    f.unapplied += 1;
                } else if d.receipts.get(&e.id) != Some(receipt) {
                    f.wrong_answers += 1;
                }
            }
        }
    }
    Ok(f)
}

/// Sends one event's request until it gets a definite answer (or gives up after a minute).
async fn request(http: &reqwest::Client, base: &str, e: &Event, tally: &Tally, rng: &mut StdRng) {
    let give_up = Instant::now() + Duration::from_secs(60);
    while Instant::now() < give_up {
        // one attempt in four gives up early, as a client with a short timeout or a dropped
        // connection does; often while the handler runs
        let timeout = if rng.random_ratio(1, 4) {
            Duration::from_millis(rng.random_range(2..40))
        } else {
            Duration::from_secs(10)
        };
        tally.requests.fetch_add(1, Ordering::Relaxed);
        let sent = http
            .post(format!("{base}/pay"))
            .header("x-user", "chaos-client")
            .header("idempotency-key", &e.id)
            .json(e)
            .timeout(timeout)
            .send()
            .await;
        let answer = match sent {
            Ok(res) => {
                let status = res.status().as_u16();
                (status, res.text().await)
            }
            Err(err) => {
                if err.is_timeout() {
                    tally.disconnects.fetch_add(1, Ordering::Relaxed);
                }
                // refused while the service restarts, reset by a kill: try again
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        match answer {
            (201, Ok(body)) => {
                if let Ok(r) = serde_json::from_str::<Receipt>(&body) {
                    tally
                        .answers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(e.id.clone(), r.receipt);
                    return;
                }
                // a body cut short by a kill: no answer yet
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (409, _) => {
                tally.conflicts.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (status, _) if status >= 500 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (201, Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// The service's answer.
#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    id: String,
    receipt: String,
}

/// How to start the service process.
struct Service {
    args: Vec<String>,
}

struct Proc {
    child: Child,
    stdin: ChildStdin,
}

impl Service {
    /// Starts the service; its stdout lines come back on `lines` tagged with `generation`.
    fn spawn(
        &self,
        generation: u64,
        lines: mpsc::UnboundedSender<(u64, String)>,
    ) -> Result<Proc, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(&self.args)
            .args(["--generation", &generation.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the service's pipes were not set up".into());
        };
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send((generation, line)).is_err() {
                    return;
                }
            }
        });
        Ok(Proc { child, stdin })
    }
}

/// `idemgate chaos-http-service`: the service under test, one process.
#[derive(Debug, Args)]
pub struct ChaosHttpServiceArgs {
    #[arg(long)]
    listen: SocketAddr,
    /// The downstream stub's base URL.
    #[arg(long)]
    downstream: String,
    /// The layer's store URL.
    #[arg(long)]
    store: String,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    lease_ms: u64,
    /// `naive`: no layer, no key sent downstream; `idemgate`: the layer and a derived key.
    #[arg(long, value_parser = ["naive", "idemgate"])]
    mode: String,
    /// Call downstream without the derived key (shows the window between effect and completion).
    #[arg(long)]
    no_derived_keys: bool,
    /// Which life of the service this process is (sent downstream with every call).
    #[arg(long)]
    generation: u64,
}

/// Where the supervisor told the service to stop next.
#[derive(Debug)]
struct Park(Arc<Armed>);

impl Park {
    /// Whether to stop at `p` (it was armed); one request stops there per arming.
    fn here(&self, p: HttpPoint) -> bool {
        self.0.stop_at(p.name())
    }

    /// Stops forever at `p` if it was armed: the supervisor's SIGKILL ends the process.
    async fn at(&self, p: HttpPoint) {
        if self.here(p) {
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Clone)]
struct App {
    park: Arc<Park>,
    http: reqwest::Client,
    downstream: String,
    idempotent: bool,
    derived: bool,
    generation: u64,
}

async fn pay(
    State(app): State<App>,
    key: Option<axum::Extension<RequestKey>>,
    axum::Json(e): axum::Json<Event>,
) -> Result<(StatusCode, Body), StatusCode> {
    app.park.at(HttpPoint::AfterClaim).await;
    let mut call = app
        .http
        .post(format!("{}/effect", app.downstream))
        .header("x-generation", app.generation)
        .json(&e);
    if let (true, Some(axum::Extension(RequestKey(key)))) = (app.idempotent && app.derived, key) {
        // the downstream system's own idempotency key: a re-run after a crash is harmless there
        call = call.header("idempotency-key", key.derive("effect").id());
    }
    let receipt = call
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|_| StatusCode::BAD_GATEWAY)?
        .text()
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?;
    app.park.at(HttpPoint::AfterEffect).await;
    if !app.idempotent {
        // the naive service has no completion: it stops where it would send its answer
        app.park.at(HttpPoint::BeforeComplete).await;
    }
    let body = serde_json::to_vec(&Receipt { id: e.id, receipt })
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let (head, tail) = body.split_at(body.len() / 2);
    let halves = Halves {
        parts: [Bytes::copy_from_slice(head), Bytes::copy_from_slice(tail)],
        next: 0,
        park: app.park,
    };
    Ok((StatusCode::CREATED, Body::new(halves)))
}

/// A response body in two halves; the service may stop between them (`mid-response`).
struct Halves {
    parts: [Bytes; 2],
    next: usize,
    park: Arc<Park>,
}

impl http_body::Body for Halves {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let i = self.next;
        if i == 1 && self.park.here(HttpPoint::MidResponse) {
            // never woken: the supervisor's SIGKILL ends the process
            return Poll::Pending;
        }
        self.next += 1;
        Poll::Ready(
            self.parts
                .get(i)
                .map(|b| Ok(http_body::Frame::data(b.clone()))),
        )
    }
}

/// Opens the layer's store, waiting out an outage as a service restarted by its supervisor
/// does: a restart after a kill may fall in a store restart or a cut.
async fn open_store(url: &str) -> Result<BoxStore, BoxError> {
    let store = super::for_a_minute(|| idemgate::open(url), idemgate::core::Error::is_retryable);
    Ok(store.await?)
}

/// A store that stops before a completion when armed (`before-complete`).
#[derive(Debug, Clone)]
struct Parking {
    inner: BoxStore,
    park: Arc<Park>,
}

impl Store for Parking {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> idemgate::core::Result<Claim> {
        self.inner.claim(key, fp, opts).await
    }

    async fn complete(
        &self,
        lease: &Lease,
        outcome: &Outcome,
        retention: Duration,
    ) -> idemgate::core::Result<()> {
        self.park.at(HttpPoint::BeforeComplete).await;
        self.inner.complete(lease, outcome, retention).await
    }

    async fn release(&self, lease: Lease) -> idemgate::core::Result<()> {
        self.inner.release(lease).await
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> idemgate::core::Result<Lease> {
        self.inner.renew(lease, extend).await
    }

    async fn get(&self, key: &Key) -> idemgate::core::Result<Option<Record>> {
        self.inner.get(key).await
    }

    async fn purge_expired(&self, limit: usize) -> idemgate::core::Result<u64> {
        self.inner.purge_expired(limit).await
    }

    async fn forget(
        &self,
        key: &Key,
        force: bool,
    ) -> idemgate::core::Result<idemgate::core::Forgotten> {
        self.inner.forget(key, force).await
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> idemgate::core::Result<Vec<Claim>> {
        self.inner.claim_many(claims, opts).await
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> idemgate::core::Result<Vec<idemgate::core::Result<()>>> {
        self.park.at(HttpPoint::BeforeComplete).await;
        self.inner.complete_many(done, retention).await
    }
}

/// Runs the service until it is killed.
pub fn serve(args: ChaosHttpServiceArgs) -> Result<ExitCode, BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let park = Arc::new(Park(Armed::listen()));
        let idempotent = args.mode == "idemgate";
        let app = App {
            park: Arc::clone(&park),
            http: reqwest::Client::new(),
            downstream: args.downstream,
            idempotent,
            derived: !args.no_derived_keys,
            generation: args.generation,
        };
        let router = Router::new().route("/pay", post(pay)).with_state(app);
        let router = if idempotent {
            let store = Parking {
                inner: open_store(&args.store).await?,
                park,
            }
            .boxed();
            router.layer(
                IdempotencyLayer::new(store, |p| {
                    p.headers
                        .get("x-user")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                })
                .with_lease(Duration::from_millis(args.lease_ms)),
            )
        } else {
            router
        };
        let listener = listener(args.listen)?;
        println!("READY");
        axum::serve(listener, router).await?;
        Ok(ExitCode::SUCCESS)
    })
}

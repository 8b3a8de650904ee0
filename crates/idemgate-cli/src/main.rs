//! The `idemgate` command: the demo, the proxy and the bridge, and tools to inspect and purge stores.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use idemgate_harness as harness;

mod bridge;
#[cfg(feature = "otel")]
mod otel;
mod proxy;
mod stores;
#[cfg(feature = "brokers")]
mod window;

/// Exactly-once effects on top of at-least-once delivery.
#[derive(Debug, Parser)]
#[command(name = "idemgate", version, about, propagate_version = true)]
struct Cli {
    /// Serve the process's metrics (Prometheus text format) at http://ADDR/metrics while the
    /// command runs: for `bridge`, `chaos` and `bench` (`proxy` serves /metrics on its own
    /// listener).
    #[arg(long, global = true, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Export the spans (each consumer delivery, each Gate run) to an OpenTelemetry collector
    /// over OTLP/HTTP, as in `http://127.0.0.1:4318`.
    #[cfg(feature = "otel")]
    #[arg(long, global = true, value_name = "ENDPOINT")]
    otlp: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the exactly-once demo on embedded defaults: a SQLite queue, real worker processes,
    /// real SIGKILLs, first without idempotency, then with idemgate.
    Demo(harness::DemoArgs),
    /// Measure a store against its raw ceiling, in the same run.
    Bench(idemgate_bench::BenchArgs),
    /// An `Idempotency-Key` reverse proxy in front of a service in any language.
    Proxy(proxy::ProxyArgs),
    /// Consume from a broker and POST each event to a service, its event id as the
    /// `Idempotency-Key` (the embedded queue always; the real brokers with `brokers`).
    Bridge(bridge::BridgeArgs),
    /// Show one key's stored record and what a duplicate arriving now would get, and why.
    #[command(visible_alias = "inspect")]
    Explain(stores::ExplainArgs),
    /// Make a key free again: its completed outcome goes, or (with --force) its live lease;
    /// a tombstone keeps fencing the old lease holder.
    Forget(stores::ForgetArgs),
    /// Delete expired records from a store.
    Purge(stores::PurgeArgs),
    /// Check that a retention covers a broker's redelivery horizon (exit status 1 if not).
    #[cfg(feature = "brokers")]
    CheckWindow(window::CheckWindowArgs),
    /// Run the chaos harness against a broker and store: worker processes killed at named
    /// points, zombies, restarts and cut connections, naive and idemgate side by side (the
    /// embedded queue always; the real brokers with the `brokers` feature).
    Chaos(harness::ChaosArgs),
    /// A worker process of `idemgate demo` and `idemgate chaos`.
    #[command(hide = true)]
    ChaosWorker(harness::ChaosWorkerArgs),
    /// The service of `idemgate chaos --http`.
    #[command(hide = true)]
    ChaosHttpService(harness::ChaosHttpServiceArgs),
    /// A process of `idemgate chaos --pipeline`.
    #[command(hide = true)]
    ChaosPipeline(harness::ChaosPipelineArgs),
}

/// Serves `/metrics` on `addr` from a thread of its own, for the whole run.
fn serve_metrics(addr: std::net::SocketAddr) -> Result<(), BoxError> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    eprintln!("metrics at http://{}/metrics", listener.local_addr()?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = rt.block_on(async { tokio::net::TcpListener::from_std(listener) })?;
    // the recorder is installed before the command starts, so every metric reaches it
    let handle = idemgate_sidecar::install_prometheus()?;
    std::thread::spawn(move || rt.block_on(idemgate_sidecar::serve_recorded(listener, handle)));
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // warnings go to stderr (a store that keeps nothing on disk, a retention shorter than the
    // broker's redelivery window, a broker error); `RUST_LOG` asks for more
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    #[cfg(feature = "otel")]
    let (provider, spans) = match cli.otlp.as_deref().map(otel::layer) {
        None => (None, None),
        Some(Ok((provider, layer))) => (
            Some(provider),
            // the spans at info and above, whatever RUST_LOG asks of the logs
            Some(layer.with_filter(tracing_subscriber::filter::LevelFilter::INFO)),
        ),
        Some(Err(e)) => {
            eprintln!("error: --otlp: {e}");
            return ExitCode::from(2);
        }
    };
    #[cfg(not(feature = "otel"))]
    let spans: Option<tracing_subscriber::layer::Identity> = None;
    tracing_subscriber::registry().with(logs).with(spans).init();
    if let Some(addr) = cli.metrics {
        if matches!(cli.command, Command::Proxy(_)) {
            eprintln!("error: the proxy serves /metrics on its own listener; drop --metrics");
            return ExitCode::from(2);
        }
        if let Err(e) = serve_metrics(addr) {
            eprintln!("error: --metrics {addr}: {e}");
            return ExitCode::from(2);
        }
    }
    let code = run(cli.command);
    #[cfg(feature = "otel")]
    if let Some(provider) = provider
        && let Err(e) = provider.shutdown()
    {
        eprintln!("warning: the last spans may not have reached the collector: {e}");
    }
    code
}

fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Demo(args) => harness::demo(args),
        Command::Bench(args) => idemgate_bench::run(args),
        Command::Proxy(args) => proxy::run(args),
        Command::Bridge(args) => bridge::run(args),
        Command::Explain(args) => stores::explain(args),
        Command::Forget(args) => stores::forget(args),
        Command::Purge(args) => stores::purge(args),
        #[cfg(feature = "brokers")]
        Command::CheckWindow(args) => window::run(args),
        Command::Chaos(args) => harness::chaos(args),
        Command::ChaosWorker(args) => harness::chaos_worker(args),
        Command::ChaosHttpService(args) => harness::chaos_http_service(args),
        Command::ChaosPipeline(args) => harness::chaos_pipeline(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("idemgate: {e}");
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(2)
        }
    }
}

use idemgate::BoxError;

//! `idemgate proxy`: the `Idempotency-Key` reverse proxy in front of a service in any language.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use idemgate_sidecar::{Proxy, ProxyOptions, Routes, install_prometheus};

use crate::BoxError;

#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// Where the proxy listens (port 0: any free port; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The service behind the proxy: `http://host:port[/prefix]`.
    #[arg(long)]
    upstream: String,
    /// The store: `sqlite:PATH`, `postgres://…`, `mysql://…`, `redis://…`,
    /// `redis+cluster://host:port,…` or `memory:`.
    #[arg(long)]
    store: String,
    /// The trusted header with the caller's principal, set by the auth gateway in front of the
    /// proxy: keys are scoped by it.
    #[arg(long, required_unless_present = "unscoped")]
    principal_header: Option<String>,
    /// Every caller shares one key space (any caller can replay any key's response): only for
    /// a service with one principal.
    #[arg(long, conflicts_with = "principal_header")]
    unscoped: bool,
    /// Per-route settings (TOML: paths, methods, lease, retention, limits, profile, wait);
    /// without it, POST and PATCH on every path need an `Idempotency-Key`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How long the upstream has to start its response (504 after it).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// How long a shutdown (SIGTERM, Ctrl-C) waits for running requests.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain: Duration,
}

pub(crate) fn run(args: ProxyArgs) -> Result<ExitCode, BoxError> {
    let routes = match &args.config {
        Some(path) => Routes::from_file(path)?,
        None => Routes::guard_all(),
    };
    let principal = args
        .principal_header
        .as_deref()
        .map(str::parse)
        .transpose()?;
    let opts = ProxyOptions::new(args.upstream.parse()?, principal)
        .with_timeout(args.timeout)
        .with_drain(args.drain)
        .with_metrics(install_prometheus()?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = crate::stores::opened(idemgate::open_checked(&args.store).await?);
        let proxy = Proxy::new(store, routes, opts)?;
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        println!("listening on {addr}");
        std::io::stdout().flush()?;
        eprintln!("idemgate proxy: http://{addr} -> {}", args.upstream);
        let drained = proxy.serve(listener, stop_signal()).await?;
        Ok(if drained {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

/// SIGTERM or Ctrl-C.
async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

//! Futures that stop a consumer: pass one as [`Consumer::run`](crate::Consumer::run)'s
//! `shutdown`. [`StatsHandle::until`](crate::StatsHandle::until) and
//! [`StatsHandle::idle`](crate::StatsHandle::idle) stop on the consumer's own counts.

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM: what a service stops on. `run` then
/// finishes and settles what it received and returns.
///
/// ```no_run
/// # use idemgate_consumer::{Consumer, Message, memory::MemoryBroker, shutdown};
/// # use idemgate_core::MemoryStore;
/// # async fn serve(broker: MemoryBroker) -> Result<(), idemgate_consumer::Error> {
/// let stats = Consumer::gate("emails", MemoryStore::new())
///     .run(broker.source(), |_msg: Message| async { Ok::<_, String>(()) }, shutdown::signal())
///     .await?;
/// # Ok(()) }
/// ```
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // no handler could be installed: never stop on it
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

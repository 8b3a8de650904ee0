//! One demo worker process: the consumer runtime on the embedded queue, as a user would run it.
//!
//! Naive mode receives, applies the effect and acknowledges, with no idempotency. Inbox mode
//! runs `Consumer::inbox` on a `SqliteInbox` in the ledger's file, so the inbox row and the
//! effect commit together; Gate mode runs `Consumer::gate` on a `SqliteStore`, with the effect
//! committed in the ledger outside the store's transaction. When the supervisor arms a kill
//! point (a line `ARM POINT` on stdin), the worker stops at the next delivery that reaches it,
//! says so on stdout and waits for the supervisor's SIGKILL.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use idemgate::consumer::{Consumer, Delivery, HandlerFuture, InboxHandler, Message, Source};
use idemgate::sqlite::{QueueSource, SqliteInbox, SqliteQueue, SqliteStore, SqliteTx, Synchronous};
use idemgate_testkit::kill::{HookedInbox, HookedStore, KillPoint, KillPoints, Watched, id_of};
use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::BoxError;
use crate::arm::{Armed, park};
use crate::demo::{Event, Mode, QUEUE, apply_effect, open_ledger};

/// The settings of one demo worker process.
#[derive(Debug, Args)]
pub struct DemoWorkerArgs {
    /// The phase directory (queue.db, ledger.db, store.db).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Visibility timeout of a receive, in milliseconds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    visibility_ms: u64,
    /// Gate lease, in milliseconds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    lease_ms: u64,
    /// Messages per receive.
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    batch: usize,
}

/// The kill points armed by the supervisor.
#[derive(Debug)]
struct Points(Arc<Armed>);

impl KillPoints for Points {
    fn reach(&self, point: KillPoint, _id: &str) {
        if self.0.stop_at(point.name()) {
            park();
        }
    }
}

fn event_of(msg: &Message) -> Result<Event, BoxError> {
    Ok(serde_json::from_slice(&msg.payload)?)
}

/// Runs one worker until the supervisor kills it.
pub fn run(args: DemoWorkerArgs) -> Result<ExitCode, BoxError> {
    let queue = SqliteQueue::open(args.dir.join("queue.db"), QUEUE)?;
    let source = QueueSource::new(queue, Duration::from_millis(args.visibility_ms))
        .with_batch(args.batch)
        .with_event_id(|body| serde_json::from_slice::<Event>(body).ok().map(|e| e.id));
    let points = Arc::new(Points(Armed::listen()));
    let source = Watched::new(source, Arc::clone(&points));
    // two threads: a worker stopped at a kill point blocks one, and the completions and acks
    // already under way finish on the other, as they would in a process that was not stopped
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let forever = std::future::pending::<()>();
    let lease = Duration::from_millis(args.lease_ms);
    rt.block_on(async move {
        match args.mode {
            Mode::Naive => naive(source, &args, &points).await,
            Mode::Inbox => {
                // the inbox row and the effect in one transaction on the ledger's file
                let inbox =
                    SqliteInbox::open_with(args.dir.join("ledger.db"), Synchronous::Normal)?;
                inbox.migrate().await?;
                let p = Arc::clone(&points);
                let handler = <dyn InboxHandler<SqliteTx, Message>>::from_fn(move |tx, msg| {
                    let p = Arc::clone(&p);
                    let fut: HandlerFuture<'_> = Box::pin(async move {
                        let event = event_of(msg)?;
                        p.reach(KillPoint::AfterClaim, &event.id);
                        apply_effect(tx, &event)?;
                        p.reach(KillPoint::AfterEffect, &event.id);
                        Ok(())
                    });
                    fut
                });
                Consumer::inbox("demo-ledger", HookedInbox::new(inbox, Arc::clone(&points)))
                    .with_concurrency(1)
                    .with_lease(lease)
                    .run(source, handler, forever)
                    .await?;
                Ok(ExitCode::SUCCESS)
            }
            Mode::Gate => {
                // synchronous=NORMAL: every commit survives a process kill, which is what the
                // demo does; FULL (the default) also survives a power cut
                let store = SqliteStore::builder()
                    .with_path(args.dir.join("store.db"))
                    .with_synchronous(Synchronous::Normal)
                    .with_busy_timeout(Duration::from_secs(30))
                    .build()?;
                let ledger = Arc::new(Mutex::new(open_ledger(&args.dir.join("ledger.db"))?));
                let p = Arc::clone(&points);
                let handler = move |msg: Message| {
                    let (ledger, p) = (Arc::clone(&ledger), Arc::clone(&p));
                    async move {
                        let event = event_of(&msg)?;
                        p.reach(KillPoint::AfterClaim, &event.id);
                        // the effect commits in the ledger, outside the store's transaction: a
                        // kill before `complete` leaves it applied but not recorded
                        commit_effect(&ledger, &event)?;
                        p.reach(KillPoint::AfterEffect, &event.id);
                        Ok::<(), BoxError>(())
                    }
                };
                // one claim and one completion per store call: a kill then leaves at most the
                // effect it interrupted applied and not completed
                Consumer::gate("demo-ledger", HookedStore::new(store, Arc::clone(&points)))
                    .with_concurrency(1)
                    .with_batch(1)
                    .with_lease(lease)
                    .with_busy_delay(lease / 2)
                    .with_retention(Duration::from_secs(86_400))
                    .run(source, handler, forever)
                    .await?;
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// Applies `event` in its own ledger transaction.
fn commit_effect(ledger: &Mutex<Connection>, event: &Event) -> Result<(), BoxError> {
    let conn = ledger.lock().unwrap_or_else(|e| e.into_inner());
    let tx = Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)?;
    apply_effect(&tx, event)?;
    tx.commit()?;
    Ok(())
}

/// The consumer without idempotency: receive, apply, acknowledge.
async fn naive<S: Source>(
    mut source: S,
    args: &DemoWorkerArgs,
    points: &Points,
) -> Result<ExitCode, BoxError> {
    let ledger = Mutex::new(open_ledger(&args.dir.join("ledger.db"))?);
    while let Some(d) = source.recv().await? {
        let event = event_of(d.message())?;
        points.reach(KillPoint::AfterClaim, id_of(d.message()));
        commit_effect(&ledger, &event)?;
        points.reach(KillPoint::AfterEffect, &event.id);
        points.reach(KillPoint::AfterComplete, &event.id);
        d.ack().await?;
    }
    Ok(ExitCode::SUCCESS)
}

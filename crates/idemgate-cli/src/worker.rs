//! One demo worker process: receive from the SQLite queue, apply the effect, acknowledge.
//!
//! When the supervisor arms it (a line `ARM POINT` on its stdin), the worker stops at the next
//! message that reaches that named point, says so on stdout and waits for the supervisor's
//! SIGKILL.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;
use idemgate::core::{Fingerprint, Gate, GateError, Key};
use idemgate::sqlite::{Message, SqliteInbox, SqliteQueue, SqliteStore, Synchronous};
use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::BoxError;
use crate::arm::Armed;
use crate::demo::{Event, Mode, Point, QUEUE, apply_effect, open_ledger};

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
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

struct Worker {
    args: WorkerArgs,
    queue: SqliteQueue,
    ledger: Connection,
    inbox: SqliteInbox,
    gate: Option<Gate<SqliteStore>>,
    armed: Arc<Armed>,
}

pub(crate) fn run(args: WorkerArgs) -> Result<ExitCode, BoxError> {
    let queue = SqliteQueue::open(args.dir.join("queue.db"), QUEUE)?;
    let ledger = open_ledger(&args.dir.join("ledger.db"))?;
    let inbox = SqliteInbox::new();
    let gate = match args.mode {
        Mode::Gate => {
            // synchronous=NORMAL: every commit survives a process kill, which is what the demo
            // does; FULL (the default) also survives a power cut
            let store = SqliteStore::builder()
                .with_path(args.dir.join("store.db"))
                .with_synchronous(Synchronous::Normal)
                .with_busy_timeout(Duration::from_secs(30))
                .build()?;
            Some(
                Gate::new(store)
                    .lease(Duration::from_millis(args.lease_ms))
                    .retention(Duration::from_secs(86_400)),
            )
        }
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let armed = Armed::listen();
    let mut w = Worker {
        args,
        queue,
        ledger,
        inbox,
        gate,
        armed,
    };
    rt.block_on(w.run())
}

// A worker is one process with one rusqlite connection on a current-thread runtime: its futures
// hold `&Connection` across awaits and never move between threads.
#[allow(clippy::future_not_send)]
impl Worker {
    async fn run(&mut self) -> Result<ExitCode, BoxError> {
        let visibility = Duration::from_millis(self.args.visibility_ms);
        loop {
            let batch = self.queue.receive(self.args.batch, visibility)?;
            if batch.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            for msg in batch {
                self.handle(&msg).await?;
            }
        }
    }

    /// Stops here if the supervisor armed this point.
    fn point(&self, p: Point) {
        if self.armed.stop_at(p.name()) {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }

    async fn handle(&mut self, msg: &Message) -> Result<(), BoxError> {
        let event: Event = serde_json::from_slice(&msg.body)?;
        match self.args.mode {
            Mode::Naive => {
                self.point(Point::AfterClaim);
                let tx = Transaction::new_unchecked(&self.ledger, TransactionBehavior::Immediate)?;
                apply_effect(&tx, &event)?;
                tx.commit()?;
                self.point(Point::AfterEffect);
                self.point(Point::AfterComplete);
            }
            Mode::Inbox => {
                let key = Key::new("demo-ledger", &event.id)?;
                let tx = Transaction::new_unchecked(&self.ledger, TransactionBehavior::Immediate)?;
                let first = self.inbox.first_time(&tx, &key)?;
                self.point(Point::AfterClaim);
                if first {
                    apply_effect(&tx, &event)?;
                }
                self.point(Point::AfterEffect);
                tx.commit()?;
                self.point(Point::AfterComplete);
            }
            Mode::Gate => {
                let key = Key::new("demo-ledger", &event.id)?;
                let fp = Fingerprint::of_parts([event.id.as_bytes(), &event.amount.to_le_bytes()]);
                let gate = self.gate.clone().expect("gate mode has a gate");
                let this = &*self;
                let result = gate
                    .run(&key, Some(&fp), |_lease| async move {
                        this.point(Point::AfterClaim);
                        // the effect commits in the ledger, outside the store's transaction:
                        // a kill before `complete` leaves it applied but not recorded
                        let tx = this.ledger.unchecked_transaction()?;
                        apply_effect(&tx, &event)?;
                        tx.commit()?;
                        this.point(Point::AfterEffect);
                        Ok::<_, rusqlite::Error>(())
                    })
                    .await;
                match result {
                    Ok(_) => self.point(Point::AfterComplete),
                    Err(GateError::InProgress { lease_until, .. }) => {
                        // another worker holds it: come back when its lease would run out
                        let wait = lease_until
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        self.queue
                            .change_visibility(&msg.receipt, wait + Duration::from_millis(50))?;
                        return Ok(());
                    }
                    Err(GateError::Store(e))
                        if e.is_retryable() || matches!(e, idemgate::core::Error::LeaseLost) =>
                    {
                        // leave the message to its visibility timeout: it comes back and replays
                        return Ok(());
                    }
                    Err(e) => return Err(e.to_string().into()),
                }
            }
        }
        self.point(Point::BeforeAck);
        self.queue.delete(&msg.receipt)?;
        Ok(())
    }
}

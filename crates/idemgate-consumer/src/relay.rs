//! The outbox relay: publishes committed outbox rows through a [`Sink`] and marks them sent.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use idemgate_core::{Outbox, OutboxRow};
use tokio::sync::Notify;

use crate::{Error, Result, Sink};

/// How long a relay that found work keeps looking every [`QUICK_POLL`] before it waits for a
/// notification or its poll interval again.
const QUICK_FOR: Duration = Duration::from_millis(150);
const QUICK_POLL: Duration = Duration::from_millis(10);

/// Publishes an [`Outbox`]'s committed rows through a [`Sink`], and marks each sent only after
/// the sink returned, which is after the broker confirmed it. Every publish of a row, the first
/// and any after a crash, carries the event id fixed when it was enqueued, so the broker (where
/// it deduplicates: NATS `Nats-Msg-Id`, SQS FIFO, Kafka's idempotent producer) and every
/// consumer recognise a re-publish.
///
/// - **Several relays** may run on one outbox: a take leases its rows to its relay
///   ([`with_lease`](Self::with_lease)), so no other relay publishes them unless this one dies
///   (then they leave again, after the lease, with the same ids).
/// - **Order per ordering key**: a take returns a key's rows in order and never a row behind a
///   held or backing-off one; the relay publishes each key's rows one after another, the keys
///   at once. A failed publish holds its key's later rows until it succeeds or is
///   dead-lettered.
/// - **Retries** back off exponentially from 100 ms to 30 s; by default there is no attempt
///   limit, because a broker outage must not dead-letter what waits
///   ([`with_max_attempts`](Self::with_max_attempts) adds one). A message the broker refuses
///   for good ([`Error::Refused`], [`Error::Config`]) is dead-lettered at once with the reason.
/// - **A lost broker**: when every publish has failed for [`with_patience`](Self::with_patience)
///   (60 s), [`run`](Self::run) returns the broker's error, so the caller can connect a new sink
///   (a RabbitMQ or MQTT connection lost to a restart does not come back by itself) and run a
///   relay again. Database failures are waited out.
/// - **Wake-up**: on PostgreSQL a commit's `NOTIFY` wakes a waiting relay; otherwise it polls
///   ([`with_poll`](Self::with_poll), 1 s).
/// - Sent rows are purged after a retention ([`with_retention`](Self::with_retention), 1 day).
/// - Metrics, labelled `relay`: `idemgate_outbox_published_total`,
///   `idemgate_outbox_retried_total`, `idemgate_outbox_dead_lettered_total`, and the gauges
///   `idemgate_outbox_pending`, `idemgate_outbox_oldest_pending_seconds`,
///   `idemgate_outbox_dead`.
///
/// ```
/// use std::time::Duration;
/// use idemgate_consumer::{Relay, memory::MemoryBroker};
/// use idemgate_core::{Inbox, Outbox, Outgoing};
/// use idemgate_sqlite::{SqliteInbox, SqliteOutbox};
///
/// # let dir = tempfile::tempdir().unwrap();
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let path = dir.path().join("app.db");
/// let (inbox, outbox) = (SqliteInbox::open(&path)?, SqliteOutbox::open(&path)?);
/// outbox.migrate().await?;
/// let mut tx = inbox.begin().await?;
/// outbox.enqueue(&mut tx, &Outgoing::new("invoices", "invoice 7")).await?;
/// inbox.commit(tx).await?;
///
/// let broker = MemoryBroker::new();
/// let relay = Relay::new(outbox, broker.clone());
/// assert_eq!(relay.round().await?.published, 1);
/// assert_eq!(broker.queued(), 1);
/// # Ok::<(), idemgate_consumer::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct Relay<O, S> {
    outbox: O,
    sink: S,
    name: String,
    owner: String,
    batch: usize,
    rounds: usize,
    lease: Duration,
    poll: Duration,
    max_attempts: Option<u32>,
    retention: Duration,
    patience: Duration,
}

/// What a relay did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Rows published and marked sent.
    pub published: u64,
    /// Publishes that failed and were put back to be retried.
    pub retried: u64,
    /// Rows dead-lettered.
    pub dead_lettered: u64,
    /// Rows given back unpublished, behind a failed row of their key.
    pub released: u64,
    /// Rows taken.
    pub taken: u64,
}

impl RelayStats {
    fn add(&mut self, o: RelayStats) {
        self.published += o.published;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.released += o.released;
        self.taken += o.taken;
    }
}

/// What became of one row in a round.
enum Fate {
    Sent(i64),
    Retry(i64, Duration, String),
    Dead(i64, String),
    Released(i64),
}

impl<O: Outbox, S: Sink> Relay<O, S> {
    /// A relay named `relay` publishing `outbox`'s rows through `sink`: batches of 256, leases
    /// of 30 s, no attempt limit.
    pub fn new(outbox: O, sink: S) -> Self {
        Relay {
            outbox,
            sink,
            name: "relay".into(),
            owner: format!("relay-{}", idemgate_core::EventId::new()),
            batch: 256,
            rounds: 2,
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(1),
            max_attempts: None,
            retention: Duration::from_secs(86_400),
            patience: Duration::from_secs(60),
        }
    }

    /// The name its metrics and logs carry.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The owner its leases are recorded under (default: a fresh UUIDv7 per relay). Two relays
    /// must not share one.
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// Rows per take (at least 1).
    pub fn with_batch(mut self, rows: usize) -> Self {
        self.batch = rows.max(1);
        self
    }

    /// Rounds in flight while full batches come back (default 2): the next take runs while
    /// the last batch publishes. A round never takes a row behind a row another round holds,
    /// so each key's order holds.
    pub fn with_rounds(mut self, rounds: usize) -> Self {
        self.rounds = rounds.max(1);
        self
    }

    /// How long a take holds its rows: longer than a round's publishes take, since a row whose
    /// lease ran out may be published by another relay too (with the same id).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long an idle relay waits before it looks again when nothing wakes it.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Dead-letters a row after this many failed publishes (default: never).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts.max(1));
        self
    }

    /// How long sent rows are kept.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long every publish may fail before [`run`](Self::run) returns the broker's error.
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// The outbox.
    pub fn outbox(&self) -> &O {
        &self.outbox
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// One round: takes a batch, publishes it and records what became of each row. The last
    /// error of a round in which every publish failed is returned beside the counts, so
    /// [`run`](Self::run) can tell a lost broker.
    pub async fn round(&self) -> Result<RelayStats> {
        self.round_inner().await.map(|(stats, _)| stats)
    }

    async fn round_inner(&self) -> Result<(RelayStats, Option<Error>)> {
        let rows = self
            .outbox
            .take(&self.owner, self.batch, self.lease)
            .await?;
        let mut stats = RelayStats {
            taken: rows.len() as u64,
            ..RelayStats::default()
        };
        if rows.is_empty() {
            return Ok((stats, None));
        }
        // each key's rows in order, one after another; every key (and keyless row) at once
        let mut groups: Vec<Vec<OutboxRow>> = Vec::new();
        let mut by_key: std::collections::HashMap<String, usize> = Default::default();
        for row in rows {
            match row.message.ordering_key.clone() {
                Some(k) => match by_key.get(&k) {
                    Some(&i) => groups[i].push(row),
                    None => {
                        by_key.insert(k, groups.len());
                        groups.push(vec![row]);
                    }
                },
                None => groups.push(vec![row]),
            }
        }
        let fates = join_all(groups.into_iter().map(|g| self.publish_group(g))).await;
        let mut last_error = None;
        let mut sent = Vec::new();
        let mut released = Vec::new();
        for (fates, error) in fates {
            if error.is_some() {
                last_error = error;
            }
            for fate in fates {
                match fate {
                    Fate::Sent(id) => sent.push(id),
                    Fate::Released(id) => released.push(id),
                    Fate::Retry(id, delay, error) => {
                        stats.retried += 1;
                        self.outbox.retry(&self.owner, id, delay, &error).await?;
                    }
                    Fate::Dead(id, reason) => {
                        stats.dead_lettered += 1;
                        tracing::warn!(relay = %self.name, id, %reason, "outbox row dead-lettered");
                        self.outbox.dead_letter(&self.owner, id, &reason).await?;
                    }
                }
            }
        }
        self.outbox.sent(&sent).await?;
        self.outbox.release(&self.owner, &released).await?;
        stats.published = sent.len() as u64;
        stats.released = released.len() as u64;
        let labels = [("relay", self.name.clone())];
        metrics::counter!("idemgate_outbox_published_total", &labels).increment(stats.published);
        metrics::counter!("idemgate_outbox_retried_total", &labels).increment(stats.retried);
        metrics::counter!("idemgate_outbox_dead_lettered_total", &labels)
            .increment(stats.dead_lettered);
        let failed = stats.published == 0 && stats.dead_lettered == 0;
        Ok((stats, last_error.filter(|_| failed)))
    }

    /// Publishes one key's rows in order; stops at the first that fails and gives the rest back.
    async fn publish_group(&self, rows: Vec<OutboxRow>) -> (Vec<Fate>, Option<Error>) {
        let mut fates = Vec::with_capacity(rows.len());
        let mut last_error = None;
        let mut rows = rows.into_iter();
        for row in rows.by_ref() {
            match self.sink.publish(&row.message).await {
                Ok(()) => fates.push(Fate::Sent(row.id)),
                Err(e) => {
                    let reason = error_text(&e);
                    let permanent = matches!(e, Error::Refused { .. } | Error::Config(_));
                    let spent = self.max_attempts.is_some_and(|m| row.attempts >= m);
                    if permanent || spent {
                        fates.push(Fate::Dead(row.id, reason));
                        continue;
                    }
                    tracing::debug!(relay = %self.name, id = row.id, error = %reason, "publish failed; retrying");
                    fates.push(Fate::Retry(row.id, backoff(row.attempts), reason));
                    last_error = Some(e);
                    break;
                }
            }
        }
        fates.extend(rows.map(|r| Fate::Released(r.id)));
        (fates, last_error)
    }

    /// Publishes until `shutdown` resolves (between rounds: a round in flight finishes and
    /// marks what it published), or until every publish has failed for the relay's patience:
    /// then the broker's error.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<RelayStats> {
        // the shutdown future is polled beside the work all along (never only between
        // rounds: one that waits on something a round holds would stall both)
        let stopped = AtomicBool::new(false);
        let stop = Notify::new();
        let watch = async {
            shutdown.await;
            stopped.store(true, Ordering::Relaxed);
            stop.notify_one();
            std::future::pending::<Result<RelayStats>>().await
        };
        tokio::select! {
            r = self.work(&stopped, &stop) => r,
            r = watch => r,
        }
    }

    async fn work(&self, stopped: &AtomicBool, stop: &Notify) -> Result<RelayStats> {
        let mut total = RelayStats::default();
        let mut quick_until = Instant::now();
        let mut failing_since: Option<Instant> = None;
        let mut store_backoff = Duration::from_millis(100);
        let mut last_purge = Instant::now();
        let mut last_gauges: Option<Instant> = None;
        let mut inflight = FuturesUnordered::new();
        loop {
            if inflight.is_empty() {
                if stopped.load(Ordering::Relaxed) {
                    return Ok(total);
                }
                if last_gauges.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    last_gauges = Some(Instant::now());
                    self.gauges().await;
                }
                if last_purge.elapsed() >= Duration::from_secs(60) {
                    last_purge = Instant::now();
                    if let Err(e) = self.outbox.purge_sent(self.retention, 10_000).await {
                        tracing::warn!(relay = %self.name, error = %e, "purging sent rows failed");
                    }
                }
                inflight.push(self.round_inner());
            }
            let Some(done) = inflight.next().await else {
                continue;
            };
            let idle = match done {
                Ok((stats, failure)) => {
                    store_backoff = Duration::from_millis(100);
                    total.add(stats);
                    match failure {
                        Some(e) => {
                            let since = *failing_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= self.patience {
                                return Err(e);
                            }
                        }
                        None if stats.published > 0 || stats.dead_lettered > 0 => {
                            failing_since = None;
                        }
                        None => {}
                    }
                    if stats.taken >= self.batch as u64 {
                        // a full batch: more wait, so the next takes run while this publishes
                        while inflight.len() < self.rounds && !stopped.load(Ordering::Relaxed) {
                            inflight.push(self.round_inner());
                        }
                        continue;
                    }
                    if stats.taken > 0 {
                        quick_until = Instant::now() + QUICK_FOR;
                    }
                    None
                }
                Err(e) => {
                    tracing::warn!(relay = %self.name, error = %e, "outbox failed; retrying");
                    store_backoff = (store_backoff * 2).min(Duration::from_secs(5));
                    Some(store_backoff)
                }
            };
            if !inflight.is_empty() {
                continue;
            }
            let wait = async {
                match idle {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None if Instant::now() < quick_until => tokio::time::sleep(QUICK_POLL).await,
                    None => {
                        if self.outbox.wait(self.poll).await {
                            quick_until = Instant::now() + QUICK_FOR;
                        }
                    }
                }
            };
            tokio::select! {
                () = stop.notified() => return Ok(total),
                () = wait => {}
            }
        }
    }

    async fn gauges(&self) {
        match self.outbox.backlog().await {
            Ok(b) => {
                let labels = [("relay", self.name.clone())];
                metrics::gauge!("idemgate_outbox_pending", &labels).set(b.pending as f64);
                metrics::gauge!("idemgate_outbox_dead", &labels).set(b.dead as f64);
                metrics::gauge!("idemgate_outbox_oldest_pending_seconds", &labels)
                    .set(b.oldest_pending.map_or(0.0, |d| d.as_secs_f64()));
            }
            Err(e) => tracing::debug!(relay = %self.name, error = %e, "reading the backlog failed"),
        }
    }
}

/// The delay before a row's next publish after `attempts` failed: 100 ms doubling to 30 s.
fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(9);
    (Duration::from_millis(100) * (1 << exp)).min(Duration::from_secs(30))
}

/// An error with its causes, for the row's stored reason.
fn error_text(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(40), Duration::from_secs(30));
    }
}

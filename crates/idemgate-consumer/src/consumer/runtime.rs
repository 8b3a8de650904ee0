//! What both modes share: the runtime, its lanes and how a delivery is settled.

use super::*;
/// How a handler's run ended.
pub(crate) enum Ran<E> {
    Done(std::result::Result<(), E>),
    Panicked,
    TimedOut,
}

impl Runtime {
    /// Runs a handler's future with its panics caught and the handler timeout, inside an
    /// `idemgate.delivery` span (consumer, broker, event id, key, attempt); records its time in
    /// `idemgate_consumer_handler_seconds` and counts it slow when it outlasted the lease.
    pub(crate) async fn run_handler<E>(
        &self,
        key: &Key,
        msg: &Message,
        attempt: u32,
        fut: impl Future<Output = std::result::Result<(), E>>,
    ) -> Ran<E> {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "idemgate.delivery",
            consumer = %self.cfg.name,
            broker = self.cfg.broker,
            event_id = msg.event_id.as_deref().unwrap_or(""),
            key = %key,
            attempt,
        );
        let started = tokio::time::Instant::now();
        let ran = match tokio::time::timeout(
            self.cfg.handler_timeout,
            AssertUnwindSafe(fut).catch_unwind(),
        )
        .instrument(span)
        .await
        {
            Ok(Ok(done)) => Ran::Done(done),
            Ok(Err(_panic)) => Ran::Panicked,
            Err(_elapsed) => {
                count!(self, timed_out);
                Ran::TimedOut
            }
        };
        let took = started.elapsed();
        metrics::histogram!("idemgate_consumer_handler_seconds", "consumer" => self.counters.label())
            .record(took.as_secs_f64());
        if took > self.cfg.lease {
            count!(self, slow);
            tracing::warn!(%key, ?took, lease = ?self.cfg.lease, "a handler ran past its lease");
        }
        ran
    }

    /// What a failed run says about itself.
    pub(crate) fn failure<E: fmt::Display + 'static>(&self, ran: Ran<E>) -> Option<Failure> {
        let failed = |error: String| Failure {
            error,
            permanent: false,
        };
        match ran {
            Ran::Done(Ok(())) => None,
            Ran::Done(Err(e)) => Some(Failure {
                permanent: crate::message::is_permanent(&e),
                error: e.to_string(),
            }),
            Ran::Panicked => Some(failed("the handler panicked".into())),
            Ran::TimedOut => Some(failed(format!(
                "the handler timed out after {:?}",
                self.cfg.handler_timeout
            ))),
        }
    }
}

/// A failed run: what it said, and whether it said no retry can help ([`Permanent`]).
///
/// [`Permanent`]: crate::Permanent
pub(crate) struct Failure {
    pub(crate) error: String,
    pub(crate) permanent: bool,
}

/// Why a message is dead-lettered.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Why {
    Poison,
    Mismatch,
    Exhausted,
}

/// How a delivery ends.
pub(crate) enum Settle {
    Ack,
    /// Back to the broker, to come again after the delay.
    Nack(Duration),
    DeadLetter(Why, String),
    /// The stored position it carries is stale: resume its partition from the stored one.
    Reposition,
}

/// The longest wait between two tries of a held delivery, or before a redelivery.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The longest wait between two tries of a store that failed: short, so that a consumer
/// picks up soon after the store is back.
pub(crate) const MAX_STORE_BACKOFF: Duration = Duration::from_secs(5);

/// How often a stored dead letter's key is tried again once its record failed: it must win the
/// race with a copy of the event once the store is back.
pub(crate) const RECORD_RETRY: Duration = Duration::from_millis(100);

/// `base` doubled `n` times, at most [`MAX_BACKOFF`].
pub(crate) fn backoff(base: Duration, n: u32) -> Duration {
    base.saturating_mul(1 << n.min(16)).min(MAX_BACKOFF)
}

/// A wait between half of `d` and `d`, so that held deliveries do not retry in step.
pub(crate) fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// What both modes share: configuration, counters, local attempt counts, and settling.
pub(crate) struct Runtime {
    pub(crate) cfg: Config,
    pub(crate) counters: Arc<Counters>,
    // attempts of keys that failed here, for brokers that do not count deliveries
    pub(crate) attempts: Mutex<HashMap<Key, u32>>,
    // settlements running behind the lanes: one permit each, `settle_slots` in all; their tasks
    // belong to the running consumer (aborted with it, like its lanes)
    pub(crate) settling: Arc<Semaphore>,
    pub(crate) settle_slots: u32,
    pub(crate) behind: Mutex<JoinSet<()>>,
    // set when `run` stops receiving: held deliveries are given back instead of waited on
    pub(crate) stopping: watch::Sender<bool>,
    // set when the source failed (a lost connection): what the lanes have not started is the
    // broker's again, and another consumer may be handling it
    pub(crate) lost: AtomicBool,
}

impl Runtime {
    pub(crate) fn new(cfg: Config) -> Arc<Self> {
        let _ = cfg.counters.name.set(Arc::from(cfg.name.as_str()));
        // as many settlements behind the lanes as handlers by default: a slow store or broker
        // holds the lanes back instead of piling up completed work
        let slots = cfg.settle_slots.unwrap_or(cfg.concurrency);
        let settle_slots = u32::try_from(slots).unwrap_or(u32::MAX);
        Arc::new(Runtime {
            counters: Arc::clone(&cfg.counters),
            cfg,
            attempts: Mutex::default(),
            settling: Arc::new(Semaphore::new(settle_slots as usize)),
            settle_slots,
            behind: Mutex::default(),
            stopping: watch::Sender::new(false),
            lost: AtomicBool::new(false),
        })
    }

    pub(crate) fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Waits `delay`, jittered, before a held delivery's next try; `false` once the consumer is
    /// stopping (give the delivery back).
    pub(crate) async fn pause(&self, delay: Duration) -> bool {
        let mut stopping = self.stopping.subscribe();
        tokio::select! {
            () = tokio::time::sleep(jitter(delay)) => !self.stopping(),
            _ = stopping.wait_for(|s| *s) => false,
        }
    }

    /// Runs `op`, the record of a stored dead letter, again every [`RECORD_RETRY`] while it
    /// fails with a retryable error; the last error once the consumer stops.
    pub(crate) async fn until_recorded<T, Fut>(
        &self,
        mut op: impl FnMut() -> Fut,
    ) -> idemgate_core::Result<T>
    where
        Fut: Future<Output = idemgate_core::Result<T>>,
    {
        loop {
            match op().await {
                Err(e) if e.is_retryable() => {
                    tracing::debug!(error = %e, "recording a dead-lettered key failed");
                    if !self.pause(RECORD_RETRY).await {
                        return Err(e);
                    }
                }
                done => return done,
            }
        }
    }

    /// A store or inbox failure, waited out with the delivery held: `false` once stopping.
    pub(crate) async fn unavailable(
        &self,
        what: &str,
        error: &idemgate_core::Error,
        tries: &mut u32,
    ) -> bool {
        count!(self, store_retries);
        let delay = backoff(self.cfg.retry_delay, *tries).min(MAX_STORE_BACKOFF);
        *tries = tries.saturating_add(1);
        tracing::warn!(consumer = %self.cfg.name, %error, ?delay, "{what} failed; trying again");
        self.pause(delay).await
    }

    /// Settles `d`; `false` when the message went back to the broker (to come again).
    pub(crate) async fn settle<D: Delivery>(self: &Arc<Self>, d: D, settle: Settle) -> bool {
        match settle {
            Settle::Ack => {
                self.ack_behind(d).await;
                true
            }
            Settle::Nack(delay) if d.message().ordering_key.is_none() => {
                // behind the lane, like an ack: a nack with a delay can be a publish and its
                // confirm (RabbitMQ's retry queue). A message with an ordering key is given back
                // from the lane, so the later messages of its key follow it in order.
                let rt = Arc::clone(self);
                self.behind(async move { rt.nack(d, delay).await }).await;
                false
            }
            Settle::Nack(delay) => {
                self.nack(d, delay).await;
                false
            }
            Settle::DeadLetter(why, reason) => self.dead_letter(d, why, reason).await,
            Settle::Reposition => {
                if let Err(e) = d.reposition().await {
                    count!(self, settle_failures);
                    tracing::warn!(error = %e, "repositioning failed; the broker will redeliver");
                }
                false
            }
        }
    }

    /// Runs `settle` (a completion and an ack) behind the lane, so the lane takes its next
    /// delivery while the store and the broker answer. Waits for a free slot first.
    pub(crate) async fn behind(&self, settle: impl Future<Output = ()> + Send + 'static) {
        let Ok(permit) = Arc::clone(&self.settling).acquire_owned().await else {
            // never closed; settle in the lane if it were
            return settle.await;
        };
        let mut tasks = self.behind.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            settle.await;
            drop(permit);
        });
    }

    /// Acks `d` behind the lane.
    pub(crate) async fn ack_behind<D: Delivery>(self: &Arc<Self>, d: D) {
        let rt = Arc::clone(self);
        self.behind(async move { rt.ack(d).await }).await;
    }

    /// Acks `ds` behind the lane, in order, from one task (a committed batch).
    pub(crate) async fn ack_all_behind<D: Delivery>(self: &Arc<Self>, ds: Vec<D>) {
        let rt = Arc::clone(self);
        self.behind(async move {
            for d in ds {
                rt.ack(d).await;
            }
        })
        .await;
    }

    /// Waits until every settlement running behind the lanes has finished.
    pub(crate) async fn settled(&self) {
        let _all = self.settling.acquire_many(self.settle_slots).await;
    }

    pub(crate) fn key(&self, msg: &Message) -> std::result::Result<Key, String> {
        match &self.cfg.key {
            Some(f) => f(msg),
            None => match &msg.event_id {
                Some(id) => Key::new(&self.cfg.name, id).map_err(|e| e.to_string()),
                None => Err("the message has no event id".into()),
            },
        }
    }

    pub(crate) fn fingerprint(&self, msg: &Message) -> std::result::Result<Fingerprint, String> {
        match &self.cfg.fingerprint {
            Some(f) => f(msg),
            None => Ok(Fingerprint::of(&msg.payload)),
        }
    }

    pub(crate) async fn ack<D: Delivery>(&self, d: D) {
        if let Err(e) = d.ack().await {
            count!(self, settle_failures);
            tracing::warn!(error = %e, "ack failed; the broker will redeliver");
        }
    }

    pub(crate) async fn nack<D: Delivery>(&self, d: D, delay: Duration) {
        if let Err(e) = d.nack(delay).await {
            count!(self, settle_failures);
            tracing::warn!(error = %e, "nack failed; the broker will redeliver");
        }
    }

    /// Dead-letters `d`; `true` once the broker stored the dead letter.
    pub(crate) async fn dead_letter<D: Delivery>(&self, d: D, why: Why, reason: String) -> bool {
        tracing::warn!(consumer = %self.cfg.name, %reason, "dead-lettering a message");
        match d.dead_letter(&reason).await {
            Ok(()) => {
                count!(self, dead_lettered);
                match why {
                    Why::Poison => count!(self, dead_lettered_poison),
                    Why::Mismatch => count!(self, dead_lettered_mismatch),
                    Why::Exhausted => count!(self, dead_lettered_exhausted),
                }
                true
            }
            Err(e) => {
                count!(self, settle_failures);
                count!(self, dead_letter_failures);
                tracing::warn!(error = %e, "dead-lettering failed; the message is kept and comes back");
                false
            }
        }
    }

    /// This run's attempt number for `key`: the store's count of runs (Gate mode) or the
    /// broker's delivery count (Inbox mode), or our own count, whichever is highest. Store
    /// failures and busy keys are waited out with the delivery held, so they count in neither.
    /// Runs of `key` started here (since its last success).
    pub(crate) fn local_runs(&self, key: &Key) -> u32 {
        let map = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).copied().unwrap_or(0)
    }

    pub(crate) fn attempt(&self, key: &Key, store: Option<u32>, msg: Option<&Message>) -> u32 {
        let mut map = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 100_000 {
            map.clear();
        }
        let local = map.entry(key.clone()).or_insert(0);
        *local += 1;
        (*local)
            .max(store.unwrap_or(0))
            .max(msg.and_then(|m| m.deliveries).unwrap_or(0))
    }

    pub(crate) fn forget(&self, key: &Key) {
        self.forget_all([key]);
    }

    /// Forgets the attempts of `keys` under one lock.
    pub(crate) fn forget_all<'k>(&self, keys: impl IntoIterator<Item = &'k Key>) {
        let mut map = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            map.remove(key);
        }
    }

    /// What follows a failed run: `Ok(delay)` to retry in place after `delay` (a message with an
    /// ordering key: the ones behind it wait), else how to settle it (nacked with a growing
    /// delay, or dead-lettered when out of attempts).
    pub(crate) fn after_failure(
        &self,
        msg: &Message,
        key: &Key,
        attempt: u32,
        failure: Failure,
    ) -> std::result::Result<Duration, Settle> {
        let Failure { error, permanent } = failure;
        if permanent {
            self.forget(key);
            let reason = format!("the handler refused it for good: {error}");
            return Err(Settle::DeadLetter(Why::Exhausted, reason));
        }
        // the broker's last delivery: after a nack it would drop or dead-letter the message
        // itself, without the reason (a retry in place keeps the delivery)
        let last_delivery = self.cfg.delivery_limit.filter(|limit| {
            msg.ordering_key.is_none() && msg.deliveries.is_some_and(|n| n >= *limit)
        });
        if attempt >= self.cfg.max_attempts || last_delivery.is_some() {
            self.forget(key);
            let reason = match last_delivery {
                Some(limit) if attempt < self.cfg.max_attempts => format!(
                    "the handler failed on the broker's last delivery ({limit}); last error: {error}"
                ),
                _ => format!("the handler failed {attempt} times; last error: {error}"),
            };
            return Err(Settle::DeadLetter(Why::Exhausted, reason));
        }
        count!(self, retried);
        tracing::info!(%key, attempt, %error, "handler failed; retrying");
        let delay = backoff(self.cfg.retry_delay, attempt.saturating_sub(1));
        if msg.ordering_key.is_some() {
            Ok(delay)
        } else {
            Err(Settle::Nack(delay))
        }
    }

    /// Tells the broker every third of the lease that `d` is still being worked on.
    pub(crate) async fn broker_tick<D: Delivery>(&self, d: &D) -> Infallible {
        self.broker_ticks(&[d]).await
    }

    /// Tells the broker that `ds` are still being worked on, three times per lease (or per
    /// broker ack wait, if shorter).
    pub(crate) async fn broker_ticks<D: Delivery>(&self, ds: &[&D]) -> Infallible {
        let period = self.cfg.tick;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            ticker.tick().await;
            for d in ds {
                if let Err(e) = d.in_progress().await {
                    tracing::debug!(error = %e, "in-progress signal failed");
                }
            }
        }
    }
}

/// Handles one delivery from start to settlement.
pub(crate) trait Process<D: Delivery>: Send + Sync + 'static {
    /// `false` when the message went back to the broker, to come again.
    fn process(&self, d: D) -> impl Future<Output = bool> + Send;

    /// Handles deliveries that were ready together on one lane, in order: one answer each.
    fn process_many(&self, ds: Vec<D>) -> impl Future<Output = Vec<bool>> + Send {
        async move {
            let mut settled = Vec::with_capacity(ds.len());
            for d in ds {
                settled.push(self.process(d).await);
            }
            settled
        }
    }
}

/// Receives, dispatches to `n` lanes (same ordering key, same lane), and on shutdown or the
/// source's end lets the lanes finish what they hold.
pub(crate) async fn drive<S, P>(
    rt: &Arc<Runtime>,
    mut source: S,
    process: Arc<P>,
    n: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Stats>
where
    S: Source,
    P: Process<S::Delivery>,
{
    let batch = rt.cfg.tx_batch;
    // a consumer dropped mid-run (its process "dies") drops its settlements too
    let _abort = AbortBehind(rt);
    // messages without an ordering key wait in one queue that every idle lane takes from (as
    // many as are ready, up to a batch); keyed ones go to their own lane, in order
    let (queue, shared) = mpsc::channel::<Arc<S::Delivery>>(n * batch);
    let shared = Arc::new(tokio::sync::Mutex::new(shared));
    // deliveries waiting for a lane are reported in progress too, where the broker has an ack
    // wait: a lane held by a store outage must not let the messages queued behind it expire
    let waiting = Arc::new(Waiting::new((n + 1) * (batch + 1)));
    let _ticking = rt.cfg.ack_wait.then(|| {
        let (rt, waiting) = (Arc::clone(rt), Arc::clone(&waiting));
        AbortOnDrop(tokio::spawn(async move { waiting.tick(&rt).await }))
    });
    let mut lanes = Vec::with_capacity(n);
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let (tx, own) = mpsc::channel::<Arc<S::Delivery>>(batch);
        let lane = lane(
            Arc::clone(rt),
            Arc::clone(&process),
            own,
            Arc::clone(&shared),
        );
        tasks.spawn(lane);
        lanes.push(tx);
    }
    drop(shared);
    let hasher = RandomState::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        let received = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            r = source.recv() => r,
        };
        let d = match received {
            Ok(Some(d)) => d,
            Ok(None) => break Ok(()),
            Err(e) => {
                rt.lost.store(true, Ordering::Relaxed);
                break Err(e);
            }
        };
        count!(rt, received);
        let d = Arc::new(d);
        if rt.cfg.ack_wait {
            waiting.add(&d);
        }
        let sent = match &d.message().ordering_key {
            Some(k) => {
                let lane = usize::try_from(hasher.hash_one(k) % n as u64).unwrap_or(0);
                lanes[lane].send(d).await.map_err(|e| e.0)
            }
            None => queue.send(d).await.map_err(|e| e.0),
        };
        if let Err(d) = sent {
            // a lane is gone (its task panicked): leave the message to the broker
            drop(d);
            break Err(Error::Config("a consumer lane stopped".into()));
        }
    };
    // deliveries held for a busy key or a store outage go back to the broker now
    rt.stopping.send_replace(true);
    drop(queue);
    drop(lanes);
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::error!(error = %e, "a consumer lane failed");
        }
    }
    rt.settled().await;
    result.map(|()| rt.counters.snapshot())
}

/// Deliveries received and not yet taken by a lane, for the in-progress signal.
pub(crate) struct Waiting<D> {
    pub(crate) list: Mutex<Vec<Weak<D>>>,
    // how many can wait at once (the channels' room), to prune the list by
    pub(crate) room: usize,
}

impl<D: Delivery> Waiting<D> {
    pub(crate) fn new(room: usize) -> Self {
        Waiting {
            list: Mutex::new(Vec::with_capacity(2 * room)),
            room,
        }
    }

    pub(crate) fn add(&self, d: &Arc<D>) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() >= 2 * self.room {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Arc::downgrade(d));
    }

    /// Tells the broker, at the runtime's tick, that every waiting delivery is in progress.
    pub(crate) async fn tick(&self, rt: &Runtime) {
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + rt.cfg.tick, rt.cfg.tick);
        loop {
            ticker.tick().await;
            let live: Vec<Arc<D>> = {
                let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|w| w.strong_count() > 0);
                list.iter().filter_map(Weak::upgrade).collect()
            };
            for d in live {
                if let Err(e) = d.in_progress().await {
                    tracing::debug!(error = %e, "in-progress signal failed");
                }
            }
        }
    }
}

/// Takes a delivery out of its waiting handle (the ticker may hold it for a moment).
pub(crate) async fn take<D: Send + Sync>(mut d: Arc<D>) -> D {
    loop {
        match Arc::try_unwrap(d) {
            Ok(d) => return d,
            Err(shared) => {
                d = shared;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One lane: its own (keyed) deliveries first, else whatever the shared queue has ready, up to
/// a batch at a time; ends when both channels have closed and drained.
///
/// Once a message of an ordering key went back to the broker while the consumer stops, the
/// lane gives back the later messages of that key too, unhandled: none overtakes it.
pub(crate) async fn lane<D: Delivery, P: Process<D>>(
    rt: Arc<Runtime>,
    process: Arc<P>,
    mut own: mpsc::Receiver<Arc<D>>,
    shared: Arc<tokio::sync::Mutex<mpsc::Receiver<Arc<D>>>>,
) {
    let batch = rt.cfg.tx_batch;
    let (mut own_open, mut shared_open) = (true, true);
    let (mut mine, mut taken) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
    // ordering keys (hashed: no copy per message) whose last message went back to the broker
    let hasher = RandomState::new();
    let mut given_back: HashSet<u64> = HashSet::new();
    while own_open || shared_open {
        tokio::select! {
            biased;
            k = own.recv_many(&mut mine, batch), if own_open => own_open = k > 0,
            k = async { shared.lock().await.recv_many(&mut taken, batch).await }, if shared_open => {
                shared_open = k > 0;
            }
        }
        for ready in [&mut mine, &mut taken] {
            if ready.is_empty() {
                continue;
            }
            let taken_now = ready.len() as u64;
            let mut ds = Vec::with_capacity(ready.len());
            for d in ready.drain(..) {
                let d = take(d).await;
                if rt.lost.load(Ordering::Relaxed) {
                    // its connection is gone: handling it now could run behind a consumer the
                    // broker gave it to since (an ordering key's later message first), and its
                    // ack could not be sent. Dropped unsettled, it is redelivered.
                    drop(d);
                    continue;
                }
                match &d.message().ordering_key {
                    Some(k) if rt.stopping() && given_back.contains(&hasher.hash_one(k)) => {
                        rt.nack(d, Duration::ZERO).await;
                    }
                    _ => ds.push(d),
                }
            }
            let keys: Vec<Option<u64>> = ds
                .iter()
                .map(|d| {
                    d.message()
                        .ordering_key
                        .as_ref()
                        .map(|k| hasher.hash_one(k))
                })
                .collect();
            let settled = process.process_many(ds).await;
            for (key, settled) in keys.into_iter().zip(settled) {
                match key {
                    Some(k) if !settled => {
                        given_back.insert(k);
                    }
                    Some(k) if !given_back.is_empty() => {
                        given_back.remove(&k);
                    }
                    _ => {}
                }
            }
            rt.counters.finished.fetch_add(taken_now, Ordering::Relaxed);
        }
    }
}

/// Aborts the settlements still running behind the lanes when `drive` is dropped.
pub(crate) struct AbortBehind<'a>(pub(crate) &'a Runtime);

impl Drop for AbortBehind<'_> {
    fn drop(&mut self) {
        self.0
            .behind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abort_all();
    }
}

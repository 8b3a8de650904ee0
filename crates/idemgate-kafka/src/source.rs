//! The consuming side: a poll thread, per-partition queues, and positions on assignment.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idemgate_consumer::{
    DEAD_LETTER_REASON, DEAD_LETTER_RETRY, Delivery, EVENT_ID, Error, Horizon, Inbox, Message,
    Position, Result, Source,
};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{Headers, Message as _};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Notify;

use crate::{BROKER, Kafka, err, headers, produce};

/// Loads a group's stored positions of one topic: `(group, topic) -> partition -> next offset`.
pub type PositionLoader = Arc<
    dyn Fn(
            String,
            String,
        )
            -> Pin<Box<dyn Future<Output = idemgate_core::Result<BTreeMap<i32, i64>>> + Send>>
        + Send
        + Sync,
>;

/// How a [`KafkaSource`] consumes.
#[derive(Clone)]
#[non_exhaustive]
pub struct SourceOptions {
    positions: Option<PositionLoader>,
    dead_letter_topic: Option<String>,
    buffer: usize,
    revoke_timeout: Duration,
}

impl fmt::Debug for SourceOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceOptions")
            .field("positions", &self.positions.is_some())
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("buffer", &self.buffer)
            .field("revoke_timeout", &self.revoke_timeout)
            .finish()
    }
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            positions: None,
            dead_letter_topic: None,
            buffer: 1000,
            revoke_timeout: Duration::from_secs(30),
        }
    }
}

impl SourceOptions {
    /// Gate mode defaults: Kafka's committed offsets, dead letters to `<topic>.dead`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inbox mode: positions kept by `inbox` ([`Inbox::advance`]) in the effect's transaction,
    /// loaded from it on every partition assignment (Kafka's committed offsets are ignored
    /// where a position is stored).
    pub fn with_positions_from<I: Inbox + Clone>(mut self, inbox: I) -> Self {
        self.positions = Some(Arc::new(move |group: String, topic: String| {
            let inbox = inbox.clone();
            Box::pin(async move { inbox.load_positions(&group, &topic).await })
        }));
        self
    }

    /// Dead letters go to `topic` (default: the message's topic with `.dead` appended).
    pub fn with_dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Messages buffered per partition before it is paused (default 1000).
    pub fn with_buffer(mut self, n: usize) -> Self {
        self.buffer = n.max(1);
        self
    }

    /// How long a revoked partition's in-flight message may take to settle before the
    /// partition is handed over anyway (default 30 s).
    pub fn with_revoke_timeout(mut self, d: Duration) -> Self {
        self.revoke_timeout = d;
        self
    }
}

type PartKey = (Arc<str>, i32);

struct Pending {
    msg: Message,
    offset: i64,
}

/// One assigned partition: what was fetched and not yet handed out, and whether a message is
/// in flight (one at a time, Kafka's order).
struct Part {
    queue: VecDeque<Pending>,
    busy: bool,
    paused: bool,
    /// The stored next offset as this consumer last saw it (Inbox mode).
    expected: Option<i64>,
    generation: u64,
}

#[derive(Default)]
struct State {
    parts: HashMap<PartKey, Part>,
    ready: VecDeque<PartKey>,
    generation: u64,
    failed: Option<String>,
    /// Partitions whose stored position moved under them (generation, the fenced offset): the
    /// poll thread reloads and seeks.
    stale: Vec<(PartKey, u64, i64)>,
}

struct Inner {
    group: String,
    state: Mutex<State>,
    ready: Notify,
    settled: Condvar,
    positions: Option<PositionLoader>,
    runtime: tokio::runtime::Handle,
    revoke_timeout: Duration,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load(&self, topic: &str) -> std::result::Result<BTreeMap<i32, i64>, String> {
        let Some(loader) = &self.positions else {
            return Ok(BTreeMap::new());
        };
        let mut last = String::new();
        for attempt in 0..5u32 {
            match self
                .runtime
                .block_on(loader(self.group.clone(), topic.to_owned()))
            {
                Ok(p) => return Ok(p),
                Err(e) => {
                    tracing::warn!(error = %e, topic, attempt, "loading stored positions failed");
                    last = e.to_string();
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
            }
        }
        Err(last)
    }

    fn assign(&self, c: &BaseConsumer<Ctx>, tpl: &mut TopicPartitionList) {
        let mut loaded: HashMap<String, BTreeMap<i32, i64>> = HashMap::new();
        let elems: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        for (topic, _) in &elems {
            if loaded.contains_key(topic) {
                continue;
            }
            match self.load(topic) {
                Ok(p) => {
                    loaded.insert(topic.clone(), p);
                }
                Err(e) => {
                    // without the stored positions the partitions cannot be consumed safely
                    self.lock().failed = Some(format!("loading stored positions: {e}"));
                    self.ready.notify_one();
                    let _ = c.assign(&TopicPartitionList::new());
                    return;
                }
            }
        }
        let mut state = self.lock();
        state.generation += 1;
        let generation = state.generation;
        for (topic, partition) in elems {
            let expected = loaded.get(&topic).and_then(|p| p.get(&partition)).copied();
            if let Some(next) = expected
                && let Err(e) = tpl.set_partition_offset(&topic, partition, Offset::Offset(next))
            {
                tracing::error!(error = %e, topic, partition, "seeking to the stored position");
            }
            tracing::info!(group = %self.group, topic, partition, ?expected, "partition assigned");
            state.parts.insert(
                (topic.into(), partition),
                Part {
                    queue: VecDeque::new(),
                    busy: false,
                    paused: false,
                    expected,
                    generation,
                },
            );
        }
        drop(state);
        if let Err(e) = c.assign(tpl) {
            tracing::error!(error = %e, "assigning partitions");
        }
    }

    /// Resumes a partition whose stored position moved (a fenced compare-and-set) from the
    /// stored position: what was fetched is dropped and fetched again from there. Runs on the
    /// poll thread, so no fetched message is pushed meanwhile.
    fn reposition(&self, c: &BaseConsumer<Ctx>, key: &PartKey, generation: u64, offset: i64) {
        let stored = match self.load(&key.0) {
            Ok(p) => p.get(&key.1).copied(),
            Err(e) => {
                self.lock().failed = Some(format!("reloading stored positions: {e}"));
                self.ready.notify_one();
                return;
            }
        };
        let paused = {
            let mut state = self.lock();
            let Some(part) = state.parts.get_mut(key) else {
                return;
            };
            if part.generation != generation {
                return;
            }
            part.queue.clear();
            part.expected = stored;
            std::mem::take(&mut part.paused)
        };
        // nothing stored: start again at the fenced message itself
        let next = stored.unwrap_or(offset);
        let (topic, partition) = (&*key.0, key.1);
        tracing::warn!(group = %self.group, topic, partition, next, "resuming from the stored position");
        if paused {
            let _ = c.resume(&one(key));
        }
        if let Err(e) = c.seek(
            topic,
            partition,
            Offset::Offset(next),
            Duration::from_secs(10),
        ) {
            tracing::error!(error = %e, topic, partition, "seeking to the stored position");
            self.lock().failed = Some(format!("seeking {topic}/{partition} to {next}: {e}"));
            self.ready.notify_one();
            return;
        }
        let mut state = self.lock();
        if let Some(part) = state.parts.get_mut(key)
            && part.generation == generation
        {
            part.busy = false;
        }
        drop(state);
        self.settled.notify_all();
    }

    fn revoke(&self, c: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        let keys: Vec<PartKey> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().into(), e.partition()))
            .collect();
        let deadline = Instant::now() + self.revoke_timeout;
        let mut state = self.lock();
        // the next owner must load final positions: let in-flight messages settle first
        // (a partition waiting to be repositioned has nothing in flight)
        while keys.iter().any(|k| {
            state.parts.get(k).is_some_and(|p| p.busy) && !state.stale.iter().any(|s| &s.0 == k)
        }) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(group = %self.group, "revoking partitions with a message in flight");
                break;
            }
            state = self
                .settled
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        for k in &keys {
            state.parts.remove(k);
        }
        drop(state);
        if let Err(e) = c.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "commit on revoke");
        }
        if let Err(e) = c.unassign() {
            tracing::error!(error = %e, "unassigning partitions");
        }
    }

    /// A fetched message joins its partition's queue; a full queue pauses the partition.
    fn push(&self, c: &BaseConsumer<Ctx>, key: PartKey, pending: Pending, buffer: usize) {
        let mut state = self.lock();
        let Some(part) = state.parts.get_mut(&key) else {
            // not (or no longer) ours: whoever owns the partition will fetch it
            return;
        };
        part.queue.push_back(pending);
        let pause = part.queue.len() >= buffer && !part.paused;
        part.paused |= pause;
        if part.queue.len() == 1 && !part.busy {
            state.ready.push_back(key.clone());
            self.ready.notify_one();
        }
        drop(state);
        if pause {
            let _ = c.pause(&one(&key));
        }
    }
}

fn one((topic, partition): &PartKey) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, *partition);
    tpl
}

/// The consumer context: partition assignment goes through [`Inner`].
struct Ctx(Arc<Inner>);

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_to_tracing(level, fac, message);
    }
}

/// librdkafka's log lines as `tracing` events.
pub(crate) fn log_to_tracing(level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        Notice | Info => tracing::info!(target: "librdkafka", fac, "{message}"),
        Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(&self, c: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.0.assign(c, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.0.revoke(c, tpl),
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                self.0.revoke(c, tpl);
            }
        }
    }
}

struct Shared {
    inner: Arc<Inner>,
    consumer: BaseConsumer<Ctx>,
    producer: FutureProducer,
    dead_letter_topic: Option<String>,
    buffer: usize,
}

/// A Kafka consumer group member: see the [crate docs](crate).
pub struct KafkaSource {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    horizon: Horizon,
}

impl fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSource")
            .field("group", &self.shared.inner.group)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    pub(crate) fn start(
        kafka: &Kafka,
        group: &str,
        topics: &[&str],
        options: SourceOptions,
    ) -> Result<Self> {
        if kafka
            .setting("partition.assignment.strategy")
            .is_some_and(|s| s.contains("cooperative"))
        {
            return Err(Error::Config(
                "the cooperative assignment strategy is not supported; use range or roundrobin"
                    .into(),
            ));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Config("a Kafka source needs a Tokio runtime".into()))?;
        let inner = Arc::new(Inner {
            group: group.to_owned(),
            state: Mutex::default(),
            ready: Notify::new(),
            settled: Condvar::new(),
            positions: options.positions,
            runtime,
            revoke_timeout: options.revoke_timeout,
        });
        let consumer: BaseConsumer<Ctx> = kafka
            .config()
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                kafka.setting("auto.offset.reset").unwrap_or("earliest"),
            )
            .create_with_context(Ctx(Arc::clone(&inner)))
            .map_err(err("creating a consumer"))?;
        consumer.subscribe(topics).map_err(err("subscribing"))?;
        let horizon = kafka.horizon();
        let shared = Arc::new(Shared {
            inner,
            consumer,
            producer: kafka.producer()?,
            dead_letter_topic: options.dead_letter_topic,
            buffer: options.buffer,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("idemgate-kafka-{group}"))
            .spawn({
                let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
                move || poll_loop(&shared, &stop)
            })
            .map_err(err("starting the poll thread"))?;
        Ok(KafkaSource {
            shared,
            stop,
            thread: Some(thread),
            horizon,
        })
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        // the poll thread leaves the group on its own (waiting for in-flight messages to
        // settle or be dropped): never block a Tokio worker on it
        self.stop.store(true, Ordering::SeqCst);
        drop(self.thread.take());
    }
}

/// Polls on its own thread: librdkafka's rebalance callbacks (which load positions and wait
/// for in-flight messages) run here, never on a Tokio worker.
fn poll_loop(shared: &Shared, stop: &AtomicBool) {
    let inner = &shared.inner;
    while !stop.load(Ordering::SeqCst) {
        let stale = std::mem::take(&mut inner.lock().stale);
        for (key, generation, offset) in stale {
            inner.reposition(&shared.consumer, &key, generation, offset);
        }
        match shared.consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
            Some(Ok(m)) => {
                let mut msg = Message::new(
                    m.topic(),
                    Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                );
                if let Some(hs) = m.headers() {
                    for h in hs.iter() {
                        let value = Bytes::copy_from_slice(h.value.unwrap_or_default());
                        if h.key == EVENT_ID {
                            msg.event_id = std::str::from_utf8(&value).ok().map(str::to_owned);
                        }
                        msg.headers.push((h.key.to_owned(), value));
                    }
                }
                msg.deliveries = Some(1);
                let key = (Arc::from(m.topic()), m.partition());
                let pending = Pending {
                    msg,
                    offset: m.offset(),
                };
                inner.push(&shared.consumer, key, pending, shared.buffer);
            }
        }
    }
    // leave the group: the revoke callback runs here, then the stored offsets are committed
    if let Err(e) = shared.consumer.close_queue() {
        tracing::warn!(error = %e, "closing the consumer");
        return;
    }
    while !shared.consumer.closed() {
        let _ = shared.consumer.poll(Duration::from_millis(100));
    }
}

impl Source for KafkaSource {
    type Delivery = KafkaDelivery;

    /// How long after a first delivery Kafka may hand a message out again: a member that stops
    /// is noticed within the session timeout (or the poll interval), and its partitions are
    /// replayed from the last commit.
    fn horizon(&self) -> Option<Horizon> {
        Some(self.horizon.clone())
    }

    async fn recv(&mut self) -> Result<Option<KafkaDelivery>> {
        let inner = &self.shared.inner;
        loop {
            let notified = inner.ready.notified();
            let mut resume = None;
            let found = {
                let mut state = inner.lock();
                if let Some(e) = &state.failed {
                    return Err(Error::broker(BROKER, "consuming", e.clone()));
                }
                let state = &mut *state;
                let mut found = None;
                while let Some(key) = state.ready.pop_front() {
                    let Some(part) = state.parts.get_mut(&key) else {
                        continue;
                    };
                    if part.busy {
                        continue;
                    }
                    let Some(mut p) = part.queue.pop_front() else {
                        continue;
                    };
                    part.busy = true;
                    if part.paused && part.queue.len() <= self.shared.buffer / 2 {
                        part.paused = false;
                        resume = Some(key.clone());
                    }
                    if inner.positions.is_some() {
                        p.msg.position = Some(Position::new(
                            inner.group.as_str(),
                            &*key.0,
                            key.1,
                            p.offset,
                            part.expected,
                        ));
                    }
                    found = Some(KafkaDelivery {
                        settled: false,
                        shared: Arc::clone(&self.shared),
                        generation: part.generation,
                        key,
                        offset: p.offset,
                        msg: p.msg,
                    });
                    break;
                }
                found
            };
            if let Some(key) = resume {
                let _ = self.shared.consumer.resume(&one(&key));
            }
            if let Some(d) = found {
                return Ok(Some(d));
            }
            notified.await;
        }
    }
}

/// One message of one partition, in flight until settled.
pub struct KafkaDelivery {
    settled: bool,
    shared: Arc<Shared>,
    key: PartKey,
    generation: u64,
    offset: i64,
    msg: Message,
}

impl fmt::Debug for KafkaDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaDelivery")
            .field("topic", &self.key.0)
            .field("partition", &self.key.1)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl KafkaDelivery {
    /// Frees the partition for its next message: after an ack (the offset is stored for the
    /// commit), or with the same message back at its head (a nack).
    fn settle(&mut self, again: Option<Message>) {
        self.settled = true;
        let inner = &self.shared.inner;
        let mut state = inner.lock();
        let state = &mut *state;
        if let Some(part) = state.parts.get_mut(&self.key)
            && part.generation == self.generation
        {
            match again {
                None => {
                    part.expected = Some(self.offset + 1);
                    let (topic, partition) = (&*self.key.0, self.key.1);
                    // the next offset to consume, stored as given (`store_offsets`); the
                    // single-partition `store_offset` is librdkafka's `rd_kafka_offset_store`,
                    // which adds 1 itself: given `offset + 1` it committed one message past the
                    // acked one, and the partition's next owner skipped that message
                    let mut next = TopicPartitionList::new();
                    let stored = next
                        .add_partition_offset(topic, partition, Offset::Offset(self.offset + 1))
                        .and_then(|()| self.shared.consumer.store_offsets(&next));
                    if let Err(e) = stored {
                        tracing::warn!(error = %e, topic, partition, "storing the offset");
                    }
                }
                Some(msg) => part.queue.push_front(Pending {
                    msg,
                    offset: self.offset,
                }),
            }
            part.busy = false;
            if !part.queue.is_empty() {
                state.ready.push_back(self.key.clone());
                inner.ready.notify_one();
            }
        }
        inner.settled.notify_all();
    }
}

impl Delivery for KafkaDelivery {
    fn message(&self) -> &Message {
        &self.msg
    }

    async fn ack(mut self) -> Result<()> {
        self.settle(None);
        Ok(())
    }

    async fn nack(mut self, delay: Duration) -> Result<()> {
        // Kafka cannot redeliver one message: it comes back here, ahead of its partition
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            self.again();
        });
        Ok(())
    }

    async fn dead_letter(self, reason: &str) -> Result<()> {
        let topic = match &self.shared.dead_letter_topic {
            Some(t) => t.clone(),
            None => format!("{}.dead", self.key.0),
        };
        let m = &self.msg;
        let extra = m
            .headers
            .iter()
            .filter(|(k, _)| k != EVENT_ID)
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .chain([(DEAD_LETTER_REASON, reason.as_bytes())]);
        let event_id = m.event_id.as_deref();
        let produced = produce(
            &self.shared.producer,
            &topic,
            None,
            &m.payload,
            headers(event_id, extra),
        )
        .await;
        match produced {
            Ok(()) => {
                let mut this = self;
                this.settle(None);
                Ok(())
            }
            Err(e) => {
                // kept, and back at the head of its partition after a pause (not a hot loop)
                self.nack(DEAD_LETTER_RETRY).await?;
                Err(e)
            }
        }
    }

    async fn reposition(mut self) -> Result<()> {
        // the partition stays busy until the poll thread has sought to the stored position
        self.settled = true;
        let inner = &self.shared.inner;
        let mut state = inner.lock();
        state
            .stale
            .push((self.key.clone(), self.generation, self.offset));
        Ok(())
    }
}

impl KafkaDelivery {
    /// The message goes back to the head of its partition, as a redelivery.
    fn again(&mut self) {
        let mut again = std::mem::take(&mut self.msg);
        again.redelivered = true;
        again.position = None;
        again.deliveries = Some(again.deliveries.unwrap_or(1) + 1);
        self.settle(Some(again));
    }
}

impl Drop for KafkaDelivery {
    /// Dropped unsettled (a cancelled handler, an aborted consumer): redelivered, never skipped.
    fn drop(&mut self) {
        if !self.settled {
            self.again();
        }
    }
}

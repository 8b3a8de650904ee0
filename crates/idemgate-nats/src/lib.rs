//! NATS JetStream for idemgate consumers and producers, on [async-nats](async_nats).
//!
//! - [`NatsSink`] publishes with `Nats-Msg-Id` set to the event id, so JetStream drops a
//!   re-publish within the stream's duplicate window, and waits for the stream's ack.
//! - [`NatsSource`] pulls from a durable consumer with explicit acks. `ack` is a double ack
//!   (the server confirms it, so an ack lost on the way cannot cause a silent redelivery), `nack`
//!   is a `NAK` with the delay, a long handler sends `+WPI` (in progress) in step with its lease
//!   renewal, and `dead_letter` publishes the message with its reason to a dead-letter subject
//!   and then terminates it (`+TERM`). A dead letter that could not be stored (no subject, or
//!   no stream behind it) is an error, and the original comes back after a second.
//! - [`NatsSource::horizon`] is the redelivery horizon for the window check: `AckWait ×
//!   MaxDeliver`, or the stream's duplicate window if longer.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::context::Publish;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use idemgate_consumer::{
    DEAD_LETTER_REASON, DEAD_LETTER_RETRY, Delivery, EVENT_ID, Error, Horizon, Message,
    ORDERING_KEY, Outgoing, Result, Sink, Source,
};

const BROKER: &str = "nats";

fn err<E: Into<idemgate_consumer::BoxError>>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::broker(BROKER, what, e)
}

/// A connection to a NATS server with JetStream.
#[derive(Debug, Clone)]
pub struct Nats {
    js: jetstream::Context,
}

/// How a [`NatsSource`]'s durable consumer redelivers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// How long the server waits for an ack before redelivering (default 30 s).
    pub ack_wait: Duration,
    /// Deliveries before the server gives up on a message (default 20; -1: unlimited).
    pub max_deliver: i64,
    /// Unacked messages the server hands out at once (default 256).
    pub max_ack_pending: i64,
    /// Messages one pull asks for (default 32). Messages the client holds before the consumer
    /// takes them are not reported in progress, and a dead consumer's are redelivered only
    /// after the ack wait: a small batch keeps both few.
    pub pull_batch: usize,
    /// Where dead letters are published (it must be bound to a stream). `None`: a message that
    /// should be dead-lettered stays in its stream (redelivered until `max_deliver`) and the
    /// source warns at start.
    pub dead_letter_subject: Option<String>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            max_ack_pending: 256,
            pull_batch: 32,
            dead_letter_subject: None,
        }
    }
}

impl ConsumerOptions {
    /// Sets the ack wait.
    pub fn with_ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }

    /// Sets how many messages one pull asks for.
    pub fn with_pull_batch(mut self, n: usize) -> Self {
        self.pull_batch = n;
        self
    }

    /// Sets the dead-letter subject.
    pub fn with_dead_letter_subject(mut self, subject: impl Into<String>) -> Self {
        self.dead_letter_subject = Some(subject.into());
        self
    }
}

impl Nats {
    /// Connects to `nats://host:port`.
    pub async fn connect(url: &str) -> Result<Self> {
        let client = async_nats::connect(url).await.map_err(err("connecting"))?;
        Ok(Nats {
            js: jetstream::new(client),
        })
    }

    /// Creates (or finds) the stream `name` over `subjects`, dropping re-publishes of one
    /// `Nats-Msg-Id` within `duplicate_window`.
    pub async fn stream(
        &self,
        name: &str,
        subjects: Vec<String>,
        duplicate_window: Duration,
    ) -> Result<()> {
        self.js
            .get_or_create_stream(stream::Config {
                name: name.to_owned(),
                subjects,
                duplicate_window,
                ..stream::Config::default()
            })
            .await
            .map_err(err("creating the stream"))?;
        Ok(())
    }

    /// Deletes the stream `name`.
    pub async fn delete_stream(&self, name: &str) -> Result<()> {
        self.js
            .delete_stream(name)
            .await
            .map_err(err("deleting the stream"))?;
        Ok(())
    }

    /// A durable pull consumer `durable` of `stream`, over `filter_subject`.
    pub async fn source(
        &self,
        stream: &str,
        durable: &str,
        filter_subject: &str,
        opts: ConsumerOptions,
    ) -> Result<NatsSource> {
        let (s, duplicate_window) = self.find_stream(stream).await?;
        let consumer = s
            .get_or_create_consumer(
                durable,
                pull::Config {
                    durable_name: Some(durable.to_owned()),
                    filter_subject: filter_subject.to_owned(),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: opts.ack_wait,
                    max_deliver: opts.max_deliver,
                    max_ack_pending: opts.max_ack_pending,
                    ..pull::Config::default()
                },
            )
            .await
            .map_err(err("creating the consumer"))?;
        // the server's own settings: an existing durable keeps its config, whatever `opts` say
        let config = &consumer.cached_info().config;
        let horizon = horizon(config.ack_wait, config.max_deliver, duplicate_window);
        let messages = consumer
            .stream()
            .max_messages_per_batch(opts.pull_batch.max(1))
            .messages()
            .await
            .map_err(err("pulling"))?;
        if opts.dead_letter_subject.is_none() {
            tracing::warn!(
                stream,
                durable,
                "no dead-letter subject: poison messages stay in the stream until max_deliver"
            );
        }
        Ok(NatsSource {
            messages,
            js: self.js.clone(),
            dead: opts.dead_letter_subject.clone(),
            horizon,
            ack_wait: config.ack_wait,
        })
    }

    /// The redelivery horizon of the existing durable consumer `durable` of `stream`, from the
    /// server's config (for `idemgate check-window`).
    pub async fn horizon(&self, stream: &str, durable: &str) -> Result<Horizon> {
        let (s, duplicate_window) = self.find_stream(stream).await?;
        let consumer = s
            .get_consumer::<pull::Config>(durable)
            .await
            .map_err(err("finding the consumer"))?;
        let config = &consumer.cached_info().config;
        Ok(horizon(
            config.ack_wait,
            config.max_deliver,
            duplicate_window,
        ))
    }

    /// The stream `name` and its duplicate window.
    async fn find_stream(&self, name: &str) -> Result<(stream::Stream, Duration)> {
        let s = self
            .js
            .get_stream(name)
            .await
            .map_err(err("finding the stream"))?;
        let duplicate_window = s.cached_info().config.duplicate_window;
        Ok((s, duplicate_window))
    }

    /// A producer.
    pub fn sink(&self) -> NatsSink {
        NatsSink {
            js: self.js.clone(),
        }
    }
}

fn horizon(ack_wait: Duration, max_deliver: i64, duplicate_window: Duration) -> Horizon {
    let (redelivery, basis) = match u32::try_from(max_deliver) {
        Ok(n) if n > 0 => (
            ack_wait.saturating_mul(n).max(duplicate_window),
            format!(
                "AckWait {ack_wait:?} × MaxDeliver {n}; stream duplicate window {duplicate_window:?}"
            ),
        ),
        _ => (
            Duration::MAX,
            "MaxDeliver is unlimited: a message may be redelivered at any time".to_owned(),
        ),
    };
    Horizon {
        broker: BROKER,
        redelivery,
        basis,
    }
}

fn to_headers(pairs: &[(String, Bytes)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (k, v) in pairs {
        if let Ok(v) = std::str::from_utf8(v) {
            headers.append(k.as_str(), v);
        }
    }
    headers
}

async fn publish(js: &jetstream::Context, subject: String, publish: Publish) -> Result<()> {
    js.send_publish(subject, publish)
        .await
        .map_err(err("publishing"))?
        .await
        .map_err(err("waiting for the stream's ack"))?;
    Ok(())
}

/// A JetStream producer.
#[derive(Debug, Clone)]
pub struct NatsSink {
    js: jetstream::Context,
}

impl Sink for NatsSink {
    async fn publish(&self, out: &Outgoing) -> Result<()> {
        let mut headers = to_headers(&out.headers);
        headers.insert(EVENT_ID, out.event_id.as_str());
        if let Some(k) = &out.ordering_key {
            headers.insert(ORDERING_KEY, k.as_str());
        }
        let mut p = Publish::build()
            .payload(out.payload.clone())
            .headers(headers);
        if !out.event_id.is_empty() {
            p = p.message_id(&out.event_id);
        }
        publish(&self.js, out.destination.clone(), p).await
    }
}

/// Deliveries from a durable JetStream pull consumer.
pub struct NatsSource {
    messages: pull::Stream,
    js: jetstream::Context,
    dead: Option<String>,
    horizon: Horizon,
    ack_wait: Duration,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("dead", &self.dead)
            .field("horizon", &self.horizon)
            .finish_non_exhaustive()
    }
}

impl Source for NatsSource {
    type Delivery = NatsDelivery;

    /// How long after a first delivery the server may still deliver the message again.
    fn horizon(&self) -> Option<Horizon> {
        Some(self.horizon.clone())
    }

    /// The consumer's `AckWait`, from the server's config.
    fn ack_wait(&self) -> Option<Duration> {
        Some(self.ack_wait)
    }

    async fn recv(&mut self) -> Result<Option<NatsDelivery>> {
        let Some(next) = self.messages.next().await else {
            return Ok(None);
        };
        let m = next.map_err(err("receiving"))?;
        let headers: Vec<(String, Bytes)> = m
            .headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .flat_map(|(k, vs)| {
                        vs.iter().map(move |v| {
                            (k.to_string(), Bytes::copy_from_slice(v.as_str().as_bytes()))
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut msg = Message::new(m.subject.to_string(), m.payload.clone());
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        msg.event_id = header("Nats-Msg-Id").or_else(|| header(EVENT_ID));
        msg.ordering_key = header(ORDERING_KEY);
        if let Ok(info) = m.info() {
            msg.deliveries = u32::try_from(info.delivered).ok();
            msg.redelivered = info.delivered > 1;
        }
        msg.headers = headers;
        Ok(Some(NatsDelivery {
            msg,
            inner: m,
            js: self.js.clone(),
            dead: self.dead.clone(),
        }))
    }
}

/// One delivery from a [`NatsSource`].
#[derive(Debug)]
pub struct NatsDelivery {
    msg: Message,
    inner: jetstream::Message,
    js: jetstream::Context,
    dead: Option<String>,
}

impl Delivery for NatsDelivery {
    fn message(&self) -> &Message {
        &self.msg
    }

    async fn ack(self) -> Result<()> {
        self.inner.double_ack().await.map_err(err("acking"))
    }

    async fn nack(self, delay: Duration) -> Result<()> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.inner
            .ack_with(AckKind::Nak(delay))
            .await
            .map_err(err("nacking"))
    }

    async fn dead_letter(self, reason: &str) -> Result<()> {
        // the original is terminated only once its dead letter is stored; otherwise it comes
        // back after a pause (terminating it would lose it)
        let retry = AckKind::Nak(Some(DEAD_LETTER_RETRY));
        let Some(subject) = &self.dead else {
            let _ = self.inner.ack_with(retry).await;
            return Err(Error::Broker {
                broker: BROKER,
                message: format!(
                    "no dead-letter subject for {}: the message stays in its stream (set ConsumerOptions::with_dead_letter_subject)",
                    self.msg.source
                ),
                source: None,
            });
        };
        {
            // without the original's Nats-Msg-Id, which the server would drop as a duplicate
            let kept: Vec<_> = self
                .msg
                .headers
                .iter()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("Nats-Msg-Id"))
                .cloned()
                .collect();
            let mut headers = to_headers(&kept);
            headers.insert(DEAD_LETTER_REASON, reason);
            let p = Publish::build()
                .payload(self.msg.payload.clone())
                .headers(headers);
            // stored in the dead-letter stream before the original is terminated
            if let Err(e) = publish(&self.js, subject.clone(), p).await {
                let _ = self.inner.ack_with(retry).await;
                return Err(e);
            }
        }
        self.inner
            .ack_with(AckKind::Term)
            .await
            .map_err(err("terminating"))
    }

    async fn in_progress(&self) -> Result<()> {
        self.inner
            .ack_with(AckKind::Progress)
            .await
            .map_err(err("signalling progress"))
    }
}

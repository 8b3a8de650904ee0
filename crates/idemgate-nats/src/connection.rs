//! The client: streams, consumers and their options.

use super::*;

/// A connection to a NATS server with JetStream.
#[derive(Debug, Clone)]
pub struct Nats {
    pub(crate) js: jetstream::Context,
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
            max_deliver: u32::try_from(config.max_deliver).ok().filter(|n| *n > 0),
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
    pub(crate) async fn find_stream(&self, name: &str) -> Result<(stream::Stream, Duration)> {
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

pub(crate) fn horizon(ack_wait: Duration, max_deliver: i64, duplicate_window: Duration) -> Horizon {
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

//! Welcome emails from user-registered events, exactly once.
//!
//! Events arrive over NATS JetStream. The consumer runs in **Gate mode** on PostgreSQL: the
//! store's table (`<prefix>_sent_emails`) holds one record per `(user id, email type)`, claimed
//! before the email is sent and completed after. The send itself is an external call that cannot
//! share a transaction, so it carries an idempotency key derived from the record's key
//! (`Key::derive("send")`): a handler that crashes after sending and before completing is run
//! again, and the mail service recognises the second call. Every user gets one welcome email.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idemgate::Key;
use idemgate::consumer::{Consumer, GateMode, Message, Outgoing, Sink, Stats};
use idemgate::nats::{ConsumerOptions, Nats};
use idemgate::postgres::PostgresStore;
use serde::{Deserialize, Serialize};

pub use idemgate::BoxError;

/// A user registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    /// The user.
    pub user_id: String,
    /// Where to write.
    pub email: String,
}

/// The sent-email record's key: `(user id, email type)`.
pub fn welcome_key(msg: &Message) -> Result<Key, String> {
    let event: UserRegistered = serde_json::from_slice(&msg.payload).map_err(|e| e.to_string())?;
    Key::compose("sent_emails", [event.user_id.as_str(), "welcome"]).map_err(|e| e.to_string())
}

/// A stub mail service: it counts calls and, per idempotency key, sends once (as mail APIs with
/// idempotency keys do).
#[derive(Debug, Default)]
pub struct MailStub {
    calls: AtomicU64,
    keys: Mutex<HashSet<String>>,
    sent: Mutex<HashMap<String, u32>>,
}

#[derive(Debug, Deserialize, Serialize)]
struct Mail {
    to: String,
    user_id: String,
    template: String,
}

async fn send(
    State(stub): State<Arc<MailStub>>,
    headers: HeaderMap,
    Json(mail): Json<Mail>,
) -> StatusCode {
    stub.calls.fetch_add(1, Ordering::SeqCst);
    let Some(key) = headers.get("idempotency-key").and_then(|k| k.to_str().ok()) else {
        return StatusCode::BAD_REQUEST;
    };
    let first = stub
        .keys
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.to_owned());
    if first {
        *stub
            .sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!("{}/{}", mail.user_id, mail.template))
            .or_default() += 1;
    }
    StatusCode::ACCEPTED
}

impl MailStub {
    /// Serves the stub on an ephemeral loopback port.
    pub async fn start() -> Result<(Arc<Self>, SocketAddr), BoxError> {
        let stub = Arc::new(MailStub::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/send", post(send))
            .with_state(Arc::clone(&stub));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((stub, addr))
    }

    /// Calls received.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Emails sent per `user/template`.
    pub fn sent(&self) -> HashMap<String, u32> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The email service: its store and the mail API it calls.
#[derive(Clone, Debug)]
pub struct Emails {
    store: Arc<PostgresStore>,
    mail: String,
    http: reqwest::Client,
    /// Users whose first send "crashes" after the mail call and before the completion.
    crash_after_send: Arc<Mutex<HashSet<String>>>,
}

impl Emails {
    /// The service on `store` (migrated), calling the mail API at `mail`.
    pub fn new(store: PostgresStore, mail: SocketAddr) -> Self {
        Emails {
            store: Arc::new(store),
            mail: format!("http://{mail}/send"),
            http: reqwest::Client::new(),
            crash_after_send: Arc::default(),
        }
    }

    /// Makes the first handling of these users' events fail after the email went out: the
    /// window between an external effect and its completion.
    pub fn crash_after_sending_to(&self, users: impl IntoIterator<Item = String>) {
        self.crash_after_send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(users);
    }

    /// Whether `user`'s welcome email is recorded as sent (its key completed in the store).
    pub async fn recorded(&self, user: &str) -> Result<bool, BoxError> {
        let key = Key::compose("sent_emails", [user, "welcome"])?;
        let record = idemgate::Store::get(&*self.store, &key).await?;
        Ok(record.is_some_and(|r| r.outcome().is_some()))
    }

    /// The consumer: Gate mode keyed by `(user id, "welcome")`.
    pub fn consumer(&self) -> Consumer<GateMode<Arc<PostgresStore>>> {
        Consumer::gate("emails", Arc::clone(&self.store))
            .with_key(welcome_key)
            .with_concurrency(8)
            .with_retry_delay(Duration::from_millis(50))
    }

    /// The handler: send the welcome email with the derived idempotency key.
    pub fn handler(
        &self,
    ) -> impl Fn(Message) -> std::pin::Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>
    + Send
    + Sync
    + 'static {
        let this = self.clone();
        move |msg: Message| {
            let this = this.clone();
            Box::pin(async move {
                let event: UserRegistered = serde_json::from_slice(&msg.payload)?;
                let key = welcome_key(&msg)?;
                let mail = Mail {
                    to: event.email,
                    user_id: event.user_id.clone(),
                    template: "welcome".into(),
                };
                let status = this
                    .http
                    .post(&this.mail)
                    .header("idempotency-key", key.derive("send").to_string())
                    .json(&mail)
                    .send()
                    .await?
                    .status();
                if !status.is_success() {
                    return Err(format!("the mail service answered {status}").into());
                }
                let crash = this
                    .crash_after_send
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&event.user_id);
                if crash {
                    return Err("crashed after sending, before completing".into());
                }
                Ok(())
            })
        }
    }
}

/// The stream's duplicate window; re-publishes after it reach the consumer.
const WINDOW: Duration = Duration::from_secs(1);

/// A run: `users` registrations published (a quarter again with the same event id past the
/// stream's duplicate window, a quarter again by a second producer with a fresh id), a first
/// consumer that dies on its first acks (NATS redelivers after the ack wait), then a second that
/// drains. Returns the messages published and both consumers' counts.
pub async fn run(
    nats_url: &str,
    emails: &Emails,
    name: &str,
    users: usize,
) -> Result<(usize, Stats, Stats), BoxError> {
    let nats = Nats::connect(nats_url).await?;
    let subject = format!("{name}.registered");
    nats.stream(name, vec![subject.clone()], WINDOW).await?;
    let sink = nats.sink();
    let mut published = 0usize;
    let mut again = Vec::new();
    for u in 0..users {
        let event = UserRegistered {
            user_id: format!("user-{u}"),
            email: format!("user-{u}@example.com"),
        };
        let out = Outgoing::new(&subject, serde_json::to_vec(&event)?);
        sink.publish(&out).await?;
        published += 1;
        if u % 4 == 1 {
            // a second producer, its own event id: only the business key knows
            sink.publish(&Outgoing::new(&subject, serde_json::to_vec(&event)?))
                .await?;
            published += 1;
        }
        if u % 4 == 2 {
            again.push(out);
        }
    }
    tokio::time::sleep(WINDOW + Duration::from_millis(300)).await;
    for out in &again {
        sink.publish(out).await?;
        published += 1;
    }

    let opts = ConsumerOptions::default().with_ack_wait(Duration::from_secs(1));
    let doomed = Nats::connect(nats_url).await?;
    let consumer = emails.consumer().with_lease(Duration::from_millis(900));
    let first_stats = consumer.stats_handle();
    let first_sent = first_stats.until(|s| s.handled > 0);
    let source = doomed
        .source(name, "emails", &subject, opts.clone())
        .await?;
    // the first crashes once it has sent an email: its run is dropped mid-way
    tokio::select! {
        r = consumer.run(source, emails.handler(), std::future::pending()) => { r?; }
        () = first_sent => {}
    }
    drop(doomed);
    let first = first_stats.get();

    // what the first held comes back after the ack wait (1 s), and its claims are taken over
    // once their lease (0.9 s) runs out: the second stops after 5 s without work
    let consumer = emails.consumer().with_lease(Duration::from_millis(900));
    let idle = consumer.stats_handle().idle(Duration::from_secs(5));
    let second = consumer
        .run(
            nats.source(name, "emails", &subject, opts).await?,
            emails.handler(),
            idle,
        )
        .await?;
    nats.delete_stream(name).await?;
    Ok((published, first, second))
}

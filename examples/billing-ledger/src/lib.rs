//! A consume-transform-produce chain on Kafka: charges, billing, invoices, ledger.
//!
//! - **billing** consumes charges, keeps a running total per customer in PostgreSQL
//!   (`total = total + amount`: a duplicate would double-bill) and, in the same transaction,
//!   enqueues an `invoice.created` event in its transactional outbox.
//! - a **relay** publishes the committed invoices to their topic (Kafka's idempotent producer,
//!   each with the event id fixed at enqueue).
//! - **ledger** consumes the invoices and appends one entry per invoice in MariaDB (a duplicate
//!   would add a second entry).
//!
//! Each service runs in Inbox mode with Kafka positions: the inbox row, the effect, the
//! outgoing event (billing) and the partition's next offset commit in one transaction, and on
//! assignment the consumer seeks to the stored positions. A crash anywhere, a producer's
//! re-publish or a relay's re-publish after its lease changes no total.

use std::collections::BTreeMap;
use std::time::Duration;

use idemgate::consumer::{
    Consumer, Inbox, InboxHandler, Message, Outbox, Outgoing, Relay, Sink, Stats,
};
use idemgate::kafka::{Kafka, SourceOptions};
use idemgate::mysql::{MySqlInbox, MySqlOffsets, MySqlTx};
use idemgate::postgres::{PgInbox, PgOffsets, PgOutbox, PgTx};
use serde::{Deserialize, Serialize};
use sqlx::{MySqlPool, PgPool};

pub use idemgate::BoxError;

/// A charge to a customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Who pays.
    pub customer: String,
    /// How much, in cents.
    pub cents: i64,
}

/// Totals per customer.
pub type Totals = BTreeMap<String, i64>;

/// The billing service: running totals in PostgreSQL, and an outbox of invoices.
#[derive(Clone, Debug)]
pub struct Billing {
    pool: PgPool,
    totals: String,
    inbox: PgInbox,
    outbox: PgOutbox,
    invoices: String,
}

impl Billing {
    /// Creates its tables under `prefix`; its invoices go to the topic `invoices`.
    pub async fn setup(pool: PgPool, prefix: &str, invoices: &str) -> Result<Self, BoxError> {
        let totals = format!("{prefix}_billing_totals");
        let inbox = PgInbox::new(pool.clone())
            .with_table(format!("{prefix}_billing_inbox"))
            .with_offsets(PgOffsets::new().with_table(format!("{prefix}_billing_offsets")));
        inbox.migrate().await?;
        let outbox = PgOutbox::new(pool.clone()).with_table(format!("{prefix}_billing_outbox"));
        outbox.migrate().await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {totals} (customer TEXT PRIMARY KEY, cents BIGINT NOT NULL)"
        ))
        .execute(&pool)
        .await?;
        Ok(Billing {
            pool,
            totals,
            inbox,
            outbox,
            invoices: invoices.to_owned(),
        })
    }

    fn handler(&self) -> AddToTotal {
        AddToTotal {
            totals: self.totals.clone(),
            outbox: self.outbox.clone(),
            invoices: self.invoices.clone(),
        }
    }

    /// The relay that publishes billing's committed invoices through `sink`.
    pub fn relay<K: Sink>(&self, sink: K) -> Relay<PgOutbox, K> {
        Relay::new(self.outbox.clone(), sink).with_name("billing")
    }

    /// Invoices not yet published.
    pub async fn pending_invoices(&self) -> Result<u64, BoxError> {
        Ok(self.outbox.backlog().await?.pending)
    }

    /// Billed totals.
    pub async fn totals(&self) -> Result<Totals, BoxError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as(&format!("SELECT customer, cents FROM {}", self.totals))
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().collect())
    }
}

/// The ledger service: one entry per charge in MariaDB.
#[derive(Clone, Debug)]
pub struct Ledger {
    pool: MySqlPool,
    entries: String,
    inbox: MySqlInbox,
}

impl Ledger {
    /// Creates its tables under `prefix`.
    pub async fn setup(pool: MySqlPool, prefix: &str) -> Result<Self, BoxError> {
        let entries = format!("{prefix}_ledger_entries");
        let inbox = MySqlInbox::new(pool.clone())
            .with_table(format!("{prefix}_ledger_inbox"))
            .with_offsets(MySqlOffsets::new().with_table(format!("{prefix}_ledger_offsets")));
        inbox.migrate().await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {entries} (id BIGINT AUTO_INCREMENT PRIMARY KEY,
                 customer VARCHAR(64) NOT NULL, cents BIGINT NOT NULL)"
        ))
        .execute(&pool)
        .await?;
        Ok(Ledger {
            pool,
            entries,
            inbox,
        })
    }

    fn handler(&self) -> AppendEntry {
        AppendEntry(self.entries.clone())
    }

    /// Ledger balances.
    pub async fn totals(&self) -> Result<Totals, BoxError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT customer, CAST(SUM(cents) AS SIGNED) FROM {} GROUP BY customer",
            self.entries
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }
}

/// Billing's handler: adds the charge to the customer's total and enqueues its invoice, in
/// the one transaction.
#[derive(Clone, Debug)]
struct AddToTotal {
    totals: String,
    outbox: PgOutbox,
    invoices: String,
}

impl InboxHandler<PgTx, Message> for AddToTotal {
    async fn handle(&self, tx: &mut PgTx, msg: &Message) -> Result<(), BoxError> {
        let c: Charge = serde_json::from_slice(&msg.payload)?;
        let totals = &self.totals;
        sqlx::query(&format!(
            "INSERT INTO {totals} (customer, cents) VALUES ($1, $2)
             ON CONFLICT (customer) DO UPDATE SET cents = {totals}.cents + $2"
        ))
        .bind(&c.customer)
        .bind(c.cents)
        .execute(tx.as_mut())
        .await?;
        // invoice.created: the customer orders their invoices
        let invoice = Outgoing::new(&self.invoices, serde_json::to_vec(&c)?)
            .with_ordering_key(&c.customer)
            .with_header("type", "invoice.created");
        self.outbox.enqueue(tx, &invoice).await?;
        Ok(())
    }
}

/// The ledger's handler: appends an entry for the invoice (in this table).
#[derive(Clone, Debug)]
struct AppendEntry(String);

impl InboxHandler<MySqlTx, Message> for AppendEntry {
    async fn handle(&self, tx: &mut MySqlTx, msg: &Message) -> Result<(), BoxError> {
        let c: Charge = serde_json::from_slice(&msg.payload)?;
        sqlx::query(&format!(
            "INSERT INTO {} (customer, cents) VALUES (?, ?)",
            self.0
        ))
        .bind(&c.customer)
        .bind(c.cents)
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }
}

/// Publishes `charges` charges over `customers` customers (the customer is the message key, so
/// a customer's charges keep their order) and re-publishes every fifth with the same event id,
/// as a producer retrying after a lost ack does. Returns the messages published and the true
/// totals.
pub async fn publish<K: Sink>(
    sink: &K,
    topic: &str,
    charges: usize,
    customers: usize,
) -> Result<(usize, Totals), BoxError> {
    let mut expected = Totals::new();
    let mut published = 0;
    for i in 0..charges {
        let charge = Charge {
            customer: format!("cust-{}", i % customers),
            cents: i64::try_from(100 + (i * 37) % 900)?,
        };
        *expected.entry(charge.customer.clone()).or_default() += charge.cents;
        let out =
            Outgoing::new(topic, serde_json::to_vec(&charge)?).with_ordering_key(&charge.customer);
        sink.publish(&out).await?;
        published += 1;
        if i % 5 == 0 {
            sink.publish(&out).await?;
            published += 1;
        }
    }
    Ok((published, expected))
}

/// tansu 0.6 drops a group member only when its session times out (6 s here), and a member that
/// joins before then waits: a restarted service waits this long first.
pub const REJOIN_AFTER: Duration = Duration::from_secs(7);

/// The client settings both services use (a short session for quick rebalances).
pub fn kafka(bootstrap: &str) -> Kafka {
    Kafka::new(bootstrap)
        .with_setting("session.timeout.ms", "6000")
        .with_setting("heartbeat.interval.ms", "500")
        .with_setting("max.poll.interval.ms", "10000")
}

/// One service's life: a first instance that crashes once it has committed a charge, then,
/// after [`REJOIN_AFTER`], a second that resumes from the stored positions and handles the
/// rest.
pub async fn crash_and_resume<I, H>(
    kafka: &Kafka,
    group: &str,
    topic: &str,
    inbox: I,
    handler: impl Fn() -> H,
) -> Result<(Stats, Stats), BoxError>
where
    I: Inbox + Clone,
    H: InboxHandler<I::Tx, Message>,
{
    let options = || SourceOptions::new().with_positions_from(inbox.clone());
    let consumer = Consumer::inbox(group, inbox.clone());
    let first_stats = consumer.stats_handle();
    let first_commit = first_stats.until(|s| s.handled > 0);
    let source = kafka.source(group, &[topic], options())?;
    // the first instance crashes once it has committed a charge: its run is dropped mid-way
    tokio::select! {
        r = consumer.run(source, handler(), std::future::pending()) => { r?; }
        () = first_commit => {}
    }
    tokio::time::sleep(REJOIN_AFTER).await;
    let first = first_stats.get();
    // what the first committed is never seen again, though Kafka never got its offsets; the
    // second stops once it has been idle for 5 s after its first message (joining the group
    // takes a while)
    let consumer = Consumer::inbox(group, inbox.clone());
    let stats = consumer.stats_handle();
    let drained = async move {
        stats.until(|s| s.received > 0).await;
        stats.idle(Duration::from_secs(5)).await;
    };
    let second = consumer
        .run(
            kafka.source(group, &[topic], options())?,
            handler(),
            async move {
                let _ = tokio::time::timeout(Duration::from_secs(120), drained).await;
            },
        )
        .await?;
    Ok((first, second))
}

/// The chain through its crashes: billing and the ledger each crash once and resume, while a
/// relay publishes billing's invoices to `invoices`, which the ledger consumes.
pub async fn run_services(
    kafka: &Kafka,
    charges: &str,
    invoices: &str,
    billing: &Billing,
    ledger: &Ledger,
) -> Result<[(Stats, Stats); 2], BoxError> {
    let (billing_group, ledger_group) =
        (format!("{charges}-billing"), format!("{invoices}-ledger"));
    let relay = billing.relay(kafka.sink()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relaying = async {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    };
    let services = async {
        let (b, l) = tokio::join!(
            crash_and_resume(
                kafka,
                &billing_group,
                charges,
                billing.inbox.clone(),
                || { billing.handler() }
            ),
            crash_and_resume(kafka, &ledger_group, invoices, ledger.inbox.clone(), || {
                ledger.handler()
            }),
        );
        let _ = stop.send(());
        (b, l)
    };
    let (relayed, (b, l)) = tokio::join!(relaying, services);
    relayed?;
    Ok([b?, l?])
}

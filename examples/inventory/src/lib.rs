//! Inventory reservations from order-created events, exactly once.
//!
//! Each order line (`order id`, `SKU`, quantity) arrives over RabbitMQ. The consumer runs in
//! Inbox mode on PostgreSQL: the inbox row, keyed by the business key `(order id, SKU)`, and the
//! reservation (a conditional decrement of the stock, never below zero) commit in one
//! transaction. A producer that retries with a fresh event id, a redelivery after a crash, or a
//! copy running concurrently all meet the same inbox row, so a line is reserved once and stock
//! is never oversold.

use std::time::Duration;

use idemgate::Key;
use idemgate::consumer::{Consumer, InboxHandler, InboxMode, Message, Outgoing, Sink, Stats};
use idemgate::postgres::{PgInbox, PgTx};
use idemgate::rabbitmq::RabbitMq;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

pub use idemgate::BoxError;

/// One line of a created order: reserve `qty` of `sku` for `order_id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The order.
    pub order_id: String,
    /// The stock-keeping unit.
    pub sku: String,
    /// How many.
    pub qty: i32,
}

/// The reservation's business key: `(order id, SKU)`, whatever event id the message carries.
pub fn reservation_key(msg: &Message) -> Result<Key, String> {
    let line: OrderLine = serde_json::from_slice(&msg.payload).map_err(|e| e.to_string())?;
    Key::compose("reservations", [line.order_id.as_str(), line.sku.as_str()])
        .map_err(|e| e.to_string())
}

/// The service's tables (named with a prefix, so several instances can share a database).
#[derive(Clone, Debug)]
pub struct Inventory {
    pool: PgPool,
    stock: String,
    reservations: String,
    inbox: PgInbox,
}

impl Inventory {
    /// Creates the stock, reservation and inbox tables under `prefix` and stocks `skus`.
    pub async fn setup(pool: PgPool, prefix: &str, skus: &[(&str, i32)]) -> Result<Self, BoxError> {
        let (stock, reservations) = (format!("{prefix}_stock"), format!("{prefix}_reservations"));
        let inbox = PgInbox::new(pool.clone()).with_table(format!("{prefix}_inbox"));
        inbox.migrate().await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {stock} (sku TEXT PRIMARY KEY, initial INT NOT NULL,
                 available INT NOT NULL CHECK (available >= 0))"
        ))
        .execute(&pool)
        .await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {reservations} (order_id TEXT NOT NULL, sku TEXT NOT NULL,
                 qty INT NOT NULL, status TEXT NOT NULL)"
        ))
        .execute(&pool)
        .await?;
        for (sku, qty) in skus {
            sqlx::query(&format!(
                "INSERT INTO {stock} (sku, initial, available) VALUES ($1, $2, $2)
                 ON CONFLICT (sku) DO UPDATE SET initial = $2, available = $2"
            ))
            .bind(sku)
            .bind(qty)
            .execute(&pool)
            .await?;
        }
        Ok(Inventory {
            pool,
            stock,
            reservations,
            inbox,
        })
    }

    /// The consumer: Inbox mode, keyed by `(order id, SKU)`.
    pub fn consumer(&self) -> Consumer<InboxMode<PgInbox>> {
        Consumer::inbox("inventory", self.inbox.clone())
            .with_key(reservation_key)
            .with_concurrency(8)
    }

    /// The handler: reserve if there is stock, else record the rejection.
    pub fn handler(&self) -> Reserve {
        Reserve {
            stock: self.stock.clone(),
            reservations: self.reservations.clone(),
        }
    }

    /// What the tables say now.
    pub async fn report(&self) -> Result<Report, BoxError> {
        let skus: Vec<(String, i32, i32, i64)> = sqlx::query_as(&format!(
            "SELECT s.sku, s.initial, s.available,
                    COALESCE(SUM(r.qty) FILTER (WHERE r.status = 'reserved'), 0)
               FROM {} s LEFT JOIN {} r ON r.sku = s.sku GROUP BY s.sku ORDER BY s.sku",
            self.stock, self.reservations
        ))
        .fetch_all(&self.pool)
        .await?;
        let (lines, twice): (i64, i64) = sqlx::query_as(&format!(
            "SELECT COUNT(*), COUNT(*) - COUNT(DISTINCT (order_id, sku)) FROM {}",
            self.reservations
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(Report { skus, lines, twice })
    }
}

/// The Inbox-mode handler. Deliberately a plain decrement: only the inbox stands between a
/// duplicate and a second reservation (there is no unique constraint on the reservations).
#[derive(Clone, Debug)]
pub struct Reserve {
    stock: String,
    reservations: String,
}

impl InboxHandler<PgTx, Message> for Reserve {
    async fn handle(&self, tx: &mut PgTx, msg: &Message) -> Result<(), BoxError> {
        let line: OrderLine = serde_json::from_slice(&msg.payload)?;
        let taken = sqlx::query(&format!(
            "UPDATE {} SET available = available - $2 WHERE sku = $1 AND available >= $2",
            self.stock
        ))
        .bind(&line.sku)
        .bind(line.qty)
        .execute(tx.as_mut())
        .await?
        .rows_affected();
        let status = if taken == 1 {
            "reserved"
        } else {
            "out-of-stock"
        };
        sqlx::query(&format!(
            "INSERT INTO {} (order_id, sku, qty, status) VALUES ($1, $2, $3, $4)",
            self.reservations
        ))
        .bind(&line.order_id)
        .bind(&line.sku)
        .bind(line.qty)
        .bind(status)
        .execute(tx.as_mut())
        .await?;
        Ok(())
    }
}

/// Stock and reservations after a run.
#[derive(Clone, Debug)]
pub struct Report {
    /// Per SKU: initial stock, available now, reserved quantity.
    pub skus: Vec<(String, i32, i32, i64)>,
    /// Order lines with a reservation row (reserved or out of stock).
    pub lines: i64,
    /// Order lines with more than one row: must be 0.
    pub twice: i64,
}

impl Report {
    /// Every line handled once, and for every SKU `available + reserved = initial`, `available
    /// ≥ 0`: nothing oversold, nothing lost.
    pub fn check(&self, lines: i64) -> Result<(), String> {
        if self.twice != 0 {
            return Err(format!("{} order lines were handled twice", self.twice));
        }
        if self.lines != lines {
            return Err(format!(
                "{} of {lines} order lines were handled",
                self.lines
            ));
        }
        for (sku, initial, available, reserved) in &self.skus {
            if *available < 0 || i64::from(*available) + reserved != i64::from(*initial) {
                return Err(format!(
                    "{sku}: {initial} in stock, {reserved} reserved, {available} left"
                ));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<8} {:>8} {:>9} {:>10}",
            "sku", "initial", "reserved", "available"
        )?;
        for (sku, initial, available, reserved) in &self.skus {
            writeln!(f, "{sku:<8} {initial:>8} {reserved:>9} {available:>10}")?;
        }
        write!(
            f,
            "order lines handled: {}, handled twice: {}",
            self.lines, self.twice
        )
    }
}

/// The published order lines: `orders` orders of up to three lines over `skus`, each line
/// published once, then a third of them again with a fresh event id (a producer that lost its
/// confirm and rebuilt the message), and a sixth a third time with the first event id.
pub async fn publish_orders<K: Sink>(
    sink: &K,
    queue: &str,
    orders: usize,
    skus: &[&str],
) -> Result<usize, BoxError> {
    let mut published = 0;
    let mut first = Vec::new();
    for o in 0..orders {
        for l in 0..=(o % 3) {
            let line = OrderLine {
                order_id: format!("order-{o}"),
                sku: skus[(o + l) % skus.len()].to_owned(),
                qty: i32::try_from(1 + (o * 7 + l) % 5)?,
            };
            let out = Outgoing::new(queue, serde_json::to_vec(&line)?);
            sink.publish(&out).await?;
            published += 1;
            if published % 3 == 0 {
                let fresh = Outgoing::new(queue, serde_json::to_vec(&line)?);
                sink.publish(&fresh).await?;
                published += 1;
            }
            first.push(out);
        }
    }
    for out in first.iter().step_by(6) {
        sink.publish(out).await?;
        published += 1;
    }
    Ok(published)
}

/// A run: publish, a first consumer that crashes once it has committed its first reservation
/// (its run dropped mid-way and its connection closed: RabbitMQ requeues everything it held,
/// including reservations it had committed and not acked), then a second consumer that drains
/// the queue and stops once it has been idle for a second.
pub async fn run(
    rabbit_url: &str,
    inventory: &Inventory,
    queue: &str,
    orders: usize,
    skus: &[&str],
) -> Result<(usize, Stats, Stats), BoxError> {
    let rabbit = RabbitMq::connect(rabbit_url).await?;
    rabbit.declare(queue).await?;
    let published = publish_orders(&rabbit.sink().await?, queue, orders, skus).await?;

    let doomed = RabbitMq::connect(rabbit_url).await?;
    let consumer = inventory.consumer();
    let first_stats = consumer.stats_handle();
    let first_commit = first_stats.until(|s| s.handled > 0);
    tokio::select! {
        r = consumer.run(doomed.source(queue, 16).await?, inventory.handler(), std::future::pending()) => { r?; }
        () = first_commit => {}
    }
    doomed.close().await?;
    let first = first_stats.get();

    let consumer = inventory.consumer();
    let idle = consumer.stats_handle().idle(Duration::from_secs(1));
    let second = consumer
        .run(rabbit.source(queue, 32).await?, inventory.handler(), idle)
        .await?;
    rabbit.delete(queue).await?;
    rabbit.close().await?;
    Ok((published, first, second))
}

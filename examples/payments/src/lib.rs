//! The payments example: an axum API on PostgreSQL behind [`IdempotencyLayer`], charging a
//! card network that is itself idempotent by the key idemgate derives for it.
//!
//! - `POST /payments` `{"amount": 1000, "currency": "EUR"}` creates a payment;
//! - `POST /payments/{id}/capture` charges the card network once, passing
//!   `RequestKey::derive("charge")` as the network's own `Idempotency-Key`.
//!
//! The principal is the caller's `x-api-key` header (a real service takes it from its
//! authentication), so two clients never share a key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use idemgate::http::{IdempotencyLayer, RequestKey};
use idemgate::postgres::PostgresStore;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// A new payment.
#[derive(Debug, Deserialize)]
pub struct NewPayment {
    /// Minor units.
    pub amount: i64,
    /// ISO currency.
    pub currency: String,
}

/// A payment as the API returns it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Payment {
    /// `pay_<uuidv7>`.
    pub id: String,
    /// Minor units.
    pub amount: i64,
    /// ISO currency.
    pub currency: String,
    /// `created` or `captured`.
    pub status: String,
    /// The card network's charge id, once captured.
    pub charge: Option<String>,
}

#[derive(Clone)]
struct App {
    pool: PgPool,
    table: String,
    card_network: String,
    http: reqwest::Client,
}

type ApiError = (StatusCode, String);

fn internal(e: impl std::fmt::Display) -> ApiError {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Creates the payments table (`table`) if missing.
pub async fn migrate(pool: &PgPool, table: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, amount BIGINT NOT NULL,
            currency TEXT NOT NULL, status TEXT NOT NULL, charge TEXT)"
    ))
    .execute(pool)
    .await
    .map(drop)
}

/// The payments API: its routes behind the Idempotency-Key layer on `store`.
pub fn app(pool: PgPool, table: &str, store: PostgresStore, card_network: &str) -> Router {
    let state = App {
        pool,
        table: table.to_owned(),
        card_network: card_network.to_owned(),
        http: reqwest::Client::new(),
    };
    Router::new()
        .route("/payments", post(create))
        .route("/payments/{id}/capture", post(capture))
        .route("/payments/{id}", get(show))
        .with_state(state)
        .layer(IdempotencyLayer::new(store, |parts| {
            parts
                .headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }))
}

fn row(r: (String, i64, String, String, Option<String>)) -> Payment {
    Payment {
        id: r.0,
        amount: r.1,
        currency: r.2,
        status: r.3,
        charge: r.4,
    }
}

async fn create(
    State(app): State<App>,
    Json(new): Json<NewPayment>,
) -> Result<(StatusCode, Json<Payment>), ApiError> {
    if new.amount <= 0 {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount must be positive".into(),
        ));
    }
    let id = format!("pay_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!(
        "INSERT INTO {} (id, amount, currency, status) VALUES ($1, $2, $3, 'created')",
        app.table
    ))
    .bind(&id)
    .bind(new.amount)
    .bind(&new.currency)
    .execute(&app.pool)
    .await
    .map_err(internal)?;
    Ok((
        StatusCode::CREATED,
        Json(Payment {
            id,
            amount: new.amount,
            currency: new.currency,
            status: "created".into(),
            charge: None,
        }),
    ))
}

async fn show(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Payment>, ApiError> {
    let r: Option<(String, i64, String, String, Option<String>)> = sqlx::query_as(&format!(
        "SELECT id, amount, currency, status, charge FROM {} WHERE id = $1",
        app.table
    ))
    .bind(&id)
    .fetch_optional(&app.pool)
    .await
    .map_err(internal)?;
    r.map(|r| Json(row(r)))
        .ok_or((StatusCode::NOT_FOUND, "no such payment".into()))
}

async fn capture(
    State(app): State<App>,
    Path(id): Path<String>,
    Extension(RequestKey(key)): Extension<RequestKey>,
) -> Result<Json<Payment>, ApiError> {
    let Json(payment) = show(State(app.clone()), Path(id.clone())).await?;
    if payment.status == "captured" {
        return Err((StatusCode::CONFLICT, "already captured".into()));
    }
    // the card network is idempotent by its own key: ours, derived, so a re-run after a crash
    // between this call and storing the response charges nothing twice
    let charge: serde_json::Value = app
        .http
        .post(format!("{}/charges", app.card_network))
        .header("idempotency-key", key.derive("charge").id())
        .json(&serde_json::json!({ "payment": id, "amount": payment.amount }))
        .send()
        .await
        .map_err(internal)?
        .json()
        .await
        .map_err(internal)?;
    let charge_id = charge["id"].as_str().unwrap_or_default().to_owned();
    let r: (String, i64, String, String, Option<String>) = sqlx::query_as(&format!(
        "UPDATE {} SET status = 'captured', charge = $2 WHERE id = $1 RETURNING id, amount, currency, status, charge",
        app.table
    ))
    .bind(&id)
    .bind(&charge_id)
    .fetch_one(&app.pool)
    .await
    .map_err(internal)?;
    Ok(Json(row(r)))
}

/// Counts of the stub card network.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq, Clone, Copy)]
pub struct NetworkStats {
    /// Distinct charges made.
    pub charges: u64,
    /// Charge calls received (retries included).
    pub calls: u64,
}

#[derive(Default)]
struct Network {
    by_key: HashMap<String, String>,
    stats: NetworkStats,
}

/// A stub card network: `POST /charges` is idempotent by its `Idempotency-Key` (a repeat
/// returns the first charge), `GET /stats` counts charges and calls.
pub fn card_network() -> Router {
    let state: Arc<Mutex<Network>> = Arc::default();
    Router::new()
        .route(
            "/charges",
            post(
                |State(net): State<Arc<Mutex<Network>>>, headers: HeaderMap| async move {
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let mut net = net.lock().unwrap_or_else(|e| e.into_inner());
                    net.stats.calls += 1;
                    let n = net.stats.charges + 1;
                    let fresh = !net.by_key.contains_key(&key);
                    if fresh {
                        net.stats.charges = n;
                    }
                    let id = net
                        .by_key
                        .entry(key)
                        .or_insert_with(|| format!("ch_{n}"))
                        .clone();
                    Json(serde_json::json!({ "id": id }))
                },
            ),
        )
        .route(
            "/stats",
            get(|State(net): State<Arc<Mutex<Network>>>| async move {
                Json(net.lock().unwrap_or_else(|e| e.into_inner()).stats)
            }),
        )
        .with_state(state)
}

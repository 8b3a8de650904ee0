//! Amazon DynamoDB backend for idemgate: [`DynamoStore`].
//!
//! A record is one item, its partition key the key's scope and id. A claim is one conditional
//! `UpdateItem` (the key is new, or its record expired) that reports a taken key with the item
//! it found (`ReturnValuesOnConditionCheckFailure`), in the same round trip; a take-over of a
//! lease that ran out is a second conditional write on the token it read. `complete`,
//! `release` and `renew` carry the token in their condition, so a stale lease changes nothing.
//! The item's `ttl` attribute (seconds) lets DynamoDB's TTL delete expired records; expiry
//! itself is judged from the stored times, never from the TTL's lazy deletion.
//!
//! **Clock.** DynamoDB has no server clock an expression can read, so times are this host's
//! ([`Clock`], like SQLite's): rule 5 of the contract holds against the clock of whichever host
//! writes. Hosts whose clocks differ by `skew` see a lease run out `skew` early or late: a
//! fast host may take over a lease `skew` before its end, so keep leases well above the skew
//! of your fleet (NTP keeps it to milliseconds). Fencing does not depend on clocks: tokens
//! only grow, and every completion is checked against the current token.
//!
//! ```no_run
//! # async fn example() -> Result<(), idemgate_core::Error> {
//! use idemgate_core::Gate;
//! use idemgate_dynamodb::DynamoStore;
//!
//! let store = DynamoStore::local("http://127.0.0.1:4566", "idemgate_records");
//! store.migrate().await?;
//! let gate = Gate::new(store);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TimeToLiveSpecification,
};
use idemgate_core::backend::{ForgetStep, RecordRow, first_token, from_millis, later, to_millis};
use idemgate_core::{
    Claim, ClaimOptions, Clock, Error, Fingerprint, Forgotten, Key, Lease, Outcome, Record, Result,
    Store, SystemClock,
};

type Item = HashMap<String, AttributeValue>;

/// The [`Store`] contract on Amazon DynamoDB (or a compatible endpoint).
///
/// # Clone
/// Cheap: clones share the SDK client.
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: Arc<str>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

const BACKEND: &str = "dynamodb";

impl DynamoStore {
    /// A store on `client` (configured the usual way: `aws-config`, region, credentials) in
    /// `table`.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoStore {
            client,
            table: Arc::from(table.into()),
            clock: Arc::new(SystemClock),
        }
    }

    /// A local DynamoDB-compatible endpoint (`http://127.0.0.1:4566`: moto, DynamoDB Local)
    /// with static test credentials.
    pub fn local(endpoint: &str, table: impl Into<String>) -> Self {
        Self::endpoint(endpoint, "us-east-1", "test", "test", table)
    }

    /// An endpoint with static credentials (without pulling in `aws-config`).
    pub fn endpoint(
        endpoint: &str,
        region: &str,
        access_key: &str,
        secret_key: &str,
        table: impl Into<String>,
    ) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new(region.to_owned()))
            .credentials_provider(Credentials::new(
                access_key, secret_key, None, None, "idemgate",
            ))
            .http_client(http)
            .build();
        Self::new(Client::from_conf(config), table)
    }

    /// A store from a URL: `dynamodb://TABLE?region=REGION&endpoint=URL`. The region defaults
    /// to `AWS_REGION` (else `us-east-1`), the endpoint to AWS's for the region. Credentials
    /// come from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`; a local endpoint without them
    /// gets test credentials. A URL without a table, or with an unknown parameter, is
    /// [`Error::Config`].
    pub fn from_url(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("dynamodb://")
            .ok_or_else(|| config(format!("{url:?} is not a dynamodb:// URL")))?;
        let (table, query) = rest.split_once('?').unwrap_or((rest, ""));
        let table = table.trim_end_matches('/');
        if table.is_empty() {
            return Err(config(
                "dynamodb:// needs a table, as in dynamodb://idemgate_records",
            ));
        }
        let (mut region, mut endpoint) = (std::env::var("AWS_REGION").ok(), None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("region", v)) if !v.is_empty() => region = Some(v.to_owned()),
                Some(("endpoint", v)) if !v.is_empty() => endpoint = Some(v.to_owned()),
                _ => {
                    return Err(config(format!(
                        "unknown parameter {pair:?} in {url:?}: use region= and endpoint="
                    )));
                }
            }
        }
        let region = region.unwrap_or_else(|| "us-east-1".to_owned());
        let key = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let (access, secret) = match (key("AWS_ACCESS_KEY_ID"), key("AWS_SECRET_ACCESS_KEY")) {
            (Some(a), Some(s)) => (a, s),
            _ if endpoint.is_some() => ("test".to_owned(), "test".to_owned()),
            _ => {
                return Err(config(
                    "dynamodb:// needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an endpoint= of a local server)",
                ));
            }
        };
        let endpoint =
            endpoint.unwrap_or_else(|| format!("https://dynamodb.{region}.amazonaws.com"));
        Ok(Self::endpoint(&endpoint, &region, &access, &secret, table))
    }

    /// The clock expiry is judged by (default: the host's).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table (on-demand capacity, partition key `pk`) if missing, waits until it is
    /// active, and turns on TTL on the `ttl` attribute. Safe to run from many processes.
    pub async fn migrate(&self) -> Result<()> {
        let created = self
            .client
            .create_table()
            .table_name(&*self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("pk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(config)?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("pk")
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(config)?,
            )
            .send()
            .await;
        if let Err(e) = created {
            let exists = e
                .as_service_error()
                .is_some_and(|s| s.is_resource_in_use_exception());
            if !exists {
                return Err(sdk(e));
            }
        }
        for _ in 0..100 {
            let d = self
                .client
                .describe_table()
                .table_name(&*self.table)
                .send()
                .await
                .map_err(sdk)?;
            let active = d
                .table()
                .and_then(|t| t.table_status())
                .is_some_and(|s| s.as_str() == "ACTIVE");
            if active {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ttl = self
            .client
            .update_time_to_live()
            .table_name(&*self.table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name("i_ttl")
                    .enabled(true)
                    .build()
                    .map_err(config)?,
            )
            .send()
            .await;
        match ttl {
            // already on (DynamoDB refuses to turn it on twice)
            Err(e) if e.as_service_error().is_some() => Ok(()),
            Err(e) => Err(sdk(e)),
            Ok(_) => Ok(()),
        }
    }

    fn now_ms(&self) -> i64 {
        ms_i64(to_millis(self.clock.now()))
    }

    /// The consistent read of `key`'s item.
    async fn read(&self, key: &Key) -> Result<Option<RecordRow>> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("pk", pk(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk)?;
        out.item().map(row).transpose()
    }

    /// An update of `key`'s item conditioned on `condition`: `Ok(false)` when the condition
    /// did not hold (the item moved on, or the lease is stale).
    async fn update_if(
        &self,
        key: &Key,
        condition: &str,
        update: &str,
        values: Vec<(&str, AttributeValue)>,
    ) -> Result<bool> {
        let req = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", pk(key))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_values(Some(
                values.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            ));
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(sdk(e)),
        }
    }

    /// An update of the item `lease` holds, refused (`Ok(false)`) when the lease is stale.
    async fn fenced(
        &self,
        lease: &Lease,
        extra_condition: &str,
        update: &str,
        mut values: Vec<(&str, AttributeValue)>,
    ) -> Result<bool> {
        values.push((":zero", n(0)));
        values.push((":tok", n(token_i64(lease.token()))));
        let condition = format!("i_st = :zero AND i_tok = :tok{extra_condition}");
        self.update_if(lease.key(), &condition, update, values)
            .await
    }
}

/// The partition key: the scope's length, the scope and the id, so no two keys share one.
fn pk(key: &Key) -> AttributeValue {
    AttributeValue::S(format!(
        "{}:{}/{}",
        key.scope().len(),
        key.scope(),
        key.id()
    ))
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn ms_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn token_i64(t: u64) -> i64 {
    // tokens come from stored numbers, so they fit; a forged larger one matches nothing
    i64::try_from(t).unwrap_or(-1)
}

/// `t + d` in milliseconds, as the other stores bound it (no overflow, end of year 9999).
fn plus(t: i64, d: Duration) -> i64 {
    let t = from_millis(u64::try_from(t).unwrap_or(0));
    ms_i64(to_millis(later(t, d)))
}

/// DynamoDB's TTL attribute: seconds since the epoch, rounded up.
fn ttl(expires_ms: i64) -> AttributeValue {
    n(expires_ms.div_euclid(1000) + 1)
}

fn config(e: impl std::fmt::Display) -> Error {
    Error::Config {
        message: e.to_string(),
    }
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        backend: BACKEND,
        reason,
    }
}

fn sdk<E, R>(e: SdkError<E, R>) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let text = aws_sdk_dynamodb::error::DisplayErrorContext(&e).to_string();
    match e {
        SdkError::ServiceError(_) => Error::Backend {
            backend: BACKEND,
            source: text.into(),
        },
        _ => Error::Unavailable {
            backend: BACKEND,
            source: text.into(),
        },
    }
}

fn is_condition_failure<R>(
    e: &SdkError<aws_sdk_dynamodb::operation::update_item::UpdateItemError, R>,
) -> bool {
    e.as_service_error()
        .is_some_and(|s| s.is_conditional_check_failed_exception())
}

/// An item as the flat row every backend reads into.
fn row(item: &Item) -> Result<RecordRow> {
    let num = |name: &str| -> Result<Option<i64>> {
        match item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::N(v)) => v
                .parse()
                .map(Some)
                .map_err(|_| corrupt(format!("attribute {name} is {v:?}, not an integer"))),
            Some(other) => Err(corrupt(format!("attribute {name} is {other:?}"))),
        }
    };
    let bytes = |name: &str| -> Result<Option<Vec<u8>>> {
        match item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::B(b)) => Ok(Some(b.as_ref().to_vec())),
            Some(other) => Err(corrupt(format!("attribute {name} is {other:?}"))),
        }
    };
    let need = |name: &str| -> Result<i64> {
        num(name)?.ok_or_else(|| corrupt(format!("the item has no {name}")))
    };
    Ok(RecordRow {
        fingerprint: bytes("i_fp")?,
        state: need("i_st")?,
        token: need("i_tok")?,
        lease_until: num("i_lu")?,
        outcome: bytes("i_out")?,
        completed_at: num("i_ca")?,
        created_at: need("i_cr")?,
        expires_at: need("i_ex")?,
        attempts: need("i_at")?,
    })
}

fn acquired(key: &Key, item: Option<&Item>) -> Result<Claim> {
    let r = row(item.ok_or_else(|| corrupt("a claim returned no item".into()))?)?;
    Ok(Claim::Acquired(Lease::new(
        key.clone(),
        u64::try_from(r.token).unwrap_or(0),
        idemgate_core::backend::time_from_ms(r.lease_until.unwrap_or(0)),
        u32::try_from(r.attempts).unwrap_or(u32::MAX),
    )))
}

impl Store for DynamoStore {
    async fn claim(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        opts: &ClaimOptions,
    ) -> Result<Claim> {
        for _ in 0..8 {
            let now = self.now_ms();
            let lu = plus(now, opts.lease);
            let ex = plus(lu, opts.retention);
            // a new record, or one whose record expired: its token continues from the old one
            let set_fp = if fp.is_some() { ", i_fp = :fp" } else { "" };
            let remove_fp = if fp.is_some() { "" } else { ", i_fp" };
            let mut req = self
                .client
                .update_item()
                .table_name(&*self.table)
                .key("pk", pk(key))
                .update_expression(format!(
                    "SET i_st = :zero, i_tok = if_not_exists(i_tok, :first) + :one, i_lu = :lu, \
                     i_cr = :now, i_ex = :ex, i_at = :one, i_ttl = :ttl{set_fp} \
                     REMOVE i_out, i_ca{remove_fp}"
                ))
                .condition_expression("attribute_not_exists(pk) OR i_ex <= :now")
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(
                    ":first",
                    n(ms_i64(first_token(from_millis(u64::try_from(now).unwrap_or(0)))) - 1),
                )
                .expression_attribute_values(":lu", n(lu))
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":ex", n(ex))
                .expression_attribute_values(":ttl", ttl(ex))
                .return_values(ReturnValue::AllNew)
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            if let Some(fp) = fp {
                req = req.expression_attribute_values(
                    ":fp",
                    AttributeValue::B(Blob::new(fp.as_bytes().to_vec())),
                );
            }
            let stored = match req.send().await {
                Ok(out) => return acquired(key, out.attributes.as_ref()),
                Err(e) if is_condition_failure(&e) => {
                    let item = e
                        .as_service_error()
                        .and_then(|s| match s {
                            aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(c) => c.item().cloned(),
                            _ => None,
                        });
                    match item {
                        Some(item) => row(&item)?,
                        // an endpoint that does not return the item: read it
                        None => match self.read(key).await? {
                            Some(r) => r,
                            None => continue,
                        },
                    }
                }
                Err(e) => return Err(sdk(e)),
            };
            if stored.expires_at <= now {
                continue;
            }
            let token = stored.token;
            if let Some(answer) = stored.taken(key, fp, now, BACKEND)? {
                return Ok(answer);
            }
            // the lease ran out: take it over if the token is still the one read
            let mut req = self
                .client
                .update_item()
                .table_name(&*self.table)
                .key("pk", pk(key))
                .update_expression(format!(
                    "SET i_tok = i_tok + :one, i_at = i_at + :one, i_lu = :lu, i_ex = :ex, i_ttl = :ttl{}",
                    if fp.is_some() {
                        ", i_fp = if_not_exists(i_fp, :fp)"
                    } else {
                        ""
                    }
                ))
                .condition_expression("i_tok = :old AND i_st = :zero AND i_lu <= :now")
                                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":old", n(token))
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":lu", n(lu))
                .expression_attribute_values(":ex", n(ex))
                .expression_attribute_values(":ttl", ttl(ex))
                .return_values(ReturnValue::AllNew);
            if let Some(fp) = fp {
                req = req.expression_attribute_values(
                    ":fp",
                    AttributeValue::B(Blob::new(fp.as_bytes().to_vec())),
                );
            }
            match req.send().await {
                Ok(out) => return acquired(key, out.attributes.as_ref()),
                Err(e) if is_condition_failure(&e) => continue,
                Err(e) => return Err(sdk(e)),
            }
        }
        Err(Error::Unavailable {
            backend: BACKEND,
            source: "the key changed state on every try".into(),
        })
    }

    async fn complete(&self, lease: &Lease, outcome: &Outcome, retention: Duration) -> Result<()> {
        let now = self.now_ms();
        let ex = plus(now, retention);
        let done = self
            .fenced(
                lease,
                "",
                "SET i_st = :one, i_out = :out, i_ca = :now, i_ex = :ex, i_ttl = :ttl REMOVE i_lu",
                vec![
                    (":one", n(1)),
                    (":out", AttributeValue::B(Blob::new(outcome.encode()))),
                    (":now", n(now)),
                    (":ex", n(ex)),
                    (":ttl", ttl(ex)),
                ],
            )
            .await?;
        if done { Ok(()) } else { Err(Error::LeaseLost) }
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        let now = self.now_ms();
        // a live lease ends now; one already over keeps its end
        if self
            .fenced(
                &lease,
                " AND i_lu > :now",
                "SET i_lu = :now REMOVE i_fp",
                vec![(":now", n(now))],
            )
            .await?
        {
            return Ok(());
        }
        if self.fenced(&lease, "", "REMOVE i_fp", vec![]).await? {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Lease> {
        for _ in 0..8 {
            let Some(r) = self.read(lease.key()).await? else {
                return Err(Error::LeaseLost);
            };
            let (Some(lu), true) = (
                r.lease_until,
                r.state == 0 && r.token == token_i64(lease.token()),
            ) else {
                return Err(Error::LeaseLost);
            };
            let until = plus(self.now_ms(), extend);
            // the record outlives its lease by as much as before
            let ex = r.expires_at.max(until.saturating_add(r.expires_at - lu));
            if self
                .fenced(
                    lease,
                    " AND i_lu = :oldlu",
                    "SET i_lu = :lu, i_ex = :ex, i_ttl = :ttl",
                    vec![
                        (":oldlu", n(lu)),
                        (":lu", n(until)),
                        (":ex", n(ex)),
                        (":ttl", ttl(ex)),
                    ],
                )
                .await?
            {
                return Ok(Lease::new(
                    lease.key().clone(),
                    lease.token(),
                    idemgate_core::backend::time_from_ms(until),
                    lease.attempt(),
                ));
            }
        }
        Err(Error::LeaseLost)
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        let now = self.now_ms();
        match self.read(key).await? {
            Some(r) if r.expires_at > now => r.into_record(key, BACKEND).map(Some),
            _ => Ok(None),
        }
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        let now = self.now_ms();
        let mut purged = 0usize;
        let mut start: Option<Item> = None;
        while purged < limit {
            let page = self
                .client
                .scan()
                .table_name(&*self.table)
                .filter_expression("i_ex <= :now")
                .expression_attribute_values(":now", n(now))
                .projection_expression("pk")
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk)?;
            for item in page.items() {
                if purged >= limit {
                    break;
                }
                let Some(pk) = item.get("pk") else { continue };
                let gone = self
                    .client
                    .delete_item()
                    .table_name(&*self.table)
                    .key("pk", pk.clone())
                    .condition_expression("i_ex <= :now")
                    .expression_attribute_values(":now", n(now))
                    .send()
                    .await;
                match gone {
                    Ok(_) => purged += 1,
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_conditional_check_failed_exception()) => {}
                    Err(e) => return Err(sdk(e)),
                }
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        Ok(purged as u64)
    }

    async fn forget(&self, key: &Key, force: bool) -> Result<Forgotten> {
        for _ in 0..8 {
            let Some(stored) = self.read(key).await? else {
                return Ok(Forgotten::Absent);
            };
            let now = self.now_ms();
            let step = stored.forget_step(now, force);
            let ForgetStep::Tombstone {
                token, lease_until, ..
            } = step
            else {
                return Ok(step.answer());
            };
            let written = self
                .update_if(
                    key,
                    "i_tok = :old AND i_st = :st",
                    "SET i_st = :zero, i_tok = :tok, i_lu = :lu REMOVE i_fp, i_out, i_ca",
                    vec![
                        (":old", n(stored.token)),
                        (":st", n(stored.state)),
                        (":zero", n(0)),
                        (":tok", n(token)),
                        (":lu", n(lease_until)),
                    ],
                )
                .await?;
            if written {
                return Ok(step.answer());
            }
        }
        Err(Error::Unavailable {
            backend: BACKEND,
            source: "the key changed state on every try".into(),
        })
    }

    async fn claim_many(
        &self,
        claims: &[(Key, Option<Fingerprint>)],
        opts: &ClaimOptions,
    ) -> Result<Vec<Claim>> {
        let mut out = Vec::with_capacity(claims.len());
        for (k, fp) in claims {
            out.push(self.claim(k, fp.as_ref(), opts).await?);
        }
        Ok(out)
    }

    async fn complete_many(
        &self,
        done: &[(Lease, Outcome)],
        retention: Duration,
    ) -> Result<Vec<Result<()>>> {
        let mut out = Vec::with_capacity(done.len());
        for (l, o) in done {
            out.push(match self.complete(l, o, retention).await {
                Err(e) if !matches!(e, Error::LeaseLost) => return Err(e),
                r => r,
            });
        }
        Ok(out)
    }
}

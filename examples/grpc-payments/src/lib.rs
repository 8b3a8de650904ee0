//! A payments service on tonic behind idemgate's `IdempotencyLayer` in gRPC mode: a retried
//! `Charge` with the same `idempotency-key` metadata charges once and gets the first reply,
//! trailers and all.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Request, Response, Status};

/// The generated messages, client and server.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::clone_on_ref_ptr)]
pub mod pb {
    tonic::include_proto!("payments");
}

use pb::payments_server::{Payments, PaymentsServer};
use pb::{ChargeReply, ChargeRequest};

/// Accounts and their balances, in memory; every charge counted.
#[derive(Debug, Default)]
pub struct Ledger {
    balances: Mutex<HashMap<String, i64>>,
    charges: AtomicU64,
}

impl Ledger {
    /// Every charge applied so far.
    pub fn charges(&self) -> u64 {
        self.charges.load(Ordering::SeqCst)
    }
}

/// The service: an account starts with 1,000; a charge over the balance is refused with
/// `FAILED_PRECONDITION` and the balance in its `x-balance` trailer.
#[derive(Debug, Clone, Default)]
pub struct PaymentsService {
    ledger: std::sync::Arc<Ledger>,
}

impl PaymentsService {
    /// A service over `ledger`.
    pub fn new(ledger: std::sync::Arc<Ledger>) -> Self {
        PaymentsService { ledger }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> PaymentsServer<Self> {
        PaymentsServer::new(self)
    }
}

#[tonic::async_trait]
impl Payments for PaymentsService {
    async fn charge(&self, req: Request<ChargeRequest>) -> Result<Response<ChargeReply>, Status> {
        let ChargeRequest { account, amount } = req.into_inner();
        if amount <= 0 {
            return Err(Status::invalid_argument("the amount must be positive"));
        }
        // a little work, so concurrent retries overlap the first call
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut balances = self
            .ledger
            .balances
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let balance = balances.entry(account).or_insert(1_000);
        if *balance < amount {
            let mut status = Status::failed_precondition("insufficient funds");
            if let Ok(v) = balance.to_string().parse() {
                status.metadata_mut().insert("x-balance", v);
            }
            return Err(status);
        }
        *balance -= amount;
        let n = self.ledger.charges.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Response::new(ChargeReply {
            charge_id: format!("ch_{n}"),
            balance: *balance,
        }))
    }
}

//! The exactly-once harness behind `idemgate demo` and `idemgate chaos`: events published with
//! duplicates, worker processes that run the consumer runtime and are killed at named points,
//! and a ledger that counts every effect, so a run proves 0 lost and 0 applied twice, or
//! shows where it fails. Not published: the `idemgate` binary is its only user.
//!
//! The supervisor starts its workers as the running executable with a hidden subcommand
//! (`demo-worker`, `chaos-worker`, `chaos-http-service`), so the binary that embeds the
//! harness dispatches those to [`demo_worker`], [`chaos_worker`] and [`chaos_http_service`].

mod arm;
#[cfg(feature = "brokers")]
mod chaos;
mod demo;
mod demo_worker;

pub use idemgate::BoxError;

#[cfg(feature = "brokers")]
pub use chaos::http::{ChaosHttpServiceArgs, serve as chaos_http_service};
#[cfg(feature = "brokers")]
pub use chaos::worker::{ChaosWorkerArgs, run as chaos_worker};
#[cfg(feature = "brokers")]
pub use chaos::{ChaosArgs, run as chaos};
pub use demo::{DemoArgs, run as demo};
pub use demo_worker::{DemoWorkerArgs, run as demo_worker};

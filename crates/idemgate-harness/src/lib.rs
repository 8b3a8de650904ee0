//! The exactly-once harness behind `idemgate demo` and `idemgate chaos`: events published with
//! duplicates, worker processes that run the consumer runtime and are killed at named points,
//! and a ledger that counts every effect, so a run proves 0 lost and 0 applied twice, or
//! shows where it fails. `demo` is the harness on the embedded queue and SQLite files; `chaos`
//! takes any broker (feature `brokers`) and store, and adds zombies, restarts and cut
//! connections. Not published: the `idemgate` binary is its only user.
//!
//! The supervisor starts its workers as the running executable with a hidden subcommand
//! (`chaos-worker`, `chaos-http-service`), so the binary that embeds the harness dispatches
//! those to [`chaos_worker`] and [`chaos_http_service`].

mod arm;
mod chaos;
mod demo;

pub use idemgate::BoxError;

pub use chaos::http::{ChaosHttpServiceArgs, serve as chaos_http_service};
pub use chaos::pipeline::{ChaosPipelineArgs, run_process as chaos_pipeline};
pub use chaos::worker::{ChaosWorkerArgs, run as chaos_worker};
pub use chaos::{ChaosArgs, run as chaos};
pub use demo::{DemoArgs, run as demo};

//! Test tools for idemgate backends and for services built on idemgate.
//!
//! - [`conformance`]: one `pub async fn` per rule of the [`Store`](idemgate_core::Store)
//!   contract, stamped into one `#[tokio::test]` each by [`conformance_tests!`];
//! - [`inbox_conformance`]: the same for the [`Inbox`](idemgate_core::Inbox) contract, stamped
//!   by [`inbox_conformance_tests!`];
//! - [`model`]: a proptest that runs random operation sequences against a store and a reference
//!   model side by side;
//! - [`fault`]: [`FaultStore`](fault::FaultStore), a wrapper that injects errors and latency on
//!   chosen calls;
//! - [`kill`]: kill points, the wrappers ([`Watched`](kill::Watched),
//!   [`HookedStore`](kill::HookedStore), [`HookedInbox`](kill::HookedInbox)) that let a harness
//!   stop a worker where a delivery's life can be cut.
//!
//! ```
//! use idemgate_core::{ManualClock, MemoryStore};
//! use idemgate_testkit::conformance::{self, Ctx};
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! let clock = ManualClock::new();
//! let ctx = Ctx::manual(MemoryStore::builder().with_clock(clock.clone()).build().unwrap(), clock);
//! conformance::completed_is_replayed(&ctx).await;
//! # });
//! ```

pub mod broker;
pub mod conformance;
pub mod exactly_once;
pub mod fault;
pub mod inbox_conformance;
pub mod kill;
pub mod model;
pub mod outbox_conformance;
pub mod service;

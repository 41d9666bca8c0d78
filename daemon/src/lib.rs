//! egpud: holds the device, keeps models resident under a memory budget, and serves them to
//! every local program.
//!
//! Layers, each importing only the ones below it (`tests/tests/architecture.rs` checks it):
//!
//! - [`server`] and [`config`]: the composition root: flags, the socket, the lifecycle.
//! - [`frontend`]: one module per protocol (gRPC today); parse, call the core, map back.
//! - [`core`]: the API every front end shares: validation, chat templates, jobs.
//! - [`residency`]: what is resident: loads under the budget, eviction, keep-alive, pins,
//!   and the catalog that resolves model sources.
//! - [`scheduler`]: per-model queues and runners: admission, step plans, batching.
//! - [`backend`]: where models run: the CPU engine, the tinygrad worker.
//! - [`metrics`]: what is counted, for Prometheus.
//! - [`state`] and [`error`]: the persisted pin set and API key, and the domain errors.
//!
//! `ARCHITECTURE.md` at the repository root follows one request through these files.

pub mod backend;
pub mod config;
pub mod core;
pub mod error;
pub mod frontend;
pub mod metrics;
pub mod residency;
pub mod scheduler;
pub mod server;
pub mod state;

pub use config::Config;

//! egpud: holds the device, keeps models resident under a memory budget, and serves them to
//! every local program over gRPC on a Unix socket.
//!
//! - [`server`]: socket, lifecycle, shutdown.
//! - [`api`]: the gRPC service (validation and mapping only).
//! - [`residency`]: loading, the budget, eviction, keep-alive.
//! - [`scheduler`]: per-model continuous batching, fairness, cancellation.
//! - [`backend`]: the CPU backend over the native engine.
//! - [`state`]: the pinned models, persisted across restarts.
//! - [`error`]: domain errors and their gRPC status codes.

pub mod api;
pub mod backend;
pub mod config;
pub mod device;
pub mod error;
pub mod hf_source;
pub mod residency;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod worker;

pub use config::Config;

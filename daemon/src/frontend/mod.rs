//! The front ends: each speaks one protocol, parses it into the core API's requests, and maps
//! the answers and errors back. Nothing below this layer knows any protocol.
//!
//! - [`grpc`]: `egpu.v1` over the Unix socket (egpuctl, the Python client, grpcurl).
//! - [`http`]: OpenAI- and Ollama-compatible HTTP and Prometheus metrics, on a Unix socket and
//!   on loopback TCP.

pub mod grpc;
pub mod http;

/// A fresh id for a completion or a tool call, `{prefix}-{hex}`: the clock's nanoseconds and a
/// process-wide counter, so ids do not repeat within a run.
pub fn completion_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos:x}{n:04x}")
}

//! The front ends: each speaks one protocol, parses it into the core API's requests, and maps
//! the answers and errors back. Nothing below this layer knows any protocol.
//!
//! - [`grpc`]: `egpu.v1` over the Unix socket (egpuctl, the Python client, grpcurl).
//! - [`http`]: OpenAI- and Ollama-compatible HTTP and Prometheus metrics, on a Unix socket and
//!   on loopback TCP.

pub mod grpc;
pub mod http;

//! The front ends: each speaks one protocol, parses it into the core API's requests, and maps
//! the answers and errors back. Nothing below this layer knows any protocol.
//!
//! - [`grpc`]: `egpu.v1` over the Unix socket (egpuctl, the Python client, grpcurl).

pub mod grpc;

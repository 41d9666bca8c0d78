//! egpu's public gRPC API, package `egpu.v1`, generated from `proto/egpu.proto`, plus the two
//! things every Rust client needs: where the socket is and how to connect to it.
//!
//! The `.proto` file is the contract and documents every field; this crate compiles it.

pub mod v1 {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("egpu.v1");

    /// The encoded `FileDescriptorSet` of `egpu.proto`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/egpu_descriptor.bin"));
}

/// egpud's private protocol with its tinygrad worker (`proto/worker.proto`), package
/// `egpu.worker.v1`. Not a public API: it changes with the worker.
pub mod worker {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("egpu.worker.v1");
}

pub mod paths;
mod socket;

pub use socket::{
    connect, connect_channel, default_socket_path, default_state_dir, http_socket_beside,
    ConnectError, API_KEY_FILE, DEFAULT_HTTP_ADDR, SOCKET_ENV,
};

/// The metadata header a client may set to name itself for fair scheduling.
pub const CLIENT_NAME_HEADER: &str = "x-egpu-client";

//! Compiles `egpu.proto` (the public API) and `worker.proto` (egpud's private protocol with
//! its tinygrad worker) with protox (pure Rust), so building needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=egpu.proto");
    println!("cargo:rerun-if-changed=worker.proto");
    let descriptors = protox::compile(["egpu.proto"], ["."])?;
    // The descriptor set is also served by gRPC reflection, so grpcurl needs no .proto file.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("egpu_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    // The worker protocol: egpud is its only client; the server is the Python worker.
    let worker = protox::compile(["worker.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(worker)?;
    Ok(())
}

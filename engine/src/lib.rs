//! egpu's inference engine: everything that turns a model file into numbers and text.
//!
//! This crate is synchronous and knows nothing of gRPC or async runtimes; the daemon drives it.
//!
//! - [`gguf`]: the GGUF container, read in place over a memory map.
//! - [`quant`]: GGML tensor types, their block layouts and dequantization.
//! - [`model_info`]: hyper-parameters and resident-memory estimates from metadata alone.
//! - [`kernels`]: matrix products over quantized weights used in place.
//! - [`ops`]: norms, RoPE, activations, softmax and the other per-row operations.
//! - [`model`]: architectures, the KV cache and the batched forward pass.

pub mod gguf;
pub mod kernels;
pub mod model;
pub mod model_info;
pub mod ops;
pub mod quant;

//! egpu's inference engine: everything that turns a model file into numbers and text.
//!
//! This crate is synchronous and knows nothing of gRPC or async runtimes; the daemon drives it.
//!
//! - [`chat`]: chat templates, rendered as transformers renders them.
//! - [`gguf`]: the GGUF container, read in place over a memory map.
//! - [`quant`]: GGML tensor types, their block layouts and dequantization.

pub mod chat;
pub mod quant;

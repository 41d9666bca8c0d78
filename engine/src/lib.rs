//! egpu's inference engine: everything that turns a model file into numbers and text.
//!
//! This crate is synchronous and knows nothing of gRPC or async runtimes; the daemon drives it.
//! Its rooms, each depending only on the ones listed before it:
//!
//! - [`quant`]: GGML tensor types, their block layouts and dequantization.
//! - [`gguf`]: the GGUF container, read in place over a memory map.
//! - [`kernels`]: matrix products over quantized weights, attention's inner loops, the thread
//!   pool; one scalar twin per SIMD body.
//! - [`ops`]: norms, RoPE, activations, softmax and the other per-row operations.
//! - [`models`]: the decoder-only transformers, the Marian translator, model summaries.
//! - [`tokenizer`]: text to token ids and back, exactly as llama.cpp does it (and SentencePiece
//!   Unigram for Marian).
//! - [`chat`]: chat templates, rendered as transformers renders them.
//! - [`sampler`]: next-token choice (greedy, temperature, top-k/p, min-p, penalties), stop strings.
//! - [`convert`]: Hugging Face folders (found offline) to GGUF.

pub mod chat;
pub mod convert;
pub mod gguf;
pub mod kernels;
pub mod models;
pub mod ops;
pub mod quant;
pub mod sampler;
pub mod tokenizer;

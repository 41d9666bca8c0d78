//! egpu's inference engine: everything that turns a model file into numbers and text.
//!
//! This crate is synchronous and knows nothing of gRPC or async runtimes; the daemon drives it.
//!
//! - [`chat`]: chat templates, rendered as transformers renders them.
//! - [`gguf`]: the GGUF container, read in place over a memory map.
//! - [`safetensors`]: Hugging Face's safetensors container, read in place over a memory map.
//! - [`hf_cache`]: Hugging Face model folders, found offline (a path, or a repo id in the HF cache).
//! - [`hf_convert`]: a Hugging Face folder to GGUF (F32 or Q8_0), by its `model_type`.
//! - [`hf_gpt2`]: GPT-2 family models from a Hugging Face folder, converted to GGUF.
//! - [`sentencepiece`]: SentencePiece Unigram models from `.spm` files (Marian's tokenizers).
//! - [`hf_marian`]: MarianMT (opus-mt) translation models from a Hugging Face folder, converted to GGUF.
//! - [`marian`]: the Marian encoder-decoder, greedy and beam-search translation.
//! - [`quant`]: GGML tensor types, their block layouts and dequantization.
//! - [`kernels`]: matrix products over quantized weights, and the thread pool.
//! - [`sampler`]: next-token choice (greedy, temperature, top-k/p, min-p, penalties), stop strings.
//! - [`model_info`]: hyper-parameters and resident-memory estimates from metadata alone.
//! - [`tokenizer`]: text to token ids and back, exactly as llama.cpp does it.
//! - [`ops`]: norms, RoPE, activations, softmax and the other per-row operations.
//! - [`model`]: architectures, the KV cache and the batched forward pass.

pub mod chat;
pub mod gguf;
pub mod hf_cache;
pub mod hf_convert;
pub mod hf_gpt2;
pub mod hf_marian;
pub mod kernels;
pub mod marian;
pub mod model;
pub mod model_info;
pub mod ops;
pub mod quant;
pub mod safetensors;
pub mod sampler;
pub mod sentencepiece;
pub mod tokenizer;

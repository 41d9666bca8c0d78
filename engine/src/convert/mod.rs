//! Hugging Face model folders to GGUF, offline: find a folder (a path, or a repo id in the HF
//! cache), read its safetensors in place, and write the GGUF the engine runs.
//!
//! - [`hf_cache`]: a folder by path or repo id, without the network.
//! - [`safetensors`]: Hugging Face's tensor container, read over a memory map.
//! - [`common`]: what every converter shares (errors, `config.json`, [`WeightFormat`]).
//! - [`gpt2`], [`marian`], [`bert`]: one converter per supported `model_type`.

pub mod bert;
pub mod common;
pub mod gpt2;
pub mod hf_cache;
pub mod marian;
pub mod safetensors;

use std::path::Path;

pub use common::{HfModelError, WeightFormat};

/// Converts a Hugging Face folder of a supported `model_type` (gpt2, marian, bert) to GGUF
/// bytes.
pub fn gguf_from_hf_folder(dir: &Path, format: WeightFormat) -> Result<Vec<u8>, HfModelError> {
    let config_path = dir.join(hf_cache::CONFIG_FILE);
    let config = common::read_json(&config_path)?;
    match config["model_type"].as_str().unwrap_or("") {
        "marian" => marian::gguf_from_hf_marian(dir, format),
        "bert" => bert::gguf_from_hf_bert(dir, format),
        _ => gpt2::gguf_from_hf_gpt2_as(dir, format),
    }
}

//! A GGUF that parses is loaded as a model: a decoder-only model or a Marian translator gives
//! `Ok` or a typed error, never a panic or an allocation sized by untrusted counts.
#![no_main]

use std::sync::Arc;

use egpu_engine::gguf::GgufFile;
use egpu_engine::models::decoder::{Model, ModelConfig};
use egpu_engine::models::marian::MarianModel;
use egpu_engine::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let _ = ModelConfig::from_gguf(&file);
    let _ = Tokenizer::from_gguf(file.metadata());
    let _ = egpu_engine::chat::ChatTemplate::from_gguf(file.metadata());
    let file = Arc::new(file);
    let _ = Model::load(Arc::clone(&file));
    let _ = MarianModel::load(file);
});

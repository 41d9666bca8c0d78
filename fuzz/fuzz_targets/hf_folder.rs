//! A Hugging Face folder with one hostile file: the tiny GPT-2 or Marian fixture with its
//! `config.json`, `generation_config.json`, `model.safetensors.index.json`, `vocab.json` or
//! `tokenizer_config.json` replaced by the input. Converting gives a GGUF or an error, never a
//! panic, and a converted GGUF opens and (for Marian) loads or is refused cleanly.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use egpu_engine::convert::{gguf_from_hf_folder, WeightFormat};
use egpu_engine::gguf::GgufFile;
use egpu_engine::models::marian::MarianModel;
use libfuzzer_sys::fuzz_target;

const HOSTILE_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "vocab.json",
    "tokenizer_config.json",
];

/// Copies of the two fixtures in a temporary folder, made once per process.
fn folders() -> &'static [PathBuf; 2] {
    static FOLDERS: OnceLock<[PathBuf; 2]> = OnceLock::new();
    FOLDERS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("egpu-fuzz-hf-{}", std::process::id()));
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/hf");
        ["tiny-gpt2", "tiny-marian"].map(|name| {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for entry in std::fs::read_dir(fixtures.join(name)).unwrap() {
                let path = entry.unwrap().path();
                std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
            }
            dir
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, hostile)) = data.split_first() else {
        return;
    };
    let folder = &folders()[(selector & 1) as usize];
    let file = HOSTILE_FILES[(selector as usize >> 1) % HOSTILE_FILES.len()];
    let original = std::fs::read(folder.join(file)).ok();
    std::fs::write(folder.join(file), hostile).unwrap();
    let converted = gguf_from_hf_folder(folder, WeightFormat::F32);
    // Put the fixture back for the next input.
    match original {
        Some(bytes) => std::fs::write(folder.join(file), bytes).unwrap(),
        None => std::fs::remove_file(folder.join(file)).unwrap(),
    }
    let Ok(bytes) = converted else {
        return;
    };
    let gguf = GgufFile::from_bytes(bytes).expect("a converted GGUF opens");
    if selector & 1 == 1 {
        let _ = MarianModel::load(Arc::new(gguf));
    }
});

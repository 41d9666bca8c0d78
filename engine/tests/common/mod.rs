//! Shared helpers for the engine's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The models folder: `$EGPU_MODELS`, or `<repo>/models` where `scripts/fetch-models.sh` puts them.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("EGPU_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"),
    }
}

/// The path of a real model file; fails the test with instructions when it has not been fetched.
pub fn model_path(file: &str) -> PathBuf {
    let path = models_dir().join(file);
    assert!(
        path.is_file(),
        "model file {} is missing: run scripts/fetch-models.sh (CI does) or set EGPU_MODELS",
        path.display()
    );
    path
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// A committed fixture under `engine/tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}
pub mod synthetic;

/// The final hidden states of `ids` fed as one pass from position 0 to a fresh cache: every
/// token's (`LogitsWanted::All`) or the last one's (`Last`).
pub fn hidden_states(
    model: &egpu_engine::models::decoder::Model,
    pool: &egpu_engine::kernels::ThreadPool,
    ids: &[u32],
    wanted: egpu_engine::models::decoder::LogitsWanted,
) -> Vec<f32> {
    use egpu_engine::models::decoder::BatchItem;
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(ids.len()).unwrap();
    let rows = model
        .forward_hidden(
            pool,
            &mut scratch,
            &mut [BatchItem::new(&mut cache, ids, 0, wanted)],
        )
        .expect("forward");
    rows.values().to_vec()
}

//! GPT-2 from a Hugging Face folder (safetensors + vocab.json/merges.txt) against transformers:
//! `tests/fixtures/hf/tiny-gpt2/` is a random GPT2LMHeadModel saved by `save_pretrained`, and
//! `tiny-gpt2.ref.json` holds transformers' f32 logits, its greedy continuation and its tokenizer's
//! ids (`scripts/gen_tiny_hf.py`).

mod common;

use std::sync::Arc;

use egpu_engine::gguf::GgufFile;
use egpu_engine::hf_gpt2::{gguf_from_hf_gpt2, HfModelError};
use egpu_engine::kernels::ThreadPool;
use egpu_engine::model::{BatchItem, LogitsWanted, Model};
use egpu_engine::tokenizer::Tokenizer;
use serde_json::Value;

fn reference() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(common::fixture("hf/tiny-gpt2.ref.json")).unwrap(),
    )
    .unwrap()
}

fn model() -> Model {
    let bytes = gguf_from_hf_gpt2(&common::fixture("hf/tiny-gpt2")).expect("convert");
    Model::load(Arc::new(GgufFile::from_bytes(bytes).expect("a valid GGUF"))).expect("load")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn logits_match_transformers_f32_within_1e_4() {
    let reference = reference();
    let tokens = ids(&reference["token_ids"]);
    let mut model = model();
    model.set_exact_matmuls(true); // F32 weights: no activation rounding, as transformers
    let pool = ThreadPool::new(2);
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(tokens.len()).unwrap();
    let logits = model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::new(&mut cache, &tokens, 0, LogitsWanted::All)],
        )
        .unwrap();
    let mut max_diff = 0f32;
    for (i, row) in reference["logits_f32"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let ours = logits.row(0, i).unwrap();
        for (a, b) in ours.iter().zip(row.as_array().unwrap()) {
            max_diff = max_diff.max((a - b.as_f64().unwrap() as f32).abs());
        }
    }
    println!("max |logit - transformers f32| = {max_diff:e}");
    assert!(max_diff < 1e-4, "max abs diff {max_diff}");
}

#[test]
fn greedy_continuation_matches_transformers() {
    let reference = reference();
    let mut model = model();
    model.set_exact_matmuls(true);
    let pool = ThreadPool::new(2);
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(32).unwrap();
    let mut feed = ids(&reference["greedy_prompt"]);
    let mut out = Vec::new();
    for _ in 0..ids(&reference["greedy"]).len() {
        let logits = model
            .forward(
                &pool,
                &mut scratch,
                &mut [BatchItem::append(&mut cache, &feed, LogitsWanted::Last)],
            )
            .unwrap();
        let last = logits.last(0).unwrap();
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap() as u32;
        out.push(next);
        feed = vec![next];
    }
    assert_eq!(out, ids(&reference["greedy"]));
}

#[test]
fn tokenizer_matches_transformers() {
    let bytes = gguf_from_hf_gpt2(&common::fixture("hf/tiny-gpt2")).unwrap();
    let file = GgufFile::from_bytes(bytes).unwrap();
    let tokenizer = Tokenizer::from_gguf(file.metadata()).unwrap();
    for (text, want) in reference()["tokenizer_check"].as_object().unwrap() {
        assert_eq!(tokenizer.encode(text, false, true), ids(want), "{text:?}");
    }
}

#[test]
fn other_model_types_and_broken_folders_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixture("hf/tiny-gpt2");
    for f in ["config.json", "vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    // no weights
    let err = gguf_from_hf_gpt2(dir.path()).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // truncated weights
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    let err = gguf_from_hf_gpt2(dir.path()).unwrap_err();
    assert!(matches!(err, HfModelError::Safetensors(_)), "{err}");
    // another architecture
    let config = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"gpt2\"", "\"llama\"");
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let err = gguf_from_hf_gpt2(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("\"llama\"") && err.contains("supported: gpt2"),
        "{err}"
    );
}

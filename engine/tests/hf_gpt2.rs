//! GPT-2 from a Hugging Face folder (safetensors + vocab.json/merges.txt) against transformers:
//! `tests/fixtures/hf/tiny-gpt2/` is a random GPT2LMHeadModel saved by `save_pretrained`, and
//! `tiny-gpt2.ref.json` holds transformers' f32 logits, its greedy continuation and its tokenizer's
//! ids (`scripts/gen_tiny_hf.py`).

mod common;

use std::sync::Arc;

use egpu_engine::convert::gpt2::gguf_from_hf_gpt2;
use egpu_engine::convert::HfModelError;
use egpu_engine::gguf::GgufFile;
use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model};
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

/// Writes a safetensors file holding `tensors` (name, dtype, shape, little-endian bytes).
fn write_safetensors(path: &std::path::Path, tensors: &[(String, String, Vec<u64>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape,
                               "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn sharded_weights_convert_like_a_single_file() {
    use egpu_engine::convert::safetensors::SafetensorsFile;
    let src = common::fixture("hf/tiny-gpt2");
    let root = tempfile::tempdir().unwrap();
    // Named as the fixture, since the folder's name becomes general.name.
    let dir = root.path().join("tiny-gpt2");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let single = SafetensorsFile::open(src.join("model.safetensors")).unwrap();
    let all: Vec<_> = single
        .tensors()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype.name().to_owned(),
                t.shape.clone(),
                single.data(t).to_vec(),
            )
        })
        .collect();
    let (first, second) = all.split_at(all.len() / 2);
    let shards = [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ];
    let mut weight_map = serde_json::Map::new();
    for (file, tensors) in shards {
        write_safetensors(&dir.join(file), tensors);
        for t in tensors {
            weight_map.insert(t.0.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    let index_path = dir.join("model.safetensors.index.json");
    std::fs::write(&index_path, index.to_string()).unwrap();
    assert!(
        gguf_from_hf_gpt2(&dir).expect("sharded conversion") == gguf_from_hf_gpt2(&src).unwrap(),
        "a sharded folder converts to the same GGUF"
    );

    // An index that points outside the folder, or at the wrong shard, is an error.
    let mut escaping = weight_map.clone();
    escaping.insert(all[0].0.clone(), "../model.safetensors".into());
    std::fs::write(
        &index_path,
        serde_json::json!({"weight_map": escaping}).to_string(),
    )
    .unwrap();
    let err = gguf_from_hf_gpt2(&dir).unwrap_err().to_string();
    assert!(err.contains("not a file in the folder"), "{err}");
    let mut misplaced = weight_map;
    misplaced.insert(all[0].0.clone(), shards[1].0.into());
    std::fs::write(
        &index_path,
        serde_json::json!({"weight_map": misplaced}).to_string(),
    )
    .unwrap();
    assert!(gguf_from_hf_gpt2(&dir).is_err());
}

//! The configuration the engine derives from a GGUF, as the tinygrad worker receives it (JSON):
//! SmolLM2's and Gemma 3's real files, and the refusals the worker relies on.

mod common;

use common::synthetic;
use egpu_engine::gguf::GgufFile;
use egpu_engine::models::decoder::{ModelConfig, ModelError};
use serde_json::json;

fn config_json(file: &str) -> serde_json::Value {
    let file = GgufFile::open(common::model_path(file)).expect("open");
    serde_json::to_value(ModelConfig::from_gguf(&file).expect("a config")).unwrap()
}

#[test]
fn smollm2_serializes_as_the_worker_reads_it() {
    let c = config_json("SmolLM2-135M-Instruct.Q4_1.gguf");
    let pick = |k: &str| c[k].clone();
    assert_eq!(
        [
            "arch",
            "n_layer",
            "n_embd",
            "n_head",
            "n_head_kv",
            "head_dim_k",
            "head_dim_v",
            "n_ff",
            "n_vocab",
            "norm",
            "ffn",
            "qk_norm",
            "post_norms",
            "sliding_window"
        ]
        .map(pick),
        [
            json!("llama"),
            json!(30),
            json!(576),
            json!(9),
            json!(3),
            json!(64),
            json!(64),
            json!(1536),
            json!(49152),
            json!("rms"),
            json!("swiglu"),
            json!(false),
            json!(false),
            json!(null)
        ]
    );
    assert_eq!(
        c["rope"],
        json!({"style": "normal", "n_rot": 64, "freq_base": 100000.0, "freq_scale": 1.0})
    );
    assert_eq!(c["attention_scale"], json!(0.125));
    assert_eq!(c["swa_layers"].as_array().unwrap().len(), 30);
    assert!((c["norm_eps"].as_f64().unwrap() - 1e-5).abs() < 1e-9);
}

#[test]
fn gemma3_has_its_window_and_two_rope_bases() {
    let c = config_json("gemma-3-270m-q4_k_m.gguf");
    assert_eq!(
        (c["arch"].clone(), c["ffn"].clone()),
        (json!("gemma3"), json!("geglu"))
    );
    assert_eq!(c["rope"]["style"], "neox");
    assert_ne!(c["rope"]["freq_base"], c["rope_swa"]["freq_base"]);
    assert!(c["sliding_window"].as_u64().unwrap() > 0);
    let swa: Vec<bool> = serde_json::from_value(c["swa_layers"].clone()).unwrap();
    assert_eq!(swa.iter().filter(|&&s| !s).count(), swa.len() / 6);
    assert_eq!(
        (c["qk_norm"].clone(), c["post_norms"].clone()),
        (json!(true), json!(true))
    );
}

#[test]
fn an_unsupported_architecture_is_refused_before_any_tensor_is_read() {
    let mut meta = egpu_engine::gguf::write::GgufWriter::new();
    meta = meta.kv(
        "general.architecture",
        egpu_engine::gguf::MetaValue::String("phi3".into()),
    );
    let file = GgufFile::from_bytes(meta.to_bytes()).expect("a GGUF");
    assert!(matches!(
        ModelConfig::from_gguf(&file),
        Err(ModelError::UnsupportedArchitecture { .. })
    ));
}

/// Counts sized by metadata are checked against what the file holds before anything is
/// allocated by them: a failed allocation aborts the process (a panic could be caught).
#[test]
fn a_layer_count_the_file_cannot_hold_is_refused_not_allocated() {
    use egpu_engine::gguf::MetaValue;
    use egpu_engine::models::decoder::Model;
    let with_layers = |layers: u64| {
        let bytes = synthetic::TinyGemma3::default()
            .writer(1)
            .set_kv("gemma3.block_count", MetaValue::U64(layers))
            .to_bytes();
        std::sync::Arc::new(GgufFile::from_bytes(bytes).expect("a GGUF"))
    };
    for layers in [1u64 << 60, u64::MAX, 5_000] {
        let file = with_layers(layers);
        let err = ModelConfig::from_gguf(&file).expect_err("refused");
        assert!(
            matches!(err, ModelError::InvalidMetadata { .. }),
            "{layers}: {err}"
        );
        assert!(Model::load(file).is_err());
    }
    // One layer more than the file has: the config is plausible, the missing tensors are not.
    let err = Model::load(with_layers(6)).expect_err("refused");
    assert!(matches!(err, ModelError::MissingTensor(_)), "{err}");
}

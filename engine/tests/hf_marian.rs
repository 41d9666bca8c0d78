//! MarianMT (opus-mt layout) from a Hugging Face folder against transformers and sentencepiece:
//! `tests/fixtures/hf/tiny-marian/` is a random MarianMTModel saved by `save_pretrained`, with
//! SentencePiece models trained on a multilingual corpus; `tiny-marian.ref.json` holds the
//! `sentencepiece` package's ids, MarianTokenizer's ids, transformers' logits and its greedy and
//! beam-search outputs (`scripts/gen_tiny_marian.py`).

mod common;

use std::sync::Arc;

use egpu_engine::convert::{gguf_from_hf_folder, WeightFormat};
use egpu_engine::gguf::GgufFile;
use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::marian::{MarianModel, StepRow};
use egpu_engine::tokenizer::unigram::SentencePiece;
use egpu_engine::tokenizer::Tokenizer;
use serde_json::Value;

fn reference() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(common::fixture("hf/tiny-marian.ref.json")).unwrap(),
    )
    .unwrap()
}

fn folder() -> std::path::PathBuf {
    common::fixture("hf/tiny-marian")
}

fn converted(format: WeightFormat) -> Arc<GgufFile> {
    let bytes = gguf_from_hf_folder(&folder(), format).expect("convert");
    Arc::new(GgufFile::from_bytes(bytes).expect("a valid GGUF"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn lines(reference: &Value) -> Vec<String> {
    reference["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn sentencepiece_ids_equal_the_sentencepiece_package_on_a_multilingual_corpus() {
    let reference = reference();
    let lines = lines(&reference);
    assert!(lines.len() >= 35, "the corpus has {} lines", lines.len());
    for side in ["source", "target"] {
        let spm = SentencePiece::from_bytes(
            &std::fs::read(folder().join(format!("{side}.spm"))).unwrap(),
        )
        .expect("parse the .spm");
        let expected = reference["spm"][side].as_array().unwrap();
        let mut unknowns = 0;
        for (line, want) in lines.iter().zip(expected) {
            let got = spm.encode(line);
            assert_eq!(got, ids(want), "{side}.spm on {line:?}");
            unknowns += got.iter().filter(|&&id| id == spm.unknown_id()).count();
        }
        // The corpus reaches characters the model does not know (rare CJK, emoji, controls).
        assert!(unknowns > 0, "{side}: no unknown pieces exercised");
    }
}

#[test]
fn marian_tokenizer_ids_equal_transformers() {
    let reference = reference();
    let file = converted(WeightFormat::F32);
    let tokenizer = Tokenizer::from_gguf(file.metadata()).expect("tokenizer");
    for (line, want) in lines(&reference)
        .iter()
        .zip(reference["marian_ids"].as_array().unwrap())
    {
        assert_eq!(tokenizer.encode(line, true, false), ids(want), "{line:?}");
    }
}

#[test]
fn logits_match_transformers_f32_within_1e_4() {
    let reference = reference();
    let file = converted(WeightFormat::F32);
    let tokenizer = Tokenizer::from_gguf(file.metadata()).unwrap();
    let model = MarianModel::load(file).expect("load");
    let pool = ThreadPool::new(2);
    let logits = &reference["logits"];
    let source = tokenizer.encode(logits["source"].as_str().unwrap(), true, false);
    let encoded = model.encode(&pool, &source).unwrap();
    let mut cache = model.new_decoder_cache();
    let expected = logits["values"].as_array().unwrap();
    let mut max_diff = 0f32;
    for (token, want) in ids(&logits["decoder_input_ids"]).into_iter().zip(expected) {
        let got = model
            .decode_step(
                &pool,
                &mut [StepRow {
                    cache: &mut cache,
                    token,
                    source: &encoded,
                }],
            )
            .unwrap();
        let want: Vec<f32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    eprintln!("max |logit - transformers| = {max_diff:e}");
    assert!(max_diff < 1e-4, "max diff {max_diff}");
}

/// transformers' output row for one sentence: without the start token, cut after `</s>`.
fn generated(row: &Value, eos: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for id in ids(row).into_iter().skip(1) {
        out.push(id);
        if id == eos {
            break;
        }
    }
    out
}

#[test]
fn greedy_and_beam_outputs_equal_transformers() {
    let reference = reference();
    let file = converted(WeightFormat::F32);
    let tokenizer = Tokenizer::from_gguf(file.metadata()).unwrap();
    let model = MarianModel::load(file).unwrap();
    let pool = ThreadPool::new(2);
    let eos = model.config().eos;
    for kind in ["greedy", "beam"] {
        let r = &reference[kind];
        let sources: Vec<Vec<u32>> = r["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| tokenizer.encode(s.as_str().unwrap(), true, false))
            .collect();
        let mut settings = model.search_settings().clone();
        settings.num_beams = r["num_beams"].as_u64().unwrap() as usize;
        let out = model
            .translate(&pool, &sources, &settings, &mut || true)
            .unwrap()
            .expect("not cancelled");
        for ((hyp, want), text) in out
            .iter()
            .zip(r["ids"].as_array().unwrap())
            .zip(r["text"].as_array().unwrap())
        {
            assert_eq!(hyp.tokens, generated(want, eos), "{kind}");
            assert_eq!(
                tokenizer.decode(&hyp.tokens).trim_start(),
                text.as_str().unwrap(),
                "{kind} text"
            );
        }
    }
}

#[test]
fn q8_0_conversion_is_smaller_and_close() {
    let f32_file = converted(WeightFormat::F32);
    let q8_file = converted(WeightFormat::Q8_0);
    assert!(q8_file.tensor_bytes() * 2 < f32_file.tensor_bytes());
    let tokenizer = Tokenizer::from_gguf(f32_file.metadata()).unwrap();
    let source = tokenizer.encode("Bitte schicken Sie den Bericht.", true, false);
    let pool = ThreadPool::new(2);
    let logits = |file: Arc<GgufFile>| {
        let model = MarianModel::load(file).unwrap();
        let encoded = model.encode(&pool, &source).unwrap();
        let mut cache = model.new_decoder_cache();
        let start = model.config().decoder_start;
        model
            .decode_step(
                &pool,
                &mut [StepRow {
                    cache: &mut cache,
                    token: start,
                    source: &encoded,
                }],
            )
            .unwrap()
    };
    let (exact, quantized) = (logits(f32_file), logits(q8_file));
    let max_diff = exact
        .iter()
        .zip(&quantized)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let spread = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("q8_0: max |logit diff| = {max_diff} (largest |logit| {spread})");
    assert!(max_diff < 0.05 * spread, "q8_0 logits drift {max_diff}");
}

#[test]
fn other_decoding_settings_equal_transformers() {
    use egpu_engine::models::marian::EarlyStopping;
    let reference = reference();
    let file = converted(WeightFormat::F32);
    let tokenizer = Tokenizer::from_gguf(file.metadata()).unwrap();
    let model = MarianModel::load(file).unwrap();
    let pool = ThreadPool::new(2);
    let eos = model.config().eos;
    let sources: Vec<Vec<u32>> = reference["beam"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| tokenizer.encode(s.as_str().unwrap(), true, false))
        .collect();
    let variants = reference["variants"].as_array().unwrap();
    assert!(variants.len() >= 8);
    for v in variants {
        let mut settings = model.search_settings().clone();
        settings.num_beams = v["num_beams"].as_u64().unwrap() as usize;
        settings.max_length = v["max_length"].as_u64().unwrap() as usize;
        settings.length_penalty = v["length_penalty"].as_f64().unwrap() as f32;
        settings.early_stopping = match &v["early_stopping"] {
            Value::Bool(true) => EarlyStopping::AsSoonAsFull,
            Value::String(s) if s == "never" => EarlyStopping::Never,
            _ => EarlyStopping::Heuristic,
        };
        let out = model
            .translate(&pool, &sources, &settings, &mut || true)
            .unwrap()
            .unwrap();
        for (hyp, want) in out.iter().zip(v["ids"].as_array().unwrap()) {
            assert_eq!(hyp.tokens, generated(want, eos), "{v}");
        }
    }
}

/// `vocab_size` in config.json sizes the token table: a value the weights do not back is a
/// clear error before anything is allocated by it (it used to allocate 10^15 entries and abort).
#[test]
fn a_vocab_size_the_weights_do_not_hold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(folder()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    for vocab_size in [1_000_000_000_000_000u64, u64::MAX / 2, 3] {
        config["vocab_size"] = vocab_size.into();
        std::fs::write(&config_path, config.to_string()).unwrap();
        let err = gguf_from_hf_folder(dir.path(), WeightFormat::F32).expect_err("refused");
        assert!(err.to_string().contains("shared"), "{vocab_size}: {err}");
    }
}

/// transformers maps Marian's `activation_function` through ACT2FN; `"gelu"` (its default for
/// Marian) is the exact erf GELU. Such a folder converts, loads and translates (a load used to
/// refuse it), and the activation is the one applied: the logits differ from SiLU's.
#[test]
fn gelu_marian_configs_load_and_use_their_activation() {
    let translation_score = |activation: &str| {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(folder()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        let config_path = dir.path().join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        config["activation_function"] = activation.into();
        std::fs::write(&config_path, config.to_string()).unwrap();
        let bytes = gguf_from_hf_folder(dir.path(), WeightFormat::F32).expect("convert");
        let file = Arc::new(GgufFile::from_bytes(bytes).unwrap());
        let tokenizer = Tokenizer::from_gguf(file.metadata()).unwrap();
        let model = MarianModel::load(file).expect("load");
        let pool = ThreadPool::new(1);
        let source = tokenizer.encode("Hello world.", true, false);
        let mut settings = model.search_settings().clone();
        settings.num_beams = 1;
        let out = model
            .translate(&pool, &[source], &settings, &mut || true)
            .unwrap()
            .expect("not cancelled");
        out[0].score
    };
    let silu = translation_score("silu");
    for activation in ["gelu", "gelu_new"] {
        let score = translation_score(activation);
        assert!(score.is_finite(), "{activation}: {score}");
        assert_ne!(score, silu, "{activation} gave SiLU's result");
    }
}

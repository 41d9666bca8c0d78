//! The BERT architecture and WordPiece tokenizer against sentence-transformers, on a tiny random
//! BERT (`fixtures/models/tiny-bert.gguf`, made with its references by
//! `scripts/gen_tiny_bert.py` from a transformers `BertModel` whose F16-rounded weights are the
//! file's).
//!
//! Checked: the token ids (BertTokenizerFast's: lowercasing, accent stripping, punctuation and
//! CJK splitting, `##` continuations, unknown words, [CLS]/[SEP] at the file's own ids), every
//! token's final hidden state, and the mean- and CLS-pooled, normalised embeddings.

mod common;

use egpu_engine::gguf::GgufFile;
use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model, ModelError};
use egpu_engine::models::embedding::{normalize, Pooling};
use egpu_engine::tokenizer::Tokenizer;
use serde_json::Value;
use std::sync::Arc;

/// The KV cache holds keys and values in f16, so the hidden states carry f16 rounding
/// (relative 2^-11) through two layers; the references are float64.
const HIDDEN_TOLERANCE: f32 = 5e-3;
const EMBEDDING_TOLERANCE: f32 = 3e-4;

fn reference() -> Value {
    let text = std::fs::read_to_string(common::fixture("models/tiny-bert.ref.json"))
        .expect("reference JSON");
    serde_json::from_str(&text).expect("valid JSON")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every token's final hidden state for one text, in one pass.
fn hidden_states(model: &Model, pool: &ThreadPool, ids: &[u32]) -> Vec<f32> {
    common::hidden_states(model, pool, ids, LogitsWanted::All)
}

/// Text `i` of `reference`, tokenized, after checking its ids against the reference's.
fn reference_ids<'a>(tokenizer: &Tokenizer, reference: &'a Value, i: usize) -> (&'a str, Vec<u32>) {
    let text = reference["texts"][i].as_str().expect("a text");
    let ids = tokenizer.encode(text, true, false);
    let want: Vec<u32> = reference["input_ids"][i]
        .as_array()
        .expect("input_ids")
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want, "token ids of {text:?}");
    (text, ids)
}

#[test]
fn tiny_bert_matches_sentence_transformers() {
    let file = Arc::new(GgufFile::open(common::fixture("models/tiny-bert.gguf")).unwrap());
    let tokenizer = Tokenizer::from_gguf(file.metadata()).expect("tokenizer");
    let model = Model::load(Arc::clone(&file)).expect("model");
    let width = model.config().n_embd;
    let pool = ThreadPool::new(2);
    let reference = reference();
    assert_eq!(
        Pooling::from_metadata(file.metadata(), "bert"),
        Ok(Pooling::Mean)
    );

    let texts = reference["texts"].as_array().unwrap();
    let mut worst = (0f32, 0f32);
    for i in 0..texts.len() {
        let (text, ids) = reference_ids(&tokenizer, &reference, i);

        let rows = hidden_states(&model, &pool, &ids);
        if i == 0 {
            let want: Vec<f32> = reference["hidden_first_text"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(floats)
                .collect();
            let diff = max_abs_diff(&rows, &want);
            assert!(diff < HIDDEN_TOLERANCE, "hidden states differ by {diff}");
            eprintln!("tiny BERT hidden states vs transformers: max |Δ| {diff:.2e}");
        }
        for (pooling, key) in [(Pooling::Mean, "mean"), (Pooling::Cls, "cls")] {
            let mut vector = pooling.pool(&rows, width);
            normalize(&mut vector);
            let diff = max_abs_diff(&vector, &floats(&reference[key][i]));
            worst.0 = worst.0.max(if key == "mean" { diff } else { 0.0 });
            worst.1 = worst.1.max(if key == "cls" { diff } else { 0.0 });
            assert!(
                diff < EMBEDDING_TOLERANCE,
                "{key} embedding of {text:?} differs by {diff}"
            );
        }
    }
    eprintln!(
        "tiny BERT vs sentence-transformers: max |Δ| mean {:.2e}, CLS {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn bert_reads_whole_texts_and_has_no_lm_head() {
    let model = Model::open(common::fixture("models/tiny-bert.gguf")).unwrap();
    let pool = ThreadPool::new(1);
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(8).unwrap();
    let ids = [11, 300, 301, 12];
    // No logits: BERT embeds only.
    let err = model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::new(&mut cache, &ids, 0, LogitsWanted::Last)],
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::Unsupported(_)), "{err}");
    // A text must come in one pass: a second chunk would not be seen by the first.
    model
        .forward_hidden(
            &pool,
            &mut scratch,
            &mut [BatchItem::new(&mut cache, &ids[..2], 0, LogitsWanted::None)],
        )
        .unwrap();
    let err = model
        .forward_hidden(
            &pool,
            &mut scratch,
            &mut [BatchItem::new(&mut cache, &ids[2..], 2, LogitsWanted::All)],
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidBatch(_)), "{err}");
    // Past the learned positions: a clear overflow, not a read out of the table.
    let mut long_cache = model.new_kv_cache(200).unwrap();
    let long = vec![300u32; 129];
    let err = model
        .forward_hidden(
            &pool,
            &mut scratch,
            &mut [BatchItem::new(&mut long_cache, &long, 0, LogitsWanted::All)],
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::ContextOverflow { .. }), "{err}");
}

#[test]
fn a_text_in_a_batch_embeds_as_it_does_alone() {
    let model = Model::open(common::fixture("models/tiny-bert.gguf")).unwrap();
    let pool = ThreadPool::new(2);
    let a: Vec<u32> = vec![11, 300, 301, 302, 12];
    let b: Vec<u32> = vec![11, 310, 12];
    let alone_a = hidden_states(&model, &pool, &a);
    let alone_b = hidden_states(&model, &pool, &b);
    let mut scratch = model.new_scratch();
    let mut ca = model.new_kv_cache(a.len()).unwrap();
    let mut cb = model.new_kv_cache(b.len()).unwrap();
    let both = model
        .forward_hidden(
            &pool,
            &mut scratch,
            &mut [
                BatchItem::new(&mut ca, &a, 0, LogitsWanted::All),
                BatchItem::new(&mut cb, &b, 0, LogitsWanted::All),
            ],
        )
        .unwrap();
    let width = model.config().n_embd;
    let rows = |item: usize, n: usize| -> Vec<f32> {
        (0..n)
            .flat_map(|r| both.row(item, r).unwrap().to_vec())
            .collect()
    };
    // Bit for bit: attention is per text, and the other text's tokens change nothing.
    assert_eq!(rows(0, a.len()), alone_a);
    assert_eq!(rows(1, b.len()), alone_b);
    assert_eq!(alone_a.len(), a.len() * width);
}

/// nomic-bert against llama.cpp (transformers runs it only as remote code): token ids exact,
/// embeddings within what llama.cpp's own F16 rounding of activations allows (on the BERT file
/// llama.cpp is 9e-5 from sentence-transformers).
#[test]
fn tiny_nomic_bert_matches_llama_cpp() {
    let path = common::fixture("models/tiny-nomic-bert.gguf");
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let tokenizer = Tokenizer::from_gguf(file.metadata()).expect("tokenizer");
    let model = Model::load(Arc::clone(&file)).expect("model");
    let width = model.config().n_embd;
    let pool = ThreadPool::new(2);
    let text = std::fs::read_to_string(common::fixture("models/tiny-nomic-bert.ref.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let mut worst = 0f32;
    for i in 0..reference["texts"].as_array().unwrap().len() {
        let (text, ids) = reference_ids(&tokenizer, &reference, i);
        let rows = hidden_states(&model, &pool, &ids);
        let mut vector = Pooling::Mean.pool(&rows, width);
        normalize(&mut vector);
        let diff = max_abs_diff(&vector, &floats(&reference["llama_cpp_mean"][i]));
        worst = worst.max(diff);
        assert!(diff < 5e-4, "embedding of {text:?} differs by {diff}");
    }
    eprintln!("tiny nomic-bert vs llama.cpp: max |Δ| {worst:.2e}");
}

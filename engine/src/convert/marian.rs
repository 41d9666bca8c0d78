//! MarianMT (Helsinki-NLP opus-mt) translation models from a Hugging Face folder, as a GGUF the
//! engine's [`crate::models::marian`] runs.
//!
//! An opus-mt folder holds `config.json`, `generation_config.json`, `model.safetensors`, the two
//! SentencePiece models `source.spm` / `target.spm` and `vocab.json`, the vocabulary both sides
//! share. llama.cpp has no Marian architecture, so the GGUF written here is egpu's own layout
//! (`general.architecture = marian`):
//!
//! - `marian.*`: the hyper-parameters, and `marian.generation.*` the decoding settings of
//!   `generation_config.json` (beams, maximum length, length penalty, early stopping, forbidden
//!   tokens, forced end);
//! - `tokenizer.ggml.model = marian`: `tokens` are `vocab.json` by id, and
//!   `tokenizer.marian.source_spm` holds `source.spm` byte for byte, so source text is segmented
//!   by the model's own SentencePiece and each piece mapped to its `vocab.json` id. The target side
//!   needs no model: decoding joins pieces;
//! - tensors: `token_embd` (shared by encoder, decoder and head), `enc.blk.N.*`, `dec.blk.N.*`
//!   (`attn_*` self-attention, `cross_attn_*` attention over the source), `output_bias`
//!   (`final_logits_bias`), and `output` only for an untied head.
//!
//! Sinusoidal positions are not stored: the engine computes them as transformers does.

use std::path::Path;

use serde_json::Value;

use crate::convert::common::{
    heads_divide, one_of, positive_int, read_json, tensor_f32, HfModelError, WeightFormat,
};
use crate::convert::hf_cache::CONFIG_FILE;
use crate::convert::safetensors::SafetensorsSet;
use crate::gguf::write::GgufWriter;
use crate::gguf::{MetaArray, MetaValue};

/// Token types as `tokenizer.ggml.token_type` stores them.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// Activations the engine implements, by their transformers names.
pub const ACTIVATIONS: &[&str] = &[
    "swish",
    "silu",
    "relu",
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
];

/// Converts the Marian folder `dir` to GGUF bytes, weights in `format`.
pub fn gguf_from_hf_marian(dir: &Path, format: WeightFormat) -> Result<Vec<u8>, HfModelError> {
    let config_path = dir.join(CONFIG_FILE);
    let config = read_json(&config_path)?;
    let bad = |path: &Path, reason: String| HfModelError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let int = |key: &str| positive_int(&config, key, &config_path);
    let d_model = int("d_model")?;
    let vocab_size = int("vocab_size")?;
    let enc_layers = int("encoder_layers")?;
    let dec_layers = int("decoder_layers")?;
    let enc_heads = int("encoder_attention_heads")?;
    let dec_heads = int("decoder_attention_heads")?;
    let enc_ffn = int("encoder_ffn_dim")?;
    let dec_ffn = int("decoder_ffn_dim")?;
    let max_positions = int("max_position_embeddings")?;
    for heads in [enc_heads, dec_heads] {
        heads_divide(
            d_model,
            heads,
            "attention_heads",
            "d_model must be a multiple of it",
        )?;
    }
    let activation = one_of(
        &config,
        "activation_function",
        "swish",
        ACTIVATIONS,
        "implemented: swish, silu, relu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast",
    )?;
    for (key, unsupported, why) in [
        (
            "normalize_before",
            true,
            "pre-norm Marian layers are not implemented",
        ),
        (
            "share_encoder_decoder_embeddings",
            false,
            "separate encoder and decoder vocabularies are not implemented",
        ),
        (
            "static_position_embeddings",
            false,
            "learned positions are not implemented",
        ),
    ] {
        if config[key].as_bool() == Some(unsupported) {
            return Err(HfModelError::UnsupportedConfig {
                key,
                found: unsupported.to_string(),
                why,
            });
        }
    }
    let scale_embedding = config["scale_embedding"].as_bool().unwrap_or(false);
    let pad = int_or(&config["pad_token_id"], vocab_size - 1);
    let eos = int_or(&config["eos_token_id"], 0);
    let decoder_start = int_or(&config["decoder_start_token_id"], pad);

    // Decoding settings: generation_config.json first, config.json for older repos.
    let generation_path = dir.join("generation_config.json");
    let generation = if generation_path.is_file() {
        read_json(&generation_path)?
    } else {
        config.clone()
    };
    let setting = |key: &str| match &generation[key] {
        Value::Null => &config[key],
        v => v,
    };
    let num_beams = setting("num_beams").as_u64().unwrap_or(1).max(1);
    let max_length = setting("max_length").as_u64().unwrap_or(max_positions);
    let length_penalty = setting("length_penalty").as_f64().unwrap_or(1.0);
    // early_stopping: true, false, or "never"; stored as 1, 0, 2.
    let early_stopping = match setting("early_stopping") {
        Value::Bool(true) => 1u32,
        Value::String(s) if s == "never" => 2,
        _ => 0,
    };
    let forced_eos = setting("forced_eos_token_id").as_u64();
    let renormalize = setting("renormalize_logits").as_bool().unwrap_or(false);
    // Single-token bad words are what opus-mt uses (the pad token); longer ones are refused
    // rather than ignored.
    let mut bad_words = Vec::new();
    for sequence in setting("bad_words_ids").as_array().into_iter().flatten() {
        match sequence.as_array().map(Vec::as_slice) {
            Some([id]) if id.as_u64().is_some() => bad_words.push(id.as_u64().unwrap_or(0) as u32),
            _ => {
                return Err(HfModelError::UnsupportedConfig {
                    key: "bad_words_ids",
                    found: sequence.to_string(),
                    why: "only single-token bad words are implemented",
                })
            }
        }
    }

    let spm_path = dir.join("source.spm");
    let source_spm = std::fs::read(&spm_path).map_err(|source| HfModelError::Io {
        path: spm_path.clone(),
        source,
    })?;
    crate::tokenizer::unigram::SentencePiece::from_bytes(&source_spm)
        .map_err(|e| bad(&spm_path, e.to_string()))?;

    let weights = SafetensorsSet::open_folder(dir)?;
    let prefix = if weights.tensor("model.shared.weight").is_ok()
        || weights.tensor("model.encoder.embed_tokens.weight").is_ok()
    {
        "model."
    } else {
        ""
    };
    let get = |name: &str, shape: &[u64]| tensor_f32(&weights, name, shape);
    let shared = format!("{prefix}shared.weight");
    let embeddings = [format!("{prefix}encoder.embed_tokens.weight")]
        .into_iter()
        .find(|n| weights.tensor(n).is_ok() && weights.tensor(&shared).is_err())
        .unwrap_or(shared);
    // vocab_size sizes the token table below: it must be what the weights hold, checked
    // before anything is allocated by it (config.json is as untrusted as the rest).
    let embedding = weights.tensor(&embeddings)?;
    if embedding.shape.first() != Some(&vocab_size) {
        return Err(HfModelError::Shape {
            name: embedding.name.clone(),
            found: embedding.shape.clone(),
            expected: vec![vocab_size, d_model],
        });
    }
    let (tokens, token_types, unk) = marian_vocab(dir, vocab_size)?;

    let name = dir
        .file_name()
        .map_or("marian".into(), |n| n.to_string_lossy().into_owned());
    let u32v = |v: u64| MetaValue::U32(v as u32);
    let mut w = GgufWriter::new()
        .kv("general.architecture", MetaValue::String("marian".into()))
        .kv("general.name", MetaValue::String(name))
        .kv("general.file_type", MetaValue::U32(format.file_type()))
        .kv("marian.context_length", u32v(max_positions))
        .kv("marian.embedding_length", u32v(d_model))
        .kv("marian.encoder.block_count", u32v(enc_layers))
        .kv("marian.encoder.attention.head_count", u32v(enc_heads))
        .kv("marian.encoder.feed_forward_length", u32v(enc_ffn))
        .kv("marian.block_count", u32v(dec_layers))
        .kv("marian.attention.head_count", u32v(dec_heads))
        .kv("marian.feed_forward_length", u32v(dec_ffn))
        .kv("marian.attention.layer_norm_epsilon", MetaValue::F32(1e-5))
        .kv("marian.activation", MetaValue::String(activation.into()))
        .kv("marian.scale_embedding", MetaValue::Bool(scale_embedding))
        .kv("marian.decoder_start_token_id", u32v(decoder_start))
        .kv("marian.generation.num_beams", u32v(num_beams))
        .kv("marian.generation.max_length", u32v(max_length))
        .kv(
            "marian.generation.length_penalty",
            MetaValue::F32(length_penalty as f32),
        )
        .kv(
            "marian.generation.early_stopping",
            MetaValue::U32(early_stopping),
        )
        .kv(
            "marian.generation.renormalize_logits",
            MetaValue::Bool(renormalize),
        )
        .kv(
            "marian.generation.bad_words_ids",
            MetaValue::Array(MetaArray::U32(bad_words)),
        )
        .kv("tokenizer.ggml.model", MetaValue::String("marian".into()))
        .kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::String(tokens)),
        )
        .kv(
            "tokenizer.ggml.token_type",
            MetaValue::Array(MetaArray::I32(token_types)),
        )
        .kv("tokenizer.ggml.eos_token_id", u32v(eos))
        .kv("tokenizer.ggml.padding_token_id", u32v(pad))
        .kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
        .kv("tokenizer.ggml.add_eos_token", MetaValue::Bool(true))
        .kv(
            "tokenizer.marian.source_spm",
            MetaValue::Array(MetaArray::U8(source_spm)),
        );
    if let Some(unk) = unk {
        w = w.kv("tokenizer.ggml.unknown_token_id", u32v(unk));
    }
    if let Some(forced) = forced_eos {
        w = w.kv("marian.generation.forced_eos_token_id", u32v(forced));
    }

    let (e, v) = (d_model, vocab_size);
    w = format.matrix(w, "token_embd.weight", e, v, &get(&embeddings, &[v, e])?)?;
    let bias = weights
        .tensor("final_logits_bias")
        .ok()
        .map(|t| weights.to_f32(t))
        .transpose()?
        .unwrap_or_else(|| vec![0.0; v as usize]);
    if bias.len() != v as usize {
        return Err(bad(
            &dir.join("model.safetensors"),
            format!("final_logits_bias has {} values, expected {v}", bias.len()),
        ));
    }
    w = w.tensor_f32("output_bias", &[v], &bias);
    let tied = config["tie_word_embeddings"].as_bool().unwrap_or(true);
    if !tied {
        w = format.matrix(w, "output.weight", e, v, &get("lm_head.weight", &[v, e])?)?;
    }

    for (side, layers, ffn, attentions) in [
        ("encoder", enc_layers, enc_ffn, &[("self_attn", "attn")][..]),
        (
            "decoder",
            dec_layers,
            dec_ffn,
            &[("self_attn", "attn"), ("encoder_attn", "cross_attn")][..],
        ),
    ] {
        let short = &side[..3];
        for i in 0..layers {
            let hf = format!("{prefix}{side}.layers.{i}.");
            let ours = format!("{short}.blk.{i}.");
            let vector = |name: &str, n: u64| get(&format!("{hf}{name}"), &[n]);
            for (hf_attn, our_attn) in attentions {
                for (proj, short_proj) in [
                    ("q_proj", "q"),
                    ("k_proj", "k"),
                    ("v_proj", "v"),
                    ("out_proj", "o"),
                ] {
                    let weight = get(&format!("{hf}{hf_attn}.{proj}.weight"), &[e, e])?;
                    w = format.matrix(
                        w,
                        &format!("{ours}{our_attn}_{short_proj}.weight"),
                        e,
                        e,
                        &weight,
                    )?;
                    w = w.tensor_f32(
                        format!("{ours}{our_attn}_{short_proj}.bias"),
                        &[e],
                        &vector(&format!("{hf_attn}.{proj}.bias"), e)?,
                    );
                }
                for part in ["weight", "bias"] {
                    w = w.tensor_f32(
                        format!("{ours}{our_attn}_norm.{part}"),
                        &[e],
                        &vector(&format!("{hf_attn}_layer_norm.{part}"), e)?,
                    );
                }
            }
            w = format.matrix(
                w,
                &format!("{ours}ffn_up.weight"),
                e,
                ffn,
                &get(&format!("{hf}fc1.weight"), &[ffn, e])?,
            )?;
            w = w.tensor_f32(
                format!("{ours}ffn_up.bias"),
                &[ffn],
                &vector("fc1.bias", ffn)?,
            );
            w = format.matrix(
                w,
                &format!("{ours}ffn_down.weight"),
                ffn,
                e,
                &get(&format!("{hf}fc2.weight"), &[e, ffn])?,
            )?;
            w = w.tensor_f32(
                format!("{ours}ffn_down.bias"),
                &[e],
                &vector("fc2.bias", e)?,
            );
            for part in ["weight", "bias"] {
                w = w.tensor_f32(
                    format!("{ours}ffn_norm.{part}"),
                    &[e],
                    &vector(&format!("final_layer_norm.{part}"), e)?,
                );
            }
        }
    }
    Ok(w.to_bytes())
}

fn int_or(value: &Value, default: u64) -> u64 {
    value.as_u64().unwrap_or(default)
}

/// `vocab.json` as tokens by id, their types (`tokenizer.ggml.token_type`), and the unknown
/// token's id.
type MarianVocab = (Vec<String>, Vec<i32>, Option<u64>);

fn marian_vocab(dir: &Path, vocab_size: u64) -> Result<MarianVocab, HfModelError> {
    let path = dir.join("vocab.json");
    let json = read_json(&path)?;
    let bad = |reason: String| HfModelError::BadFile {
        path: path.clone(),
        reason,
    };
    let entries = json
        .as_object()
        .ok_or_else(|| bad("the vocabulary is not an object of piece -> id".into()))?;
    if entries.len() as u64 > vocab_size {
        return Err(bad(format!(
            "{} pieces, but the model's vocab_size is {vocab_size}",
            entries.len()
        )));
    }
    // Ids past the vocabulary's own (the embedding table may be padded) get placeholder pieces
    // that no text produces.
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size as usize];
    for (piece, id) in entries {
        let id = id
            .as_u64()
            .filter(|&id| id < vocab_size)
            .ok_or_else(|| bad(format!("piece {piece:?} has an id outside 0..{vocab_size}")))?;
        tokens[id as usize] = Some(piece.clone());
    }
    let mut unk = None;
    let mut types = Vec::with_capacity(tokens.len());
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| match t {
            Some(t) => {
                types.push(match t.as_str() {
                    "<unk>" => {
                        unk = Some(id as u64);
                        TOKEN_UNKNOWN
                    }
                    "</s>" | "<pad>" | "<s>" => TOKEN_CONTROL,
                    // Target-language codes of multilingual models (`>>fra<<`): one token, as
                    // MarianTokenizer takes a leading code whole.
                    code if code.len() > 4 && code.starts_with(">>") && code.ends_with("<<") => {
                        TOKEN_USER_DEFINED
                    }
                    _ => TOKEN_NORMAL,
                });
                t
            }
            None => {
                types.push(TOKEN_CONTROL);
                format!("<unused_{id}>")
            }
        })
        .collect();
    Ok((tokens, types, unk))
}

//! BERT embedding models (sentence-transformers' all-MiniLM, bge, e5 …) from a Hugging Face
//! model folder, as a GGUF the engine runs.
//!
//! The folder is what sentence-transformers saves: `config.json` (`model_type: bert`),
//! `model.safetensors`, `tokenizer.json` (a WordPiece model; `vocab.txt` also works) and, when
//! the folder is a sentence-transformers model, `modules.json` with its `1_Pooling/config.json`.
//! The GGUF is what llama.cpp's convert_hf_to_gguf writes for a BertModel: the same tensor
//! names, metadata keys and "phantom space" vocabulary (`▁word` starts a word, `##ing` becomes
//! `ing`), so llama.cpp runs the result too. The pooling is the folder's (mean or CLS; CLS when
//! the folder does not say).

use std::path::Path;

use serde_json::Value;

use crate::convert::common::{
    heads_divide, one_of, positive_int, read_json, tensor_f32, HfModelError, WeightFormat,
};
use crate::convert::hf_cache::CONFIG_FILE;
use crate::convert::safetensors::SafetensorsSet;
use crate::gguf::write::GgufWriter;
use crate::gguf::{MetaArray, MetaValue};

const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
/// llama.cpp's pooling types.
const POOLING_MEAN: u32 = 1;
const POOLING_CLS: u32 = 2;

/// BERT's hyper-parameters, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
struct BertConfig {
    n_vocab: u64,
    n_ctx: u64,
    n_embd: u64,
    n_layer: u64,
    n_head: u64,
    n_ff: u64,
    n_types: u64,
    norm_eps: f32,
}

impl BertConfig {
    fn from_json(config: &Value, path: &Path) -> Result<BertConfig, HfModelError> {
        let int = |key: &str| positive_int(config, key, path);
        let n_embd = int("hidden_size")?;
        let n_head = int("num_attention_heads")?;
        heads_divide(
            n_embd,
            n_head,
            "num_attention_heads",
            "hidden_size must be a multiple of it",
        )?;
        one_of(
            config,
            "hidden_act",
            "gelu",
            &["gelu"],
            "only gelu (the exact, erf-based GELU) is implemented",
        )?;
        one_of(
            config,
            "position_embedding_type",
            "absolute",
            &["absolute"],
            "only absolute (learned) positions are implemented",
        )?;
        Ok(BertConfig {
            n_vocab: int("vocab_size")?,
            n_ctx: int("max_position_embeddings")?,
            n_embd,
            n_layer: int("num_hidden_layers")?,
            n_head,
            n_ff: int("intermediate_size")?,
            n_types: config["type_vocab_size"].as_u64().unwrap_or(2).max(1),
            norm_eps: config["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32,
        })
    }
}

/// The WordPiece vocabulary in GGUF's form, with its normalizer and special tokens.
#[derive(Debug, Clone, PartialEq)]
struct BertVocab {
    /// Phantom-space form, by id.
    tokens: Vec<String>,
    control: Vec<bool>,
    lowercase: bool,
    strip_accents: bool,
    cls: Option<u32>,
    sep: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    mask: Option<u32>,
}

impl BertVocab {
    /// From `tokenizer.json` (its WordPiece model and BertNormalizer), else `vocab.txt` with
    /// `tokenizer_config.json`'s `do_lower_case`.
    fn from_folder(dir: &Path) -> Result<BertVocab, HfModelError> {
        let json_path = dir.join("tokenizer.json");
        let (by_id, lowercase, strip_accents, added) = if json_path.is_file() {
            let json = read_json(&json_path)?;
            let model = &json["model"];
            if model["type"].as_str() != Some("WordPiece") {
                return Err(HfModelError::BadFile {
                    path: json_path,
                    reason: format!(
                        "the tokenizer is {}, not WordPiece",
                        model["type"].as_str().unwrap_or("unnamed")
                    ),
                });
            }
            let entries = model["vocab"]
                .as_object()
                .ok_or_else(|| HfModelError::BadFile {
                    path: json_path.clone(),
                    reason: "model.vocab is not an object of token -> id".into(),
                })?;
            let mut by_id = vec![None; entries.len()];
            for (token, id) in entries {
                match id.as_u64().map(|v| v as usize) {
                    Some(id) if id < by_id.len() => by_id[id] = Some(token.clone()),
                    _ => {
                        return Err(HfModelError::BadFile {
                            path: json_path.clone(),
                            reason: format!("token {token:?} has an id outside 0..{}", by_id.len()),
                        })
                    }
                }
            }
            let normalizer = &json["normalizer"];
            let lowercase = normalizer["lowercase"].as_bool().unwrap_or(true);
            let strip = normalizer["strip_accents"].as_bool().unwrap_or(lowercase);
            (by_id, lowercase, strip, json["added_tokens"].clone())
        } else {
            let path = dir.join("vocab.txt");
            let text = std::fs::read_to_string(&path).map_err(|source| HfModelError::Io {
                path: path.clone(),
                source,
            })?;
            let by_id = text.lines().map(|l| Some(l.to_string())).collect();
            let config = dir.join("tokenizer_config.json");
            let lowercase = if config.is_file() {
                read_json(&config)?["do_lower_case"]
                    .as_bool()
                    .unwrap_or(true)
            } else {
                true
            };
            (by_id, lowercase, lowercase, Value::Null)
        };
        let raw: Vec<String> = by_id
            .into_iter()
            .enumerate()
            .map(|(id, t)| {
                t.ok_or_else(|| HfModelError::BadFile {
                    path: dir.to_path_buf(),
                    reason: format!("vocabulary ids are not dense: no token has id {id}"),
                })
            })
            .collect::<Result<_, _>>()?;
        let bracketed = |t: &str| t.starts_with('[') && t.ends_with(']') && t.len() > 2;
        let mut control: Vec<bool> = raw.iter().map(|t| bracketed(t)).collect();
        for added in added.as_array().into_iter().flatten() {
            if let (Some(id), Some(true)) = (added["id"].as_u64(), added["special"].as_bool()) {
                if let Some(c) = control.get_mut(id as usize) {
                    *c = true;
                }
            }
        }
        let tokens = raw
            .iter()
            .zip(&control)
            .map(|(t, &is_control)| match t.strip_prefix("##") {
                _ if is_control => t.clone(),
                Some(rest) if !rest.is_empty() => rest.to_string(),
                _ => format!("\u{2581}{t}"),
            })
            .collect();
        let id_of = |name: &str| raw.iter().position(|t| t == name).map(|i| i as u32);
        Ok(BertVocab {
            tokens,
            control,
            lowercase,
            strip_accents,
            cls: id_of("[CLS]"),
            sep: id_of("[SEP]"),
            unk: id_of("[UNK]"),
            pad: id_of("[PAD]"),
            mask: id_of("[MASK]"),
        })
    }
}

/// The folder's pooling: sentence-transformers' Pooling module if `modules.json` names one
/// (mean or CLS; anything else is refused rather than silently changed), else CLS, BERT's own.
fn pooling_type(dir: &Path) -> Result<u32, HfModelError> {
    let modules = dir.join("modules.json");
    if !modules.is_file() {
        return Ok(POOLING_CLS);
    }
    let list = read_json(&modules)?;
    let pooling = list.as_array().into_iter().flatten().find(|m| {
        m["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("models.Pooling"))
    });
    let Some(pooling) = pooling else {
        return Ok(POOLING_CLS);
    };
    let path = dir
        .join(pooling["path"].as_str().unwrap_or("1_Pooling"))
        .join("config.json");
    let config = read_json(&path)?;
    let on = |key: &str| config[key].as_bool() == Some(true);
    let modes = [
        "pooling_mode_mean_tokens",
        "pooling_mode_cls_token",
        "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens",
        "pooling_mode_lasttoken",
    ];
    match modes.iter().filter(|m| on(m)).copied().collect::<Vec<_>>()[..] {
        ["pooling_mode_mean_tokens"] => Ok(POOLING_MEAN),
        ["pooling_mode_cls_token"] => Ok(POOLING_CLS),
        ref other => Err(HfModelError::BadFile {
            path,
            reason: format!(
                "pooling {other:?}: egpu pools BERT models by mean or by the CLS token only"
            ),
        }),
    }
}

/// Converts the BERT model folder `dir` to GGUF bytes, weight matrices in `format`.
pub fn gguf_from_hf_bert(dir: &Path, format: WeightFormat) -> Result<Vec<u8>, HfModelError> {
    let config_path = dir.join(CONFIG_FILE);
    let cfg = BertConfig::from_json(&read_json(&config_path)?, &config_path)?;
    let vocab = BertVocab::from_folder(dir)?;
    if vocab.tokens.len() as u64 > cfg.n_vocab {
        return Err(HfModelError::BadFile {
            path: dir.to_path_buf(),
            reason: format!(
                "{} tokens, but the model's vocab_size is {}",
                vocab.tokens.len(),
                cfg.n_vocab
            ),
        });
    }
    let pooling = pooling_type(dir)?;
    let weights = SafetensorsSet::open_folder(dir)?;
    // Saved from BertModel (no prefix) or a task model around it ("bert.").
    let prefix = if weights
        .tensor("bert.embeddings.word_embeddings.weight")
        .is_ok()
    {
        "bert."
    } else {
        ""
    };
    let get = |name: &str, shape: &[u64]| tensor_f32(&weights, &format!("{prefix}{name}"), shape);
    let (e, f, v, c) = (cfg.n_embd, cfg.n_ff, cfg.n_vocab, cfg.n_ctx);
    let name = dir
        .file_name()
        .map_or("bert".into(), |n| n.to_string_lossy().into_owned());
    let mut w = GgufWriter::new()
        .kv("general.architecture", MetaValue::String("bert".into()))
        .kv("general.name", MetaValue::String(name))
        .kv("general.file_type", MetaValue::U32(format.file_type()))
        .kv("bert.context_length", MetaValue::U32(c as u32))
        .kv("bert.embedding_length", MetaValue::U32(e as u32))
        .kv("bert.feed_forward_length", MetaValue::U32(f as u32))
        .kv("bert.block_count", MetaValue::U32(cfg.n_layer as u32))
        .kv(
            "bert.attention.head_count",
            MetaValue::U32(cfg.n_head as u32),
        )
        .kv(
            "bert.attention.layer_norm_epsilon",
            MetaValue::F32(cfg.norm_eps),
        )
        .kv("bert.attention.causal", MetaValue::Bool(false))
        .kv("bert.pooling_type", MetaValue::U32(pooling))
        .kv(
            "tokenizer.ggml.token_type_count",
            MetaValue::U32(cfg.n_types as u32),
        )
        .kv("tokenizer.ggml.model", MetaValue::String("bert".into()))
        .kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::String(vocab.tokens.clone())),
        )
        .kv(
            "tokenizer.ggml.token_type",
            MetaValue::Array(MetaArray::I32(
                vocab
                    .control
                    .iter()
                    .map(|&c| if c { TOKEN_CONTROL } else { TOKEN_NORMAL })
                    .collect(),
            )),
        )
        .kv(
            "tokenizer.ggml.normalizer.lowercase",
            MetaValue::Bool(vocab.lowercase),
        )
        .kv(
            "tokenizer.ggml.normalizer.strip_accents",
            MetaValue::Bool(vocab.strip_accents),
        )
        .kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(true))
        .kv("tokenizer.ggml.add_eos_token", MetaValue::Bool(true));
    for (key, id) in [
        ("bos", vocab.cls),
        ("cls", vocab.cls),
        ("eos", vocab.sep),
        ("seperator", vocab.sep),
        ("unknown", vocab.unk),
        ("padding", vocab.pad),
        ("mask", vocab.mask),
    ] {
        if let Some(id) = id {
            w = w.kv(format!("tokenizer.ggml.{key}_token_id"), MetaValue::U32(id));
        }
    }

    w = format.matrix(
        w,
        "token_embd.weight",
        e,
        v,
        &get("embeddings.word_embeddings.weight", &[v, e])?,
    )?;
    w = w.tensor_f32(
        "token_types.weight",
        &[e, cfg.n_types],
        &get("embeddings.token_type_embeddings.weight", &[cfg.n_types, e])?,
    );
    w = w.tensor_f32(
        "position_embd.weight",
        &[e, c],
        &get("embeddings.position_embeddings.weight", &[c, e])?,
    );
    let norm = |w: GgufWriter, ours: &str, hf: &str| -> Result<GgufWriter, HfModelError> {
        // Old checkpoints name LayerNorm's parameters gamma and beta.
        let pick = |new: &str, old: &str| {
            get(&format!("{hf}.{new}"), &[e]).or_else(|_| get(&format!("{hf}.{old}"), &[e]))
        };
        Ok(
            w.tensor_f32(format!("{ours}.weight"), &[e], &pick("weight", "gamma")?)
                .tensor_f32(format!("{ours}.bias"), &[e], &pick("bias", "beta")?),
        )
    };
    w = norm(w, "token_embd_norm", "embeddings.LayerNorm")?;
    for i in 0..cfg.n_layer {
        let (h, p) = (format!("encoder.layer.{i}."), format!("blk.{i}."));
        // (our name, HF name, inputs, outputs)
        let projections = [
            ("attn_q", "attention.self.query", e, e),
            ("attn_k", "attention.self.key", e, e),
            ("attn_v", "attention.self.value", e, e),
            ("attn_output", "attention.output.dense", e, e),
            ("ffn_up", "intermediate.dense", e, f),
            ("ffn_down", "output.dense", f, e),
        ];
        for (ours, hf, n_in, n_out) in projections {
            let weight = get(&format!("{h}{hf}.weight"), &[n_out, n_in])?;
            w = format.matrix(w, &format!("{p}{ours}.weight"), n_in, n_out, &weight)?;
            w = w.tensor_f32(
                format!("{p}{ours}.bias"),
                &[n_out],
                &get(&format!("{h}{hf}.bias"), &[n_out])?,
            );
            if ours == "attn_output" {
                w = norm(
                    w,
                    &format!("{p}attn_output_norm"),
                    &format!("{h}attention.output.LayerNorm"),
                )?;
            }
        }
        w = norm(
            w,
            &format!("{p}layer_output_norm"),
            &format!("{h}output.LayerNorm"),
        )?;
    }
    Ok(w.to_bytes())
}

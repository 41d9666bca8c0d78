//! GPT-2 family models (gpt2 … gpt2-xl) from a Hugging Face model folder, as a GGUF the engine runs.
//!
//! The folder is what `save_pretrained` writes plus the tokenizer files every GPT-2 repo carries:
//! `config.json`, `model.safetensors`, and `vocab.json` + `merges.txt` (or `tokenizer.json`). The
//! conversion follows llama.cpp's convert_hf_to_gguf for GPT-2: the same metadata keys, tensor
//! names and tokenizer fields, so the result is the GGUF llama.cpp itself would run.
//!
//! Why convert rather than run the safetensors in place: GPT-2 stores its projections as `Conv1D`
//! weights, (in, out) — the transpose of the (out, in) rows the engine's kernels read — so every
//! matrix has to be rewritten once anyway. Converting to GGUF bytes makes the HF model an ordinary
//! GGUF model for everything downstream (tokenizer, chat template lookup, memory estimate, both
//! backends). Weights are kept in F32 (F16/BF16 checkpoints are widened exactly) or quantized to
//! Q8_0 ([`WeightFormat`]).

use std::path::Path;

use serde_json::Value;

use crate::convert::common::{
    heads_divide, one_of, positive_int, read_json, tensor_f32, HfModelError, WeightFormat,
};
use crate::convert::hf_cache::CONFIG_FILE;
use crate::convert::safetensors::SafetensorsSet;
use crate::gguf::write::GgufWriter;
use crate::gguf::{MetaArray, MetaValue};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;

/// GPT-2's hyper-parameters, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub n_vocab: u64,
    pub n_ctx: u64,
    pub n_embd: u64,
    pub n_layer: u64,
    pub n_head: u64,
    pub n_ff: u64,
    pub norm_eps: f32,
    pub bos: Option<u64>,
    pub eos: Option<u64>,
}

impl Gpt2Config {
    pub fn from_json(config: &Value, path: &Path) -> Result<Gpt2Config, HfModelError> {
        let model_type = config["model_type"].as_str().unwrap_or("");
        if model_type != "gpt2" {
            return Err(HfModelError::UnsupportedModelType {
                found: model_type.to_string(),
            });
        }
        let int = |key: &str| positive_int(config, key, path);
        let n_embd = int("n_embd")?;
        let n_head = int("n_head")?;
        heads_divide(n_embd, n_head, "n_head", "n_embd must be a multiple of it")?;
        // the engine's GPT-2 uses the tanh GELU, which is what "gelu_new" (every GPT-2 checkpoint) is
        one_of(
            config,
            "activation_function",
            "gelu_new",
            &["gelu_new"],
            "only gelu_new (the tanh approximation) is implemented",
        )?;
        for (key, why) in [
            (
                "scale_attn_by_inverse_layer_idx",
                "attention scaled per layer is not implemented",
            ),
            ("reorder_and_upcast_attn", "not implemented"),
            (
                "add_cross_attention",
                "GPT-2 as a decoder of an encoder-decoder is not implemented",
            ),
        ] {
            if config[key].as_bool() == Some(true) {
                return Err(HfModelError::UnsupportedConfig {
                    key,
                    found: "true".into(),
                    why,
                });
            }
        }
        if config["scale_attn_weights"].as_bool() == Some(false) {
            return Err(HfModelError::UnsupportedConfig {
                key: "scale_attn_weights",
                found: "false".into(),
                why: "attention without the 1/sqrt(head_dim) scale is not implemented",
            });
        }
        Ok(Gpt2Config {
            n_vocab: int("vocab_size")?,
            n_ctx: config["n_positions"]
                .as_u64()
                .or(config["n_ctx"].as_u64())
                .unwrap_or(1024),
            n_embd,
            n_layer: int("n_layer")?,
            n_head,
            n_ff: config["n_inner"].as_u64().unwrap_or(4 * n_embd),
            norm_eps: config["layer_norm_epsilon"].as_f64().unwrap_or(1e-5) as f32,
            bos: config["bos_token_id"].as_u64(),
            eos: config["eos_token_id"].as_u64(),
        })
    }
}

/// The byte-level BPE vocabulary: tokens by id, merges, and which tokens are special.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Vocab {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub special: Vec<bool>,
}

impl Gpt2Vocab {
    /// From `vocab.json` + `merges.txt`, else from `tokenizer.json`'s BPE model.
    pub fn from_folder(dir: &Path) -> Result<Gpt2Vocab, HfModelError> {
        let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let (vocab, merges, added) = if vocab_path.is_file() && merges_path.is_file() {
            let text =
                std::fs::read_to_string(&merges_path).map_err(|source| HfModelError::Io {
                    path: merges_path.clone(),
                    source,
                })?;
            let merges: Vec<String> = text
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .map(str::to_string)
                .collect();
            let added = dir.join("tokenizer.json");
            let added = if added.is_file() {
                read_json(&added)?["added_tokens"].clone()
            } else {
                Value::Null
            };
            (read_json(&vocab_path)?, merges, added)
        } else {
            let path = dir.join("tokenizer.json");
            if !path.is_file() {
                return Err(HfModelError::BadFile {
                    path: dir.to_path_buf(),
                    reason: "no tokenizer: neither vocab.json + merges.txt nor tokenizer.json"
                        .into(),
                });
            }
            let json = read_json(&path)?;
            let merges = json["model"]["merges"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter_map(|x| match x {
                            Value::String(s) => Some(s.clone()),
                            Value::Array(pair) => Some(format!(
                                "{} {}",
                                pair.first()?.as_str()?,
                                pair.get(1)?.as_str()?
                            )),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            (
                json["model"]["vocab"].clone(),
                merges,
                json["added_tokens"].clone(),
            )
        };
        let path = || dir.join("vocab.json");
        let entries = vocab.as_object().ok_or_else(|| HfModelError::BadFile {
            path: path(),
            reason: "the vocabulary is not an object of token -> id".into(),
        })?;
        let mut tokens = vec![None; entries.len()];
        for (token, id) in entries {
            let id = id
                .as_u64()
                .map(|v| v as usize)
                .filter(|v| *v < tokens.len());
            let Some(id) = id else {
                return Err(HfModelError::BadFile {
                    path: path(),
                    reason: format!("token {token:?} has an id outside 0..{}", entries.len()),
                });
            };
            tokens[id] = Some(token.clone());
        }
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(id, t)| {
                t.ok_or_else(|| HfModelError::BadFile {
                    path: path(),
                    reason: format!("ids are not dense: no token has id {id}"),
                })
            })
            .collect::<Result<_, _>>()?;
        let mut special: Vec<bool> = tokens.iter().map(|t| t == "<|endoftext|>").collect();
        for added in added.as_array().into_iter().flatten() {
            if let (Some(id), Some(true)) = (added["id"].as_u64(), added["special"].as_bool()) {
                if let Some(s) = special.get_mut(id as usize) {
                    *s = true;
                }
            }
        }
        Ok(Gpt2Vocab {
            tokens,
            merges,
            special,
        })
    }
}

/// Converts the GPT-2 model folder `dir` to GGUF bytes, weights in f32.
pub fn gguf_from_hf_gpt2(dir: &Path) -> Result<Vec<u8>, HfModelError> {
    gguf_from_hf_gpt2_as(dir, WeightFormat::F32)
}

/// Converts the GPT-2 model folder `dir` to GGUF bytes, weights in `format`.
pub fn gguf_from_hf_gpt2_as(dir: &Path, format: WeightFormat) -> Result<Vec<u8>, HfModelError> {
    let config_path = dir.join(CONFIG_FILE);
    let cfg = Gpt2Config::from_json(&read_json(&config_path)?, &config_path)?;
    let vocab = Gpt2Vocab::from_folder(dir)?;
    if vocab.tokens.len() as u64 > cfg.n_vocab {
        return Err(HfModelError::BadFile {
            path: dir.join("vocab.json"),
            reason: format!(
                "{} tokens, but the model's vocab_size is {}",
                vocab.tokens.len(),
                cfg.n_vocab
            ),
        });
    }
    let weights = SafetensorsSet::open_folder(dir)?;
    // checkpoints are saved from GPT2LMHeadModel ("transformer." prefix) or GPT2Model (none)
    let prefix = if weights.tensor("transformer.wte.weight").is_ok() {
        "transformer."
    } else {
        ""
    };
    let get = |name: &str, shape: &[u64]| tensor_f32(&weights, &format!("{prefix}{name}"), shape);
    let (e, f, v, c) = (cfg.n_embd, cfg.n_ff, cfg.n_vocab, cfg.n_ctx);

    let mut w = GgufWriter::new()
        .kv("general.architecture", MetaValue::String("gpt2".into()))
        .kv(
            "general.name",
            MetaValue::String(
                dir.file_name()
                    .map_or("gpt2".into(), |n| n.to_string_lossy().into_owned()),
            ),
        )
        .kv("general.file_type", MetaValue::U32(format.file_type()))
        .kv("gpt2.context_length", MetaValue::U32(c as u32))
        .kv("gpt2.embedding_length", MetaValue::U32(e as u32))
        .kv("gpt2.feed_forward_length", MetaValue::U32(f as u32))
        .kv("gpt2.block_count", MetaValue::U32(cfg.n_layer as u32))
        .kv(
            "gpt2.attention.head_count",
            MetaValue::U32(cfg.n_head as u32),
        )
        .kv(
            "gpt2.attention.layer_norm_epsilon",
            MetaValue::F32(cfg.norm_eps),
        )
        .kv("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", MetaValue::String("gpt-2".into()))
        .kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::String(vocab.tokens.clone())),
        )
        .kv(
            "tokenizer.ggml.token_type",
            MetaValue::Array(MetaArray::I32(
                vocab
                    .special
                    .iter()
                    .map(|s| if *s { TOKEN_CONTROL } else { TOKEN_NORMAL })
                    .collect(),
            )),
        )
        .kv(
            "tokenizer.ggml.merges",
            MetaValue::Array(MetaArray::String(vocab.merges.clone())),
        )
        .kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
    if let Some(bos) = cfg.bos {
        w = w.kv("tokenizer.ggml.bos_token_id", MetaValue::U32(bos as u32));
    }
    if let Some(eos) = cfg.eos {
        w = w.kv("tokenizer.ggml.eos_token_id", MetaValue::U32(eos as u32));
    }

    // Tensors, in ggml order (dims[0] is the contiguous one). GPT-2's Conv1D weights are (in, out):
    // transposed to (out, in) rows here.
    let transpose = |values: Vec<f32>, rows: u64, cols: u64| -> Vec<f32> {
        let (rows, cols) = (rows as usize, cols as usize);
        let mut out = vec![0.0; values.len()];
        for r in 0..rows {
            for (c, v) in values[r * cols..(r + 1) * cols].iter().enumerate() {
                out[c * rows + r] = *v;
            }
        }
        out
    };
    w = format.matrix(w, "token_embd.weight", e, v, &get("wte.weight", &[v, e])?)?;
    w = w.tensor_f32(
        "position_embd.weight",
        &[e, c],
        &get("wpe.weight", &[c, e])?,
    );
    for i in 0..cfg.n_layer {
        let (h, p) = (format!("h.{i}."), format!("blk.{i}."));
        let vector = |name: &str, n: u64| get(&format!("{h}{name}"), &[n]);
        let conv1d = |name: &str, n_in: u64, n_out: u64| -> Result<Vec<f32>, HfModelError> {
            Ok(transpose(
                get(&format!("{h}{name}"), &[n_in, n_out])?,
                n_in,
                n_out,
            ))
        };
        let norm = |w: GgufWriter, ours: &str, hf: &str| -> Result<GgufWriter, HfModelError> {
            Ok(w.tensor_f32(
                format!("{p}{ours}.weight"),
                &[e],
                &vector(&format!("{hf}.weight"), e)?,
            )
            .tensor_f32(
                format!("{p}{ours}.bias"),
                &[e],
                &vector(&format!("{hf}.bias"), e)?,
            ))
        };
        // (our name, HF name, inputs, outputs)
        let projections = [
            ("attn_qkv", "attn.c_attn", e, 3 * e),
            ("attn_output", "attn.c_proj", e, e),
            ("ffn_up", "mlp.c_fc", e, f),
            ("ffn_down", "mlp.c_proj", f, e),
        ];
        w = norm(w, "attn_norm", "ln_1")?;
        for (i, (ours, hf, n_in, n_out)) in projections.into_iter().enumerate() {
            if i == 2 {
                w = norm(w, "ffn_norm", "ln_2")?;
            }
            let weight = conv1d(&format!("{hf}.weight"), n_in, n_out)?;
            w = format.matrix(w, &format!("{p}{ours}.weight"), n_in, n_out, &weight)?;
            w = w.tensor_f32(
                format!("{p}{ours}.bias"),
                &[n_out],
                &vector(&format!("{hf}.bias"), n_out)?,
            );
        }
    }
    w = w
        .tensor_f32("output_norm.weight", &[e], &get("ln_f.weight", &[e])?)
        .tensor_f32("output_norm.bias", &[e], &get("ln_f.bias", &[e])?);
    // An untied head (rare for GPT-2) is stored as lm_head.weight, outside the transformer prefix.
    if let Ok(head) = weights.tensor("lm_head.weight") {
        if head.shape != [v, e] {
            return Err(HfModelError::Shape {
                name: head.name.clone(),
                found: head.shape.clone(),
                expected: vec![v, e],
            });
        }
        w = format.matrix(w, "output.weight", e, v, &weights.to_f32(head)?)?;
    }
    Ok(w.to_bytes())
}

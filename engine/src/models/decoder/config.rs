//! Hyper-parameters of a supported architecture, read from GGUF metadata the way llama.cpp
//! reads them (`llama_model::load_hparams` and the per-architecture graph builders).

use serde::Serialize;

use crate::gguf::{GgufFile, MetaValue, Metadata};
use crate::ops::RopeStyle;

use super::ModelError;

/// More layers than any model has: a count above it is a broken or hostile file, refused before
/// anything is sized by it (an allocation that fails aborts the process, it does not panic).
pub const MAX_LAYERS: usize = 1 << 12;

/// The architectures this engine runs (`general.architecture`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama",
    "qwen2",
    "qwen3",
    "gemma3",
    "gpt2",
    "bert",
    "nomic-bert",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// LLaMA 2/3/3.1/3.2, Mistral, TinyLlama, SmolLM2: RMSNorm, normal RoPE, SwiGLU.
    Llama,
    /// Qwen2/2.5: LLaMA with NeoX RoPE and Q/K/V biases.
    Qwen2,
    /// Qwen3: NeoX RoPE and RMS QK-norm, no biases.
    Qwen3,
    /// Gemma 3: QK-norm, pre- and post-norms, GeGLU, scaled embeddings, 5:1 local:global
    /// attention with a sliding window and a separate RoPE base for local layers.
    Gemma3,
    /// GPT-2: LayerNorm, learned positions, fused QKV with biases, GELU MLP.
    Gpt2,
    /// BERT encoders (bge, MiniLM, e5 …): bidirectional attention, LayerNorm after each
    /// residual add, learned positions and token types, exact-GELU MLP; no LM head, so they
    /// embed only.
    Bert,
    /// Nomic's BERT (nomic-embed-text): BERT's post-norm encoder with NeoX RoPE instead of
    /// learned positions, fused QKV and a SwiGLU MLP, all without biases.
    #[serde(rename = "nomic-bert")]
    NomicBert,
}

impl Arch {
    pub fn from_name(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            "gpt2" => Arch::Gpt2,
            "bert" => Arch::Bert,
            "nomic-bert" => Arch::NomicBert,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Gpt2 => "gpt2",
            Arch::Bert => "bert",
            Arch::NomicBert => "nomic-bert",
        }
    }

    /// The BERT family: encoders that read the whole text at once and embed it.
    pub fn is_encoder(self) -> bool {
        matches!(self, Arch::Bert | Arch::NomicBert)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// `x / rms(x) · w`.
    Rms,
    /// `(x − mean) / std · w + b`.
    Layer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    /// `down(silu(gate(x)) · up(x))`.
    SwiGlu,
    /// `down(gelu(gate(x)) · up(x))`.
    GeGlu,
    /// `down(gelu(up(x)))`, GELU's tanh approximation (GPT-2's `gelu_new`).
    Gelu,
    /// `down(gelu(up(x)))` with the exact, erf-based GELU (BERT's `gelu`).
    GeluErf,
}

/// Rotary embedding parameters of one kind of layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RopeConfig {
    pub style: RopeStyle,
    pub n_rot: usize,
    pub freq_base: f32,
    /// Linear position interpolation: positions are multiplied by this (1 / scaling factor).
    pub freq_scale: f32,
}

/// Everything the forward pass needs to know about a model's shape.
///
/// Serialized (serde, field names as here, enums in lower case) it is what the tinygrad worker
/// receives with each Load: the one derivation of a model's hyper-parameters, so the two
/// backends cannot read a file differently.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Dimensions of one key (and query) head.
    pub head_dim_k: usize,
    /// Dimensions of one value head.
    pub head_dim_v: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    /// Longest context the model was trained for (`{arch}.context_length`).
    pub context_length: usize,
    pub norm: NormKind,
    pub norm_eps: f32,
    pub ffn: FfnKind,
    /// RoPE of full-attention layers; `None` for learned absolute positions (GPT-2).
    pub rope: Option<RopeConfig>,
    /// RoPE of sliding-window layers (Gemma 3 uses another base there).
    pub rope_swa: Option<RopeConfig>,
    /// Multiplies `q·k` before the softmax.
    pub attention_scale: f32,
    /// Tokens a sliding-window layer attends to, the current one included.
    pub sliding_window: Option<usize>,
    /// Which layers use the sliding window.
    pub swa_layers: Vec<bool>,
    /// Multiplies token embeddings (Gemma: √n_embd).
    pub embedding_scale: Option<f32>,
    /// RMS-normalise each query and key head before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Normalise the attention and FFN outputs before adding them to the residual (Gemma).
    pub post_norms: bool,
    /// Each token attends only to itself and earlier tokens. False for the BERT family, whose
    /// tokens see the whole text: such a text must be fed in one pass.
    pub causal: bool,
    /// LayerNorm the residual after each block's add (BERT's post-LN) instead of normalising
    /// each block's input (pre-LN); the embeddings are normalised too, and there is no
    /// output norm.
    pub norm_after_residual: bool,
    /// The model has an LM head and so can continue text; the BERT family only embeds.
    pub has_lm_head: bool,
}

impl ModelConfig {
    /// The configuration of a GGUF file of a supported architecture, without loading its
    /// weights (the vocabulary size is the token embedding's).
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
        let arch = file.metadata().architecture().unwrap_or("");
        if Arch::from_name(arch).is_none() {
            return Err(ModelError::UnsupportedArchitecture {
                arch: arch.to_owned(),
            });
        }
        let (_, n_vocab) = super::weights::token_embedding(file)?;
        // Every layer has tensors of its own: a file cannot hold more layers than tensors.
        let key = format!("{arch}.block_count");
        if let Some(n_layer) = file.metadata().arch_u64("block_count") {
            if n_layer > file.tensors().len() as u64 {
                return Err(invalid(
                    &key,
                    &format!(
                        "{n_layer} layers, but the file has only {} tensors",
                        file.tensors().len()
                    ),
                ));
            }
        }
        ModelConfig::from_metadata(file.metadata(), n_vocab)
    }

    /// Reads the hyper-parameters of a supported architecture. `n_vocab` comes from the token
    /// embedding tensor, which is authoritative for the shapes the forward pass uses.
    pub fn from_metadata(meta: &Metadata, n_vocab: usize) -> Result<ModelConfig, ModelError> {
        let arch_name = meta
            .architecture()
            .ok_or_else(|| ModelError::MissingMetadata("general.architecture".into()))?;
        let arch =
            Arch::from_name(arch_name).ok_or_else(|| ModelError::UnsupportedArchitecture {
                arch: arch_name.to_owned(),
            })?;
        let key = |suffix: &str| format!("{arch_name}.{suffix}");
        let required_u64 = |suffix: &str| -> Result<usize, ModelError> {
            meta.arch_u64(suffix)
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::MissingMetadata(key(suffix)))
        };

        let n_layer = required_u64("block_count")?;
        if n_layer > MAX_LAYERS {
            return Err(invalid(
                &key("block_count"),
                &format!("{n_layer} layers is more than any model has (at most {MAX_LAYERS})"),
            ));
        }
        let n_embd = required_u64("embedding_length")?;
        let context_length = required_u64("context_length")?;
        let n_head = uniform_per_layer(meta, &key("attention.head_count"), n_layer)?
            .ok_or_else(|| ModelError::MissingMetadata(key("attention.head_count")))?;
        let n_head_kv =
            uniform_per_layer(meta, &key("attention.head_count_kv"), n_layer)?.unwrap_or(n_head);
        let n_ff = uniform_per_layer(meta, &key("feed_forward_length"), n_layer)?
            .ok_or_else(|| ModelError::MissingMetadata(key("feed_forward_length")))?;
        if n_layer == 0 || n_embd == 0 || n_head == 0 || n_head_kv == 0 || n_ff == 0 {
            return Err(invalid(&key("block_count"), "a dimension is zero"));
        }
        if n_head % n_head_kv != 0 {
            return Err(invalid(
                &key("attention.head_count_kv"),
                &format!("{n_head} query heads are not a multiple of {n_head_kv} KV heads"),
            ));
        }
        let head_dim_k = meta
            .arch_u64("attention.key_length")
            .map_or(n_embd / n_head, |v| v as usize);
        let head_dim_v = meta
            .arch_u64("attention.value_length")
            .map_or(n_embd / n_head, |v| v as usize);
        if head_dim_k == 0 || head_dim_v == 0 {
            return Err(invalid(
                &key("attention.key_length"),
                "head dimension is zero",
            ));
        }

        let (norm, eps_key) = match arch {
            Arch::Gpt2 | Arch::Bert | Arch::NomicBert => {
                (NormKind::Layer, "attention.layer_norm_epsilon")
            }
            _ => (NormKind::Rms, "attention.layer_norm_rms_epsilon"),
        };
        let norm_eps = meta
            .arch_f32(eps_key)
            .ok_or_else(|| ModelError::MissingMetadata(key(eps_key)))?;

        // llama.cpp's `llama_model_rope_type`: normal for LLaMA, NeoX for Qwen and Gemma,
        // none for GPT-2 (learned positions).
        let rope_style = match arch {
            Arch::Llama => Some(RopeStyle::Normal),
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 | Arch::NomicBert => Some(RopeStyle::Neox),
            Arch::Gpt2 | Arch::Bert => None,
        };
        let n_rot = meta
            .arch_u64("rope.dimension_count")
            .map_or(head_dim_k, |v| v as usize);
        if rope_style.is_some() && (n_rot > head_dim_k || !n_rot.is_multiple_of(2)) {
            return Err(invalid(
                &key("rope.dimension_count"),
                &format!("{n_rot} rotated dimensions in a head of {head_dim_k}"),
            ));
        }
        if arch == Arch::Llama && n_rot != head_dim_k {
            return Err(invalid(
                &key("rope.dimension_count"),
                &format!("LLaMA rotates the whole head ({head_dim_k}), not {n_rot}"),
            ));
        }
        let freq_base = meta.arch_f32("rope.freq_base").unwrap_or(10000.0);
        let freq_scale = rope_freq_scale(meta, arch_name)?;
        let rope = rope_style.map(|style| RopeConfig {
            style,
            n_rot,
            freq_base,
            freq_scale,
        });

        let mut sliding_window = None;
        let mut swa_layers = vec![false; n_layer];
        let mut rope_swa = rope;
        let mut attention_scale = 1.0 / (head_dim_k as f32).sqrt();
        let mut embedding_scale = None;
        match arch {
            Arch::Llama => {
                // Some LLaMA-family conversions (Granite-style) carry an explicit scale.
                if let Some(s) = meta.arch_f32("attention.scale").filter(|&s| s != 0.0) {
                    attention_scale = s;
                }
            }
            Arch::Gemma3 => {
                let window = required_u64("attention.sliding_window")?;
                sliding_window = Some(window);
                // Every sixth layer attends globally; the other five use the window
                // (llama.cpp's `set_swa_pattern(6)`: layer il is local when il % 6 < 5).
                for (il, swa) in swa_layers.iter_mut().enumerate() {
                    *swa = il % 6 < 5;
                }
                // Local layers use base 10 000 and no position scaling.
                rope_swa = rope.map(|r| RopeConfig {
                    freq_base: meta.arch_f32("rope.freq_base_swa").unwrap_or(10000.0),
                    freq_scale: 1.0,
                    ..r
                });
                // Gemma's query pre-attention scalar: 1/√head_dim, except the 27B model
                // (62 layers), which uses 1/√(n_embd / n_head).
                attention_scale = if n_layer == 62 {
                    1.0 / ((n_embd / n_head) as f32).sqrt()
                } else {
                    1.0 / (head_dim_k as f32).sqrt()
                };
                embedding_scale = Some((n_embd as f32).sqrt());
            }
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gpt2 | Arch::Bert | Arch::NomicBert => {}
        }
        let encoder = arch.is_encoder();
        // Converters write `{arch}.attention.causal = false` for encoders; a file that claims
        // otherwise for an architecture this engine runs one way is refused, not half-obeyed.
        if let Some(causal) = meta
            .arch_get("attention.causal")
            .and_then(MetaValue::as_bool)
        {
            if causal == encoder {
                return Err(invalid(
                    &key("attention.causal"),
                    &format!("{causal}, but {arch_name} attention is always the other way"),
                ));
            }
        }

        Ok(ModelConfig {
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            n_ff,
            n_vocab,
            context_length,
            norm,
            norm_eps,
            ffn: match arch {
                Arch::Gemma3 => FfnKind::GeGlu,
                Arch::Gpt2 => FfnKind::Gelu,
                // transformers' BERT uses the exact GELU (llama.cpp its tanh approximation,
                // which differs by up to ~5e-4 per activation).
                Arch::Bert => FfnKind::GeluErf,
                _ => FfnKind::SwiGlu,
            },
            rope,
            rope_swa,
            attention_scale,
            sliding_window,
            swa_layers,
            embedding_scale,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            post_norms: arch == Arch::Gemma3,
            causal: !encoder,
            norm_after_residual: encoder,
            has_lm_head: !encoder,
        })
    }

    /// Query heads per KV head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim_k
    }

    /// Width of all key heads together.
    pub fn k_dim(&self) -> usize {
        self.n_head_kv * self.head_dim_k
    }

    /// Width of all value heads together.
    pub fn v_dim(&self) -> usize {
        self.n_head_kv * self.head_dim_v
    }

    /// Width of the attention output (all heads' values).
    pub fn attn_out_dim(&self) -> usize {
        self.n_head * self.head_dim_v
    }

    /// The RoPE of layer `il`.
    pub fn rope_for_layer(&self, il: usize) -> Option<&RopeConfig> {
        if self.swa_layers.get(il).copied().unwrap_or(false) {
            self.rope_swa.as_ref()
        } else {
            self.rope.as_ref()
        }
    }

    /// The sliding window of layer `il`, if it has one.
    pub fn window_for_layer(&self, il: usize) -> Option<usize> {
        if self.swa_layers.get(il).copied().unwrap_or(false) {
            self.sliding_window
        } else {
            None
        }
    }

    /// Bytes of f16 KV cache per token of context, all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.n_layer * (self.k_dim() + self.v_dim()) * 2
    }
}

fn invalid(key: &str, reason: &str) -> ModelError {
    ModelError::InvalidMetadata {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

/// A value stored once or per layer. Per-layer arrays must be uniform: the forward pass keeps
/// one shape for all layers.
fn uniform_per_layer(
    meta: &Metadata,
    key: &str,
    n_layer: usize,
) -> Result<Option<usize>, ModelError> {
    match meta.get(key) {
        None => Ok(None),
        Some(MetaValue::Array(a)) => {
            let values: Vec<Option<i64>> = (0..a.len()).map(|i| a.get_i64(i)).collect();
            let first = values.first().copied().flatten();
            if values.len() != n_layer || values.iter().any(|v| *v != first) {
                return Err(invalid(
                    key,
                    "per-layer values that differ between layers are not supported",
                ));
            }
            first
                .and_then(|v| usize::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| invalid(key, "not a non-negative integer"))
        }
        Some(v) => v
            .as_u64()
            .map(|v| Some(v as usize))
            .ok_or_else(|| invalid(key, "not a non-negative integer")),
    }
}

/// The linear position scaling, as llama.cpp derives it: `rope.scaling.type` none → 1,
/// linear → 1/`rope.scaling.factor` (or the older `rope.scale_linear`); YaRN and LongRoPE are
/// not implemented and refused rather than silently ignored.
fn rope_freq_scale(meta: &Metadata, arch_name: &str) -> Result<f32, ModelError> {
    let scaling = meta
        .arch_get("rope.scaling.type")
        .and_then(MetaValue::as_str);
    let factor = meta
        .arch_f32("rope.scaling.factor")
        .or_else(|| meta.arch_f32("rope.scale_linear"))
        .filter(|&f| f != 0.0);
    match scaling.unwrap_or("linear") {
        "none" => Ok(1.0),
        "linear" => Ok(factor.map_or(1.0, |f| 1.0 / f)),
        other => Err(ModelError::Unsupported(format!(
            "{arch_name}.rope.scaling.type = {other:?} (only none and linear are implemented)"
        ))),
    }
}

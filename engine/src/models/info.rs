//! What a GGUF model is, read from its metadata alone, and how much memory keeping it resident
//! takes. Nothing here touches tensor data, so it answers in milliseconds for any file size.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::gguf::{GgufFile, MetaValue, Metadata};
use crate::quant::GgmlType;

/// The hyper-parameters that matter for sizing and running a model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelSummary {
    pub architecture: String,
    pub name: Option<String>,
    /// Longest context the model was trained for (`{arch}.context_length`).
    pub context_length: Option<u64>,
    pub block_count: u64,
    pub embedding_length: u64,
    pub feed_forward_length: u64,
    pub head_count: u64,
    /// KV heads per layer (grouped-query attention); GGUF may store one value or one per layer.
    pub head_count_kv: Vec<u64>,
    pub key_length: u64,
    pub value_length: u64,
    pub sliding_window: Option<u64>,
    pub vocab_size: u64,
    /// `tokenizer.ggml.model` (`gpt2`, `llama`, …) and `tokenizer.ggml.pre`.
    pub tokenizer_model: Option<String>,
    pub tokenizer_pre: Option<String>,
    pub has_chat_template: bool,
}

impl ModelSummary {
    pub fn from_metadata(meta: &Metadata) -> ModelSummary {
        let arch = meta.architecture().unwrap_or("unknown").to_owned();
        let u = |suffix: &str| meta.arch_u64(suffix);
        let block_count = u("block_count").unwrap_or(0);
        let embedding_length = u("embedding_length").unwrap_or(0);
        let head_count = per_layer(meta.arch_get("attention.head_count"), block_count)
            .into_iter()
            .max()
            .unwrap_or(0);
        let head_count_kv = match meta.arch_get("attention.head_count_kv") {
            Some(v) => per_layer(Some(v), block_count),
            None => vec![head_count; block_count.min(MAX_LAYERS) as usize],
        };
        let default_head_dim = embedding_length.checked_div(head_count).unwrap_or(0);
        let vocab_size = meta
            .get_array("tokenizer.ggml.tokens")
            .map(|a| a.len() as u64)
            .or_else(|| u("vocab_size"))
            .unwrap_or(0);
        ModelSummary {
            name: meta.get_str("general.name").map(str::to_owned),
            context_length: u("context_length"),
            block_count,
            embedding_length,
            feed_forward_length: per_layer(meta.arch_get("feed_forward_length"), block_count)
                .into_iter()
                .max()
                .unwrap_or(0),
            head_count,
            head_count_kv,
            key_length: u("attention.key_length").unwrap_or(default_head_dim),
            value_length: u("attention.value_length").unwrap_or(default_head_dim),
            sliding_window: u("attention.sliding_window"),
            vocab_size,
            tokenizer_model: meta.get_str("tokenizer.ggml.model").map(str::to_owned),
            tokenizer_pre: meta.get_str("tokenizer.ggml.pre").map(str::to_owned),
            has_chat_template: meta.get_str("tokenizer.chat_template").is_some(),
            architecture: arch,
        }
    }

    /// A human name for the tokenizer kind, from metadata alone.
    pub fn tokenizer_kind(&self) -> String {
        match (
            self.tokenizer_model.as_deref(),
            self.tokenizer_pre.as_deref(),
        ) {
            (Some("gpt2"), Some(pre)) => format!("byte-level BPE (gpt2, pre-tokenizer {pre})"),
            (Some("gpt2"), None) => "byte-level BPE (gpt2)".into(),
            (Some("llama"), _) => "SentencePiece (llama, byte fallback)".into(),
            (Some(other), _) => format!("{other} (not supported by egpu)"),
            (None, _) => "none".into(),
        }
    }

    /// f16 K and V elements stored per token of context, summed over layers.
    pub fn kv_elements_per_token(&self) -> u64 {
        // Saturating: the inputs are untrusted metadata.
        let per_head = self.key_length.saturating_add(self.value_length);
        self.head_count_kv.iter().fold(0u64, |sum, &kv| {
            sum.saturating_add(kv.saturating_mul(per_head))
        })
    }
}

/// Most layers a per-layer list is expanded to. `block_count` is untrusted: a corrupt file must
/// not make a one-value-per-layer vector of 2^32 entries (found by the fuzzer). Real models have
/// at most a few hundred layers.
pub const MAX_LAYERS: u64 = 1 << 12;

/// A value that GGUF stores either once for all layers or as a per-layer array.
fn per_layer(value: Option<&MetaValue>, layers: u64) -> Vec<u64> {
    let layers = layers.min(MAX_LAYERS);
    match value {
        Some(MetaValue::Array(a)) => (0..a.len())
            .map(|i| {
                a.get_i64(i)
                    .and_then(|v| u64::try_from(v).ok())
                    .unwrap_or(0)
            })
            .collect(),
        Some(v) => vec![v.as_u64().unwrap_or(0); layers as usize],
        None => Vec::new(),
    }
}

/// Rows of activations the scratch estimate provisions for: the prefill chunk that the
/// scheduler feeds in one forward pass (decode steps of several sequences are smaller).
pub const SCRATCH_BATCH_TOKENS: u64 = 32;

/// Memory needed to keep a model resident at a given context, in bytes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub context: u64,
    /// Tensor data, used in place (quantized) from the file.
    pub weights: u64,
    /// K and V in f16 for `context` tokens, all layers.
    pub kv_cache: u64,
    /// Activations for one forward pass of [`SCRATCH_BATCH_TOKENS`] tokens.
    pub scratch: u64,
    pub total: u64,
}

/// Estimates resident memory as weights + f16 KV cache + scratch:
///
/// - KV cache = `context × Σ_layers n_kv_heads × (key_len + value_len) × 2 bytes`;
/// - scratch = `4 bytes × B × (3·embd + q + 2·kv + 2·ffn + heads·context + vocab)` with
///   `B` = [`SCRATCH_BATCH_TOKENS`]: the residual stream and its normalised copy, the
///   attention projections, the two FFN up-projections, one row of attention scores per head,
///   and the logits, all f32.
pub fn estimate_memory(file: &GgufFile, context: u64) -> MemoryEstimate {
    let s = ModelSummary::from_metadata(file.metadata());
    estimate_from_summary(&s, file.tensor_bytes(), context)
}

pub fn estimate_from_summary(s: &ModelSummary, weights: u64, context: u64) -> MemoryEstimate {
    let kv_cache = context
        .saturating_mul(s.kv_elements_per_token())
        .saturating_mul(2);
    let scratch = scratch_bytes_per_token(s, context).saturating_mul(SCRATCH_BATCH_TOKENS);
    MemoryEstimate {
        context,
        weights,
        kv_cache,
        scratch,
        total: weights.saturating_add(kv_cache).saturating_add(scratch),
    }
}

/// Scratch bytes per token of a forward pass (the formula of [`estimate_memory`] without the
/// batch factor): a scheduler that feeds at most `B` tokens per pass needs `B ×` this. It
/// includes the token's f16 keys and values once: a pass that embeds several texts together
/// keeps all but the first in caches made for that pass.
pub fn scratch_bytes_per_token(s: &ModelSummary, context: u64) -> u64 {
    let max_kv_heads = s.head_count_kv.iter().copied().max().unwrap_or(0);
    // Saturating throughout: every input comes from untrusted metadata.
    let q = s.head_count.saturating_mul(s.key_length);
    let kv = max_kv_heads.saturating_mul(s.key_length.max(s.value_length));
    let per_row = [
        s.embedding_length.saturating_mul(3),
        q,
        kv.saturating_mul(2),
        s.feed_forward_length.saturating_mul(2),
        s.head_count.saturating_mul(context),
        s.vocab_size,
        // f16 keys and values of every layer: half of `kv` f32s each.
        s.kv_elements_per_token() / 2,
    ]
    .into_iter()
    .fold(0u64, u64::saturating_add);
    per_row.saturating_mul(4)
}

/// Tensor count and bytes for each GGML type in a file: the model's "quant mix".
pub fn bytes_by_type(file: &GgufFile) -> BTreeMap<GgmlType, (usize, u64)> {
    let mut by_type = BTreeMap::new();
    for t in file.tensors() {
        let entry = by_type.entry(t.ggml_type).or_insert((0usize, 0u64));
        entry.0 += 1;
        entry.1 += t.n_bytes;
    }
    by_type
}

/// The quantization a file declares as a whole (`general.file_type`, llama.cpp's
/// `LLAMA_FTYPE_MOSTLY_*` names: `Q4_K_M`, `Q8_0`, ...), which says more than the type that
/// holds most bytes (a Q4_K_M file's embedding table is often Q6_K or Q8_0).
pub fn file_type_name(meta: &Metadata) -> Option<&'static str> {
    let code = match meta.get("general.file_type")? {
        MetaValue::U32(v) => *v as u64,
        MetaValue::I32(v) => u64::try_from(*v).ok()?,
        MetaValue::U64(v) => *v,
        MetaValue::I64(v) => u64::try_from(*v).ok()?,
        _ => return None,
    };
    Some(match code {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::write::GgufWriter;
    use crate::gguf::MetaArray;

    fn tiny(kv: MetaValue) -> GgufFile {
        let bytes = GgufWriter::new()
            .kv("general.architecture", MetaValue::String("llama".into()))
            .kv("llama.block_count", MetaValue::U32(2))
            .kv("llama.embedding_length", MetaValue::U32(64))
            .kv("llama.feed_forward_length", MetaValue::U32(128))
            .kv("llama.attention.head_count", MetaValue::U32(4))
            .kv("llama.attention.head_count_kv", kv)
            .kv(
                "tokenizer.ggml.tokens",
                MetaValue::Array(MetaArray::String(vec!["a".into(); 10])),
            )
            .tensor_f32("w", &[8], &[0.0; 8])
            .to_bytes();
        GgufFile::from_bytes(bytes).unwrap()
    }

    #[test]
    fn absurd_layer_counts_allocate_nothing_big() {
        let bytes = GgufWriter::new()
            .kv("general.architecture", MetaValue::String("llama".into()))
            .kv("llama.block_count", MetaValue::U64(u64::MAX))
            .kv("llama.attention.head_count", MetaValue::U32(u32::MAX))
            .kv("llama.embedding_length", MetaValue::U64(u64::MAX))
            .to_bytes();
        let file = GgufFile::from_bytes(bytes).unwrap();
        let summary = ModelSummary::from_metadata(file.metadata());
        assert_eq!(summary.block_count, u64::MAX);
        assert_eq!(summary.head_count_kv.len() as u64, MAX_LAYERS);
        let estimate = estimate_memory(&file, u64::MAX);
        assert_eq!(
            estimate.total,
            u64::MAX,
            "sizes saturate instead of overflowing"
        );
    }

    #[test]
    fn kv_cache_counts_each_layer() {
        // head_dim = 64 / 4 = 16; per layer per token: kv_heads × (16 + 16) f16 values.
        let uniform = estimate_memory(&tiny(MetaValue::U32(2)), 100);
        assert_eq!(uniform.kv_cache, 100 * 2 * (2 * 32) * 2);
        let per_layer = estimate_memory(&tiny(MetaValue::Array(MetaArray::I32(vec![1, 3]))), 100);
        assert_eq!(per_layer.kv_cache, 100 * (32 + 3 * 32) * 2);
        assert_eq!(uniform.weights, 32);
        assert_eq!(
            uniform.total,
            uniform.weights + uniform.kv_cache + uniform.scratch
        );
        assert!(uniform.scratch > 0);
    }
}

//! The architectures the engine runs, and what a model file says about itself.
//!
//! - [`decoder`]: decoder-only transformers (llama family, qwen2/3, gemma3, gpt2) and the
//!   BERT-family encoders (bert, nomic-bert): one forward pass configured by flags, KV caches
//!   outside the model, batched steps.
//! - [`marian`]: the Marian encoder-decoder (opus-mt), greedy and beam-search translation.
//! - [`info`]: hyper-parameters and memory estimates from metadata alone.
//! - [`embedding`]: pooling final hidden states into text embeddings.

pub mod decoder;
pub mod embedding;
pub mod info;
pub mod marian;

/// What a model does, which decides how it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// Continues text: Generate and Score.
    Decoder,
    /// Translates sentences: Translate.
    Translator,
    /// Embeds texts only (the BERT family: no LM head): Embed.
    Embedder,
}

impl ModelKind {
    /// The kind of a GGUF's `general.architecture`.
    pub fn of_architecture(architecture: &str) -> ModelKind {
        match architecture {
            "marian" => ModelKind::Translator,
            "bert" | "nomic-bert" => ModelKind::Embedder,
            _ => ModelKind::Decoder,
        }
    }
}

//! The core API's requests, as every front end hands them over, and their limits.

use std::time::Instant;

use egpu_engine::chat::ChatMessage;
use egpu_engine::sampler::SamplingParams;

pub use super::tools::{ToolChoice, Tools};
use crate::error::DaemonError;
pub use crate::scheduler::constraint::Constraint;
use crate::scheduler::ClientKey;

/// Most alternatives a request may ask for per position.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most sentences one Translate call takes (a batch that large already fills the device).
pub const MAX_TRANSLATE_TEXTS: usize = 256;
/// Most beams a Translate call may ask for.
pub const MAX_BEAMS: u32 = 16;
/// Most stop strings a generation may have, and their longest length in bytes: every token
/// costs a scan of each against the held-back text, on the model's batching thread.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Most token ids one Detokenize call takes.
pub const MAX_DETOKENIZE_IDS: usize = 1 << 20;
/// The input bytes a request may carry, checked before tokenizing (a tokenizer keeps tens of
/// bytes of state per character, and its work cannot be cancelled): 32 bytes per token of the
/// model's context, at least 64 KiB, at most 16 MiB. Real text averages 3 to 5 bytes a token.
pub fn max_input_bytes(context: usize) -> usize {
    context.saturating_mul(32).clamp(64 << 10, 16 << 20)
}

/// Refuses input larger than [`max_input_bytes`] before it is tokenized.
pub fn check_input_bytes(bytes: usize, context: usize, what: &str) -> Result<(), DaemonError> {
    let limit = max_input_bytes(context);
    if bytes > limit {
        return Err(DaemonError::InvalidArgument(format!(
            "{what} is {bytes} bytes; at most {limit} for a model with a context of {context} \
             tokens (32 bytes per token)"
        )));
    }
    Ok(())
}

/// Refuses more than [`MAX_STOPS`] stop strings, or one longer than [`MAX_STOP_BYTES`].
pub fn check_stops(stops: &[String]) -> Result<(), DaemonError> {
    if stops.len() > MAX_STOPS {
        return Err(DaemonError::InvalidArgument(format!(
            "{} stop strings; at most {MAX_STOPS}",
            stops.len()
        )));
    }
    if let Some(long) = stops.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(DaemonError::InvalidArgument(format!(
            "a stop string is {} bytes; at most {MAX_STOP_BYTES}",
            long.len()
        )));
    }
    Ok(())
}

impl PromptInput {
    /// The bytes of text it carries (roles included).
    pub fn bytes(&self) -> usize {
        match self {
            PromptInput::Text(t) => t.len(),
            PromptInput::Messages(m) => m.iter().map(|m| m.role.len() + m.content.len()).sum(),
        }
    }
}

/// Who asks, and until when the answer is wanted.
#[derive(Debug, Clone)]
pub struct Caller {
    pub client: ClientKey,
    pub deadline: Option<Instant>,
}

/// What a generation continues.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Text: raw, or one user message for the chat template.
    Text(String),
    /// A conversation, rendered by the model's chat template.
    Messages(Vec<ChatMessage>),
}

/// Sampling as requested; [`SamplingOptions::validate`] turns it into the engine's settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SamplingOptions {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    pub top_p: Option<f32>,
    pub min_p: f32,
    pub repeat_penalty: Option<f32>,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub penalty_last_n: Option<u32>,
    pub seed: Option<u64>,
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<SamplingParams, DaemonError> {
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(DaemonError::InvalidArgument(what.to_owned()))
            }
        };
        check(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be a finite number >= 0",
        )?;
        let top_p = self.top_p.unwrap_or(1.0);
        check(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1]")?;
        check((0.0..=1.0).contains(&self.min_p), "min_p must be in [0, 1]")?;
        let repeat = self.repeat_penalty.unwrap_or(1.0);
        check(
            repeat.is_finite() && repeat > 0.0,
            "repeat_penalty must be a finite number > 0",
        )?;
        check(
            self.frequency_penalty.is_finite() && self.presence_penalty.is_finite(),
            "frequency_penalty and presence_penalty must be finite",
        )?;
        let mut params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k as usize,
            top_p,
            min_p: self.min_p,
            repeat_penalty: repeat,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        };
        if let Some(n) = self.penalty_last_n {
            params.penalty_last_n = n as usize;
        }
        Ok(params)
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub model: String,
    pub input: Option<PromptInput>,
    /// Text as it is (no chat template).
    pub raw: bool,
    pub sampling: SamplingOptions,
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    /// Alternatives reported per generated token (0 = none).
    pub top_logprobs: u32,
    /// Whether an end-of-generation token ends the generation (default yes).
    pub stop_at_eos: Option<bool>,
    /// A JSON schema, regex or grammar the output must match.
    pub constraint: Option<Constraint>,
    /// Tools the model may call (through its chat template; not with `raw`).
    pub tools: Option<Tools>,
}

#[derive(Debug, Clone, Default)]
pub struct ScoreRequest {
    pub model: String,
    pub text: String,
    pub raw: bool,
    pub top_k: u32,
}

#[derive(Debug, Clone, Default)]
pub struct EmbedRequest {
    pub model: String,
    /// The texts, each embedded on its own (no chat template).
    pub inputs: Vec<String>,
    /// Keep the first this many dimensions (the model's all if unset).
    pub dimensions: Option<u32>,
    /// Scale each vector to unit length (default yes, as OpenAI and Ollama return them).
    pub normalize: Option<bool>,
    /// Cut an input longer than the model's context to fit (Ollama's `truncate`, its
    /// default) instead of refusing it; the end-of-text token ([SEP]) stays last.
    pub truncate: bool,
}

/// Most texts one embedding request may carry.
pub const MAX_EMBED_INPUTS: usize = 2048;

#[derive(Debug, Clone, Default)]
pub struct TranslateRequest {
    pub model: String,
    pub texts: Vec<String>,
    /// 0 = the model's.
    pub num_beams: u32,
    /// 0 = the model's.
    pub max_tokens: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_validation() {
        let ok = SamplingOptions {
            temperature: 0.7,
            top_p: Some(0.9),
            ..Default::default()
        };
        let params = ok.validate().unwrap();
        assert_eq!((params.temperature, params.top_p), (0.7, 0.9));
        for bad in [
            SamplingOptions {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingOptions {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingOptions {
                top_p: Some(0.0),
                ..Default::default()
            },
            SamplingOptions {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingOptions {
                repeat_penalty: Some(0.0),
                ..Default::default()
            },
        ] {
            let err = bad.validate().unwrap_err();
            assert!(matches!(err, DaemonError::InvalidArgument(_)), "{bad:?}");
        }
    }
}

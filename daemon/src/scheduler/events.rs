//! What the runners send back: a generation's stream of events, a score, a translation. Each
//! front end maps these to its protocol once.

use std::time::Duration;

use crate::error::DaemonError;

/// One token's log-probability under the model (natural log, before sampling settings).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The token's text (lossy UTF-8 of its bytes).
    pub text: String,
}

/// The chosen token and the most likely ones at one generation step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: TokenLogprob,
    /// Most likely first.
    pub top: Vec<TokenLogprob>,
}

/// Text that became final, and the tokens it came from. A chunk may carry text without
/// tokens (text held back for a stop string or an unfinished UTF-8 character, released at
/// the end) or a token without text (held back).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenChunk {
    pub text: String,
    pub token_ids: Vec<u32>,
    /// One entry per token when log-probabilities were asked for.
    pub logprobs: Vec<TokenLogprobs>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// A stop string appeared (it is not part of the text).
    StopString,
    /// The slot's context is full.
    ContextLength,
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    pub queue: Duration,
    pub prefill: Duration,
    pub decode: Duration,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// The end of a successful generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDone {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose cache entries were reused from an earlier request (not prefilled).
    pub cached_prompt_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
}

/// What a generation's stream carries: chunks, then exactly one `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    Chunk(TokenChunk),
    Done(GenerationDone),
    Failed(DaemonError),
}

/// The score of one position of a text.
#[derive(Debug, Clone, PartialEq)]
pub struct ScorePosition {
    /// log P(token | the tokens before it); None at position 0.
    pub logprob: Option<f32>,
    /// The most likely tokens at this position, most likely first.
    pub top: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScoreResult {
    pub token_ids: Vec<u32>,
    pub positions: Vec<ScorePosition>,
    pub total_logprob: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub score: f32,
    pub source_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TranslateResult {
    pub translations: Vec<Translation>,
    pub num_beams: usize,
    pub queued: Duration,
    pub translating: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedResult {
    /// One vector per input, in order.
    pub embeddings: Vec<Vec<f32>>,
    /// Tokens read, all inputs together.
    pub prompt_tokens: usize,
}

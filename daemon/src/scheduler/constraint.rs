//! Constrained generation: JSON schemas, regular expressions and Lark grammars, enforced on
//! every sampled token by masking the logits before the sampler sees them.
//!
//! The engine is `llguidance` (the one llama.cpp, vLLM and SGLang use): given the vocabulary as
//! bytes it compiles a grammar once per request and computes, for each step, the set of tokens
//! that keep the output inside the language. Because the mask is applied here, to the logits
//! that either backend returns, constrained output is the same on the CPU engine and on the
//! tinygrad worker.
//!
//! - [`Grammars`]: one per resident decoder model, built at its first constrained request
//!   (the token trie of a 262k vocabulary takes a moment): the vocabulary as llguidance sees
//!   it, and its parser factory.
//! - [`Constraint`]: what a request asks for, checked and compiled by [`Grammars::compile`]
//!   into a [`TokenConstraint`], which the decoder runner consults at every step.
//!
//! The vocabulary: every ordinary token is its bytes (byte-fallback tokens are their one byte,
//! byte-level BPE pieces their decoded bytes), so grammars see text, not token spellings.
//! Control, unknown and unused tokens get llguidance's special-token marker (0xFF) before their
//! name, so no grammar's text can produce them; the model's end-of-generation tokens are its
//! EOS set, allowed exactly where the grammar may end.

use std::sync::{Arc, OnceLock};

use egpu_engine::tokenizer::{TokenAttrs, Tokenizer};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::error::DaemonError;

/// What a generation must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON Schema as JSON text (the subset of draft 2020-12 llguidance supports; an
    /// unsupported keyword is an error, never ignored).
    JsonSchema(String),
    /// Any JSON object (OpenAI's `json_object`, Ollama's `"json"`).
    JsonObject,
    /// A regular expression the whole output matches.
    Regex(String),
    /// A Lark grammar (llguidance's dialect: `start: ...`, `%json { ... }` for embedded schemas).
    Lark(String),
}

impl Constraint {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::JsonObject => "JSON object",
            Constraint::Regex(_) => "regular expression",
            Constraint::Lark(_) => "Lark grammar",
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar, DaemonError> {
        Ok(match self {
            Constraint::JsonSchema(text) => {
                let schema: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    DaemonError::InvalidArgument(format!("invalid JSON schema: not JSON: {e}"))
                })?;
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(DaemonError::InvalidArgument(format!(
                        "invalid JSON schema: a schema is an object or a boolean, not {schema}"
                    )));
                }
                let mut schema = schema;
                bound_numbers(&mut schema);
                TopLevelGrammar::from_json_schema(with_layout(schema))
            }
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(with_layout(
                serde_json::json!({"type": "object"}),
            )),
            Constraint::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Constraint::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        })
    }
}

/// The JSON layout generated documents follow, unless the schema sets its own llguidance
/// options (`"x-guidance"`): one line, `", "` between items and `": "` after keys, as OpenAI's
/// structured outputs look. llguidance's default allows any whitespace between tokens, and
/// small models then fall into runs of spaces and newlines that never end (measured: Gemma 3
/// 270M ran out of tokens inside whitespace on one of fifteen sampled answers).
pub(crate) fn with_layout(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// Largest magnitude and finest step of a generated JSON number whose schema sets none.
const NUMBER_BOUND: f64 = 1e9;
const NUMBER_STEP: f64 = 1e-6;
/// llguidance's `multipleOf` works in 64-bit integers of steps: the range over the step must
/// stay well inside them (1e15 / 1e-9 overflowed, and panicked in a debug build).
const MOST_STEPS: f64 = 1e15;

/// Gives every number and integer schema without bounds at most 10 integral digits and every
/// number without `multipleOf` at most 6 fractional ones where its range allows, in the spirit
/// of llama.cpp's own JSON grammars (16 and 16). JSON Schema lets numbers be arbitrarily long,
/// and a small model under a mask that allows nothing but another digit keeps adding zeros
/// until it runs out of tokens (measured on Gemma 3 270M: `"radius": 1000000…`,
/// `"price": 1000.0000…`). Every document generated under the bounds is still valid against the
/// schema as given: they only narrow it. Values inside `const`, `enum`, `default` and
/// `examples` are data, not schemas, and are left alone.
pub(crate) fn bound_numbers(schema: &mut serde_json::Value) {
    use serde_json::Value;
    match schema {
        Value::Object(map) => {
            let has_type = |t: &str| match map.get("type") {
                Some(Value::String(s)) => s == t,
                Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(t)),
                _ => false,
            };
            let (number, integer) = (has_type("number"), has_type("integer"));
            if number || integer {
                let bound = |keys: [&str; 2]| keys.iter().find_map(|k| map.get(*k)?.as_f64());
                let lower = bound(["minimum", "exclusiveMinimum"]);
                let upper = bound(["maximum", "exclusiveMaximum"]);
                // A default bound sits beyond the schema's own opposite one, so that it never
                // empties the range (`minimum: 1.7e12` gets `maximum: 1.7e12 + 1e9`).
                if upper.is_none() {
                    let max = lower.map_or(NUMBER_BOUND, |l| (l + NUMBER_BOUND).max(NUMBER_BOUND));
                    map.insert("maximum".into(), max.into());
                }
                if lower.is_none() {
                    let min =
                        upper.map_or(-NUMBER_BOUND, |u| (u - NUMBER_BOUND).min(-NUMBER_BOUND));
                    map.insert("minimum".into(), min.into());
                }
            }
            if number && !map.contains_key("multipleOf") {
                let magnitude = ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]
                    .iter()
                    .filter_map(|k| map.get(*k).and_then(Value::as_f64))
                    .fold(0f64, |m, v| m.max(v.abs()));
                if magnitude / NUMBER_STEP <= MOST_STEPS {
                    map.insert("multipleOf".into(), NUMBER_STEP.into());
                }
            }
            for (key, value) in map.iter_mut() {
                if !matches!(key.as_str(), "const" | "enum" | "default" | "examples") {
                    bound_numbers(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound_numbers),
        _ => {}
    }
}

/// One model's vocabulary as llguidance sees it, built on first use.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.tokenizer.vocab_size())
            .field("built", &self.factory.get().is_some())
            .finish()
    }
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Grammars {
        Grammars {
            tokenizer,
            factory: OnceLock::new(),
        }
    }

    /// Checks and compiles `constraint` for one generation. Blocking: the first call builds
    /// the vocabulary's trie, and a large schema takes a while to compile; call it off the
    /// async runtime.
    pub fn compile(&self, constraint: &Constraint) -> Result<TokenConstraint, DaemonError> {
        let factory = self
            .factory
            .get_or_init(|| build_factory(&self.tokenizer).map(Arc::new))
            .as_ref()
            .map_err(|e| {
                DaemonError::Internal(format!("cannot build the grammar vocabulary: {e}"))
            })?;
        let grammar = constraint.grammar()?;
        let parser = factory.create_parser(grammar).map_err(|e| {
            DaemonError::InvalidArgument(format!("invalid {}: {e}", constraint.kind()))
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(DaemonError::InvalidArgument(format!(
                "invalid {}: {e}",
                constraint.kind()
            )));
        }
        Ok(TokenConstraint {
            matcher,
            vocab: self.tokenizer.vocab_size(),
            end_tokens: self.tokenizer.end_of_generation_ids().collect(),
        })
    }
}

/// A generation's grammar state: which tokens may come next, advanced token by token.
pub struct TokenConstraint {
    matcher: Matcher,
    /// Tokens at or past this (rows a model's output may have beyond its vocab) are never
    /// allowed.
    vocab: usize,
    end_tokens: Vec<u32>,
}

impl std::fmt::Debug for TokenConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConstraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl TokenConstraint {
    /// Copies `logits` into `masked` with every token the grammar forbids next at −∞, so that
    /// any sampler picks an allowed one. End-of-generation tokens stay only where the grammar
    /// may end. An error means the grammar can go no further (one that admits nothing this
    /// vocabulary can write, or past llguidance's limits): the generation fails, as the
    /// client's INVALID_ARGUMENT, rather than leave its language.
    pub fn mask(&mut self, logits: &[f32], masked: &mut Vec<f32>) -> Result<(), DaemonError> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| DaemonError::InvalidArgument(format!("the constraint failed: {e}")))?;
        masked.clear();
        masked.resize(logits.len(), f32::NEG_INFINITY);
        let words = allowed.as_slice();
        let within = logits.len().min(self.vocab);
        // Whole 32-token words at a time: most of a mask is empty words.
        for (w, &bits) in words.iter().enumerate() {
            if bits == 0 {
                continue;
            }
            let start = w * 32;
            for bit in 0..32 {
                let token = start + bit;
                if token >= within {
                    break;
                }
                if bits & (1 << bit) != 0 {
                    masked[token] = logits[token];
                }
            }
        }
        if !masked.iter().any(|v| *v > f32::NEG_INFINITY) {
            return Err(DaemonError::InvalidArgument(
                "the constraint allows no token of this model's vocabulary here".into(),
            ));
        }
        Ok(())
    }

    /// Advances past the sampled `token` (an end-of-generation token needs no call).
    pub fn accept(&mut self, token: u32) -> Result<(), DaemonError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| DaemonError::InvalidArgument(format!("the constraint failed: {e}")))
    }

    /// The grammar is complete and admits nothing more: the generation ends here.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether `token` is one of the model's end-of-generation tokens.
    pub fn is_end(&self, token: u32) -> bool {
        self.end_tokens.contains(&token)
    }
}

/// The vocabulary's bytes for llguidance (see the module docs) and its parser factory.
fn build_factory(tokenizer: &Arc<Tokenizer>) -> Result<ParserFactory, String> {
    let n = tokenizer.vocab_size();
    let hidden = TokenAttrs::CONTROL | TokenAttrs::UNKNOWN | TokenAttrs::UNUSED;
    let words: Vec<Vec<u8>> = (0..n as u32)
        .map(|id| {
            let special = tokenizer
                .token_attrs(id)
                .is_some_and(|a| a.intersects(hidden));
            let bytes = tokenizer.token_bytes(id, false);
            if special || bytes.is_empty() {
                let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                match tokenizer.token_text(id) {
                    Some(text) if text.starts_with('<') && text.ends_with('>') => {
                        marked.extend_from_slice(text.as_bytes())
                    }
                    _ => marked.extend_from_slice(format!("[{id}]").as_bytes()),
                }
                marked
            } else {
                bytes.to_vec()
            }
        })
        .collect();
    let end_tokens: Vec<u32> = tokenizer.end_of_generation_ids().collect();
    let eos = tokenizer
        .eos()
        .or_else(|| end_tokens.first().copied())
        .ok_or("the vocabulary has no end-of-generation token")?;
    let mut info = TokRxInfo::new(n as u32, eos);
    info.tok_bos = tokenizer.bos();
    info.tok_end_of_turn = tokenizer.eot();
    let mut trie = TokTrie::from(&info, &words);
    if !end_tokens.is_empty() {
        trie = trie.with_eos_tokens(&end_tokens);
    }
    let env: TokEnv = Arc::new(VocabEnv {
        trie,
        tokenizer: tokenizer.clone(),
    });
    let mut factory = ParserFactory::new(
        &env,
        InferenceCapabilities::default(),
        &llguidance::earley::SlicedBiasComputer::general_slices(),
    )
    .map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

/// llguidance's view of a tokenizer: the trie, and our own tokenization for the literal text
/// a grammar forces (so forced text is tokenized as the model would see it).
struct VocabEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            // Forced text continues what the model wrote: no SentencePiece space prefix.
            Ok(text) => self.tokenizer.encode_continuation(text),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_get_bounds_only_where_the_schema_sets_none_and_data_is_left_alone() {
        let mut schema = json!({
            "type": "object",
            "properties": {
                "free": {"type": "number"},
                "ranged": {"type": ["number", "null"], "minimum": 0, "maximum": 5},
                "stepped": {"type": "number", "multipleOf": 0.5},
                "count": {"type": "integer", "exclusiveMinimum": 0},
                "huge": {"type": "number", "maximum": 1e20},
                "stamp": {"type": "integer", "minimum": 1.7e12},
                "fixed": {"const": {"type": "number"}, "enum": [{"type": "number"}]},
            },
        });
        bound_numbers(&mut schema);
        let p = &schema["properties"];
        assert_eq!(
            p["free"],
            json!({"type": "number", "minimum": -1e9, "maximum": 1e9, "multipleOf": 1e-6})
        );
        assert_eq!(
            p["ranged"],
            json!({"type": ["number", "null"], "minimum": 0, "maximum": 5, "multipleOf": 1e-6})
        );
        assert_eq!(
            p["stepped"],
            json!({"type": "number", "multipleOf": 0.5, "minimum": -1e9, "maximum": 1e9})
        );
        assert_eq!(
            p["count"],
            json!({"type": "integer", "exclusiveMinimum": 0, "maximum": 1e9})
        );
        // A range too wide for a step in 64-bit integers keeps its fractional digits free,
        // and a default bound never empties the range.
        assert_eq!(
            p["huge"],
            json!({"type": "number", "maximum": 1e20, "minimum": -1e9})
        );
        assert_eq!(
            p["stamp"],
            json!({"type": "integer", "minimum": 1.7e12, "maximum": 1.7e12 + 1e9})
        );
        assert_eq!(
            p["fixed"],
            json!({"const": {"type": "number"}, "enum": [{"type": "number"}]})
        );
    }

    #[test]
    fn the_layout_is_compact_unless_the_schema_sets_its_own() {
        let plain = with_layout(json!({"type": "object"}));
        assert_eq!(plain["x-guidance"]["whitespace_flexible"], json!(false));
        let own = json!({"type": "object", "x-guidance": {"whitespace_flexible": true}});
        assert_eq!(with_layout(own.clone()), own);
    }

    #[test]
    fn schemas_that_are_not_schemas_are_invalid_arguments() {
        for text in ["[1, 2]", "\"x\"", "{\"type\": "] {
            let err = Constraint::JsonSchema(text.into()).grammar().err().unwrap();
            assert!(
                matches!(&err, DaemonError::InvalidArgument(m) if m.starts_with("invalid JSON schema")),
                "{text}: {err}"
            );
        }
    }
}

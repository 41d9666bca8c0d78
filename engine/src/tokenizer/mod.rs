//! Tokenizers built from a GGUF file's vocabulary, producing the same token ids as llama.cpp.
//!
//! Two vocab types are supported, as `tokenizer.ggml.model` names them:
//!
//! - `gpt2`: byte-level BPE. Text is first split into words by the pre-tokenizer that
//!   `tokenizer.ggml.pre` names (see [`PreTokenizerConfig::for_name`] for the supported names:
//!   `default`, `gpt-2`, `llama-bpe`/`llama3`, `qwen2`, `smollm`/`starcoder` and their aliases),
//!   then each word is merged by rank.
//! - `llama`: SentencePiece with byte fallback (LLaMA 1/2, Gemma). Spaces become `▁`, a space is
//!   prepended when `tokenizer.ggml.add_space_prefix` says so, and characters are merged by score.
//!
//! # Decisions
//!
//! - **Unknown pre-tokenizer names are an error** ([`TokenizerError::UnsupportedPreTokenizer`]),
//!   as in llama.cpp: a wrong pre-tokenizer silently produces ids the model was not trained on,
//!   which degrades output in ways that are hard to notice. A *missing* `tokenizer.ggml.pre`
//!   means llama.cpp's `default` pre-tokenizer, with a warning (see [`Tokenizer::warnings`]),
//!   again as in llama.cpp.
//! - **Special tokens** follow `llama_tokenize(text, add_special, parse_special)`: with
//!   `parse_special`, control tokens written in the text (`<|im_start|>`) become their ids;
//!   without it they are tokenized as plain text. User-defined tokens are always recognised.
//! - **Decoding** is the concatenation of each token's bytes as llama.cpp's `token_to_piece`
//!   gives them, with no clean-up of spaces and no removal of a leading space (llama.cpp's
//!   `llama_detokenize` does both, depending on the vocab; a streaming client cannot). Control
//!   and unknown tokens render as nothing by default ([`Tokenizer::decode`]) and as their text
//!   when asked ([`Tokenizer::decode_rendering_special`]); user-defined tokens always render.
//!   Bytes that do not form UTF-8 become U+FFFD.
//! - **Ids outside the vocab** render as nothing (llama.cpp would abort).
//! - **SentencePiece spells spaces `▁`**, so a literal `▁` in the text decodes as a space (as in
//!   llama.cpp); a byte with no `<0xXX>` token becomes the unknown token (llama.cpp aborts).
//! - **End of turn**: without `tokenizer.ggml.eot_token_id`, [`Tokenizer::eot`] is the first of
//!   llama.cpp's well-known end-of-turn texts, in its list's order. llama.cpp instead takes the
//!   first its hash map yields, which depends on the C++ library (for SmolLM2 it picks
//!   `<|endoftext|>` where egpu picks `<|im_end|>`). Both are end-of-generation tokens either
//!   way, and the end-of-generation set itself matches llama.cpp exactly.

mod bpe;
mod decode;
mod fast_hash;
mod pretokenize;
mod special;
mod spm;
mod unicode;
mod unicode_tables;
pub mod unigram;
mod vocab;
mod wordpiece;

use std::fmt;

use crate::gguf::Metadata;

use bpe::{BpeModel, BpeScratch};
use decode::Pieces;
use special::{Fragment, SpecialMatcher};
use spm::SpmModel;
use vocab::{Algorithm, Vocab};

pub use decode::StreamDecoder;
pub use pretokenize::{PreTokenizer, PreTokenizerConfig};
pub use unicode_tables::UNICODE_VERSION;
pub use vocab::{token_type, SpecialIdSpec, SpecialIds, TokenAttrs, VocabSpec};
pub use wordpiece::Normalizer;

/// Why a tokenizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required metadata key is absent.
    #[error("GGUF metadata has no {0}")]
    MissingKey(&'static str),
    /// A metadata key holds the wrong type of value.
    #[error("GGUF metadata key {key} is not {expected}")]
    WrongType {
        /// The key.
        key: &'static str,
        /// What llama.cpp accepts there.
        expected: &'static str,
    },
    /// `tokenizer.ggml.model` names a vocab type egpu does not implement.
    #[error(
        "unsupported tokenizer model {0:?} (egpu supports \"gpt2\", \"llama\" and \"marian\")"
    )]
    UnsupportedModel(String),
    /// The SentencePiece model of a `marian` vocab cannot be used.
    #[error("tokenizer.marian.source_spm: {0}")]
    BadSentencePiece(#[from] crate::tokenizer::unigram::SentencePieceError),
    /// `tokenizer.ggml.pre` names a pre-tokenizer egpu does not implement.
    #[error(
        "unsupported BPE pre-tokenizer {0:?}; egpu supports default, gpt-2, llama-bpe, qwen2, \
         smollm/starcoder and their aliases"
    )]
    UnsupportedPreTokenizer(String),
    /// The vocab has no tokens.
    #[error("the vocab has no tokens")]
    EmptyVocab,
    /// More tokens than ids can number.
    #[error("the vocab has {0} tokens, more than 32-bit ids can number")]
    VocabTooLarge(usize),
    /// A per-token array is shorter than the token list.
    #[error("{key} has {found} entries for {tokens} tokens")]
    ArrayTooShort {
        /// The key.
        key: &'static str,
        /// Its length.
        found: usize,
        /// The number of tokens.
        tokens: usize,
    },
}

/// What kind of tokenizer a vocab builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Byte-level BPE (`tokenizer.ggml.model = gpt2`).
    BytePairGpt2 {
        /// The `tokenizer.ggml.pre` name (`default` when the file has none).
        pre: String,
        /// The splitting rules that name selects.
        family: PreTokenizer,
    },
    /// SentencePiece with byte fallback (`tokenizer.ggml.model = llama`).
    SentencePiece,
    /// A SentencePiece Unigram model whose pieces map to the vocab by text
    /// (`tokenizer.ggml.model = marian`).
    Unigram,
    /// BERT's WordPiece (`tokenizer.ggml.model = bert`).
    WordPiece(Normalizer),
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerKind::BytePairGpt2 { pre, family } if pre == &family.to_string() => {
                write!(f, "gpt2 BPE ({pre})")
            }
            TokenizerKind::BytePairGpt2 { pre, family } => {
                write!(f, "gpt2 BPE ({pre}, {family} rules)")
            }
            TokenizerKind::SentencePiece => f.write_str("llama SentencePiece"),
            TokenizerKind::Unigram => f.write_str("SentencePiece Unigram (marian)"),
            TokenizerKind::WordPiece(n) => write!(
                f,
                "bert WordPiece{}",
                match (n.lowercase, n.strip_accents) {
                    (true, true) => " (uncased)",
                    (true, false) => " (lowercased, accents kept)",
                    (false, true) => " (accents stripped)",
                    (false, false) => " (cased)",
                }
            ),
        }
    }
}

#[derive(Debug)]
enum Encoder {
    Bpe {
        model: BpeModel,
        pre: PreTokenizer,
    },
    Spm(SpmModel),
    Unigram {
        model: Box<crate::tokenizer::unigram::SentencePiece>,
        /// Vocab id of each of the model's pieces (the unknown id where the vocab lacks it).
        to_vocab: Vec<u32>,
        /// The vocab's unknown id.
        unknown: u32,
    },
    WordPiece {
        model: wordpiece::WordPiece,
        unknown: u32,
    },
}

/// A tokenizer for one model's vocab: text to ids and back, as llama.cpp does it.
///
/// Building one is the slow part (hash tables over the whole vocab and merge list); encoding
/// and decoding take `&self`, so one instance serves any number of threads.
pub struct Tokenizer {
    vocab: Vocab,
    kind: TokenizerKind,
    encoder: Encoder,
    specials: SpecialMatcher,
    pieces: Pieces,
    warnings: Vec<String>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab.len())
            .field("special", &self.vocab.special)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes.
    pub fn from_gguf(meta: &Metadata) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_spec(&VocabSpec::from_gguf(meta)?)
    }

    /// Builds a tokenizer from a vocab given field by field.
    pub fn from_spec(spec: &VocabSpec) -> Result<Tokenizer, TokenizerError> {
        let mut warnings = Vec::new();
        let pre_config = match spec.model.as_str() {
            "gpt2" => {
                let name = match spec.pre.as_deref() {
                    None | Some("") => {
                        warnings.push(
                            "no tokenizer.ggml.pre: using llama.cpp's 'default' pre-tokenizer; \
                             generation quality may suffer"
                                .to_owned(),
                        );
                        "default"
                    }
                    Some(name) => name,
                };
                let config = PreTokenizerConfig::for_name(name)
                    .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(name.to_owned()))?;
                Some((name.to_owned(), config))
            }
            _ => None,
        };
        let vocab = Vocab::resolve(spec, pre_config.as_ref().map(|(_, c)| c), &mut warnings)?;
        let (kind, encoder) = match (vocab.algorithm, pre_config) {
            (Algorithm::BytePairGpt2, Some((pre, config))) => {
                let merges = spec
                    .merges
                    .as_deref()
                    .ok_or(TokenizerError::MissingKey("tokenizer.ggml.merges"))?;
                (
                    TokenizerKind::BytePairGpt2 {
                        pre,
                        family: config.family,
                    },
                    Encoder::Bpe {
                        model: BpeModel::new(&vocab, merges, config.ignores_merges),
                        pre: config.family,
                    },
                )
            }
            (Algorithm::Unigram, _) => {
                let bytes = spec
                    .unigram_model
                    .as_deref()
                    .ok_or(TokenizerError::MissingKey("tokenizer.marian.source_spm"))?;
                let model = crate::tokenizer::unigram::SentencePiece::from_bytes(bytes)?;
                let unknown = vocab.special.unk.unwrap_or(0);
                let to_vocab = model
                    .pieces()
                    .iter()
                    .map(|p| vocab.ids_by_text.get(&p.text).copied().unwrap_or(unknown))
                    .collect();
                (
                    TokenizerKind::Unigram,
                    Encoder::Unigram {
                        model: Box::new(model),
                        to_vocab,
                        unknown,
                    },
                )
            }
            (Algorithm::WordPiece, _) => {
                let lowercase = spec.lowercase.unwrap_or(true);
                let normalizer = Normalizer {
                    lowercase,
                    strip_accents: spec.strip_accents.unwrap_or(lowercase),
                };
                let unknown = vocab.special.unk.ok_or(TokenizerError::MissingKey(
                    "tokenizer.ggml.unknown_token_id",
                ))?;
                (
                    TokenizerKind::WordPiece(normalizer),
                    Encoder::WordPiece {
                        model: wordpiece::WordPiece::new(&vocab.texts, normalizer),
                        unknown,
                    },
                )
            }
            _ => (
                TokenizerKind::SentencePiece,
                Encoder::Spm(SpmModel::new(&vocab)),
            ),
        };
        Ok(Tokenizer {
            specials: SpecialMatcher::new(&vocab),
            pieces: Pieces::new(&vocab),
            vocab,
            kind,
            encoder,
            warnings,
        })
    }

    /// Text to ids, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`:
    /// `add_special` adds BOS/EOS where the vocab asks for them (`tokenizer.ggml.add_bos_token`,
    /// `add_eos_token`); `parse_special` turns control-token text such as `<|im_start|>` into
    /// that token instead of tokenizing it as characters.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        self.encode_from(text, add_special, parse_special, true)
    }

    /// Text that continues a longer text, such as the literal part of a grammar written after
    /// the model's own tokens: as [`Tokenizer::encode`] without special tokens, but without the
    /// space SentencePiece vocabs prepend to the start of a text.
    pub fn encode_continuation(&self, text: &str) -> Vec<u32> {
        self.encode_from(text, false, false, false)
    }

    fn encode_from(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        at_start: bool,
    ) -> Vec<u32> {
        let vocab = &self.vocab;
        let fragments = self.specials.partition(vocab, text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        // WordPiece always frames a text as [CLS] … [SEP] (llama.cpp's WPM does too, whatever
        // add_bos/add_eos say: converted files set add_eos with EOS = [SEP]).
        let wordpiece = matches!(self.encoder, Encoder::WordPiece { .. });
        if add_special && (vocab.add_bos || wordpiece) {
            out.extend(vocab.special.bos);
        }
        match &self.encoder {
            Encoder::Bpe { model, pre } => {
                let mut words = Vec::new();
                let mut scratch = BpeScratch::default();
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(text) => {
                            words.clear();
                            pre.split(text, &mut words);
                            for word in &words {
                                model.encode_word(word, vocab, &mut scratch, &mut out);
                            }
                        }
                    }
                }
            }
            Encoder::Spm(model) => {
                // A space is prepended to text at the start and after each special token.
                let mut after_special = at_start;
                let mut escaped = String::new();
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                        Fragment::Text(text) => {
                            escaped.clear();
                            if vocab.add_space_prefix && after_special {
                                escaped.push('▁');
                            }
                            for c in text.chars() {
                                escaped.push(if c == ' ' { '▁' } else { c });
                            }
                            model.encode(&escaped, vocab, &mut out);
                            after_special = false;
                        }
                    }
                }
            }
            Encoder::Unigram {
                model,
                to_vocab,
                unknown,
            } => {
                let unknown_piece = model.unknown_id();
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        // As MarianTokenizer: pieces map to the vocab by their text, and an
                        // unknown piece by the text it covers.
                        Fragment::Text(text) => {
                            out.extend(model.encode_pieces(text).into_iter().map(|(p, surface)| {
                                if p == unknown_piece {
                                    vocab.ids_by_text.get(&surface).copied().unwrap_or(*unknown)
                                } else {
                                    to_vocab.get(p as usize).copied().unwrap_or(*unknown)
                                }
                            }))
                        }
                    }
                }
            }
            Encoder::WordPiece { model, unknown } => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(text) => {
                            model.encode(text, &vocab.ids_by_text, *unknown, &mut out)
                        }
                    }
                }
            }
        }
        if add_special && wordpiece {
            out.extend(vocab.special.sep.or(vocab.special.eos));
        } else if add_special && vocab.add_eos {
            out.extend(vocab.special.eos);
        }
        out
    }

    /// Ids to text, control and unknown tokens omitted (see the module docs).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_bytes(ids, false)
    }

    /// Ids to text with control and unknown tokens written out (`<|im_end|>`).
    pub fn decode_rendering_special(&self, ids: &[u32]) -> String {
        self.decode_bytes(ids, true)
    }

    fn decode_bytes(&self, ids: &[u32], render_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id, render_special));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// One token's bytes, as llama.cpp's `token_to_piece(id, special = render_special)`. May be
    /// part of a UTF-8 character (byte tokens, byte-level pieces); empty for control and unknown
    /// tokens unless `render_special`, and for ids outside the vocab.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> &[u8] {
        let hidden = TokenAttrs::CONTROL | TokenAttrs::UNKNOWN;
        match self.vocab.attrs.get(id as usize) {
            Some(attrs) if render_special || !attrs.intersects(hidden) => self.pieces.get(id),
            _ => &[],
        }
    }

    /// A decoder for generated ids that emits text as soon as it is whole UTF-8; control
    /// tokens are omitted.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self, false)
    }

    /// As [`Tokenizer::stream_decoder`], with control and unknown tokens written out.
    pub fn stream_decoder_rendering_special(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self, true)
    }

    /// Whether generating `id` ends generation: EOS, EOT, EOM, and the tokens llama.cpp marks as
    /// such by text (`<|im_end|>`, `<end_of_turn>`, `<|endoftext|>`, FIM pad/repo/separator...).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.vocab.end_of_generation.contains(&id)
    }

    /// All end-of-generation ids, ascending.
    pub fn end_of_generation_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.vocab.end_of_generation.iter().copied()
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.vocab.special.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.vocab.special.eos
    }

    /// End-of-turn token: the file's `eot_token_id`, else the first of llama.cpp's well-known
    /// end-of-turn texts present (`<|eot_id|>`, `<|im_end|>`, `<|end|>`, `<end_of_turn>`,
    /// `<|endoftext|>`, ...), in that order.
    pub fn eot(&self) -> Option<u32> {
        self.vocab.special.eot
    }

    /// Every special id the vocab resolves.
    pub fn special_ids(&self) -> SpecialIds {
        self.vocab.special
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.vocab.add_bos && self.vocab.special.bos.is_some()
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn adds_eos(&self) -> bool {
        self.vocab.add_eos && self.vocab.special.eos.is_some()
    }

    /// Number of tokens; every id is below this.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The vocab type and pre-tokenizer.
    pub fn kind(&self) -> &TokenizerKind {
        &self.kind
    }

    /// A token's text as stored in the vocab (byte-level spelling for BPE, `▁` for spaces in
    /// SentencePiece).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize).map(String::as_str)
    }

    /// The id of the token with exactly this vocab text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id_of(text)
    }

    /// A token's attributes after llama.cpp's fix-ups (e.g. `<|im_end|>` made a control token).
    pub fn token_attrs(&self, id: u32) -> Option<TokenAttrs> {
        self.vocab.attrs.get(id as usize).copied()
    }

    /// What llama.cpp would have logged as warnings while loading this vocab.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

impl VocabSpec {
    /// Reads the `tokenizer.ggml.*` keys of a GGUF file.
    pub fn from_gguf(meta: &Metadata) -> Result<VocabSpec, TokenizerError> {
        const MODEL: &str = "tokenizer.ggml.model";
        const TOKENS: &str = "tokenizer.ggml.tokens";
        const SCORES: &str = "tokenizer.ggml.scores";
        const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
        const MERGES: &str = "tokenizer.ggml.merges";

        let model = typed(meta, MODEL, "a string", |m| m.get_str(MODEL))?
            .ok_or(TokenizerError::MissingKey(MODEL))?
            .to_owned();
        let pre = typed(meta, "tokenizer.ggml.pre", "a string", |m| {
            m.get_str("tokenizer.ggml.pre")
        })?
        .map(str::to_owned);
        let tokens = typed(meta, TOKENS, "an array of strings", |m| {
            m.get_str_array(TOKENS)
        })?
        .ok_or(TokenizerError::MissingKey(TOKENS))?
        .to_vec();
        let scores = typed(meta, SCORES, "an array of f32 or i32", |m| {
            m.get_f32_array(SCORES).map(<[f32]>::to_vec).or_else(|| {
                m.get_i32_array(SCORES)
                    .map(|s| s.iter().map(|&v| v as f32).collect())
            })
        })?;
        let token_types = typed(meta, TOKEN_TYPE, "an array of i32", |m| {
            m.get_i32_array(TOKEN_TYPE).map(<[i32]>::to_vec)
        })?;
        let merges = typed(meta, MERGES, "an array of strings", |m| {
            m.get_str_array(MERGES).map(<[String]>::to_vec)
        })?;

        let id = |key: &str| meta.get_u64(key);
        let prefer = |deprecated: &str, current: &str| id(deprecated).or(id(current));
        let special_ids = SpecialIdSpec {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            eot: id("tokenizer.ggml.eot_token_id"),
            eom: id("tokenizer.ggml.eom_token_id"),
            unk: id("tokenizer.ggml.unknown_token_id"),
            sep: id("tokenizer.ggml.seperator_token_id"),
            pad: id("tokenizer.ggml.padding_token_id"),
            mask: id("tokenizer.ggml.mask_token_id"),
            fim_pre: prefer(
                "tokenizer.ggml.prefix_token_id",
                "tokenizer.ggml.fim_pre_token_id",
            ),
            fim_suf: prefer(
                "tokenizer.ggml.suffix_token_id",
                "tokenizer.ggml.fim_suf_token_id",
            ),
            fim_mid: prefer(
                "tokenizer.ggml.middle_token_id",
                "tokenizer.ggml.fim_mid_token_id",
            ),
            fim_pad: id("tokenizer.ggml.fim_pad_token_id"),
            fim_rep: id("tokenizer.ggml.fim_rep_token_id"),
            fim_sep: id("tokenizer.ggml.fim_sep_token_id"),
        };
        Ok(VocabSpec {
            model,
            pre,
            tokens,
            scores,
            token_types,
            merges,
            special_ids,
            add_bos: meta.get_bool("tokenizer.ggml.add_bos_token"),
            add_eos: meta.get_bool("tokenizer.ggml.add_eos_token"),
            add_space_prefix: meta.get_bool("tokenizer.ggml.add_space_prefix"),
            unigram_model: match meta.get_array("tokenizer.marian.source_spm") {
                Some(crate::gguf::MetaArray::U8(bytes)) => Some(bytes.clone()),
                _ => None,
            },
            lowercase: meta.get_bool("tokenizer.ggml.normalizer.lowercase"),
            strip_accents: meta.get_bool("tokenizer.ggml.normalizer.strip_accents"),
        })
    }
}

/// `get(meta)` if `key` is present; an error if it is present with a type `get` rejects.
fn typed<'m, T>(
    meta: &'m Metadata,
    key: &'static str,
    expected: &'static str,
    get: impl FnOnce(&'m Metadata) -> Option<T>,
) -> Result<Option<T>, TokenizerError> {
    match meta.get(key) {
        None => Ok(None),
        Some(_) => get(meta)
            .map(Some)
            .ok_or(TokenizerError::WrongType { key, expected }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE spec with every byte character, `hi` and `Ġhi` (with their merges),
    /// plus `extra` tokens of the given types.
    fn bpe_spec(pre: Option<&str>, extra: &[(&str, i32)]) -> VocabSpec {
        let mut tokens: Vec<String> = unicode::BYTE_TO_CHAR
            .iter()
            .map(|c| c.to_string())
            .collect();
        tokens.extend(["hi".to_owned(), "Ġhi".to_owned()]);
        let mut types = vec![token_type::NORMAL; tokens.len()];
        for &(text, ty) in extra {
            tokens.push(text.to_owned());
            types.push(ty);
        }
        VocabSpec {
            model: "gpt2".into(),
            pre: pre.map(str::to_owned),
            tokens,
            token_types: Some(types),
            merges: Some(vec!["h i".into(), "Ġ hi".into()]),
            ..VocabSpec::default()
        }
    }

    fn id(t: &Tokenizer, text: &str) -> u32 {
        t.token_id(text).expect(text)
    }

    #[test]
    fn unsupported_models_and_pre_tokenizers_are_errors() {
        let mut spec = bpe_spec(Some("no-such-pre"), &[]);
        assert!(matches!(
            Tokenizer::from_spec(&spec),
            Err(TokenizerError::UnsupportedPreTokenizer(name)) if name == "no-such-pre"
        ));
        spec.model = "t5".into();
        assert!(matches!(
            Tokenizer::from_spec(&spec),
            Err(TokenizerError::UnsupportedModel(_))
        ));
        let mut no_merges = bpe_spec(Some("gpt-2"), &[]);
        no_merges.merges = None;
        assert!(matches!(
            Tokenizer::from_spec(&no_merges),
            Err(TokenizerError::MissingKey("tokenizer.ggml.merges"))
        ));
        let mut short_types = bpe_spec(Some("gpt-2"), &[]);
        short_types.token_types.as_mut().map(Vec::pop);
        assert!(matches!(
            Tokenizer::from_spec(&short_types),
            Err(TokenizerError::ArrayTooShort { .. })
        ));
        let empty = VocabSpec {
            model: "llama".into(),
            ..VocabSpec::default()
        };
        assert!(matches!(
            Tokenizer::from_spec(&empty),
            Err(TokenizerError::EmptyVocab)
        ));
    }

    #[test]
    fn missing_pre_tokenizer_means_default_with_a_warning() {
        let t = Tokenizer::from_spec(&bpe_spec(None, &[])).unwrap();
        assert_eq!(
            t.kind(),
            &TokenizerKind::BytePairGpt2 {
                pre: "default".into(),
                family: PreTokenizer::Default
            }
        );
        assert!(t
            .warnings()
            .iter()
            .any(|w| w.contains("tokenizer.ggml.pre")));
        assert_eq!(t.decode(&t.encode("hi hi", false, false)), "hi hi");
        assert_eq!(t.encode(" hi", false, false), [id(&t, "Ġhi")]);
    }

    #[test]
    fn end_of_turn_is_found_by_text_preferring_chat_markers() {
        let t = Tokenizer::from_spec(&bpe_spec(
            Some("gpt-2"),
            &[
                ("<|endoftext|>", token_type::CONTROL),
                ("<|im_end|>", token_type::NORMAL),
                ("<|im_start|>", token_type::CONTROL),
            ],
        ))
        .unwrap();
        let im_end = id(&t, "<|im_end|>");
        assert_eq!(t.eot(), Some(im_end));
        // Made a control token, so it is hidden when decoding and parsed as special.
        assert!(t
            .token_attrs(im_end)
            .unwrap()
            .intersects(TokenAttrs::CONTROL));
        assert_eq!(t.decode(&[im_end]), "");
        assert_eq!(t.encode("<|im_end|>", false, true), [im_end]);
        assert!(t.is_end_of_generation(im_end));
        assert!(t.is_end_of_generation(id(&t, "<|endoftext|>")));
        assert!(!t.is_end_of_generation(id(&t, "<|im_start|>")));
        // The GPT-2 default BOS/EOS id 11 is in range here.
        assert_eq!((t.bos(), t.eos()), (Some(11), Some(11)));
        assert!(t.is_end_of_generation(11));
    }

    #[test]
    fn harmony_end_is_not_end_of_generation() {
        let t = Tokenizer::from_spec(&bpe_spec(
            Some("gpt-2"),
            &[
                ("<|return|>", token_type::CONTROL),
                ("<|call|>", token_type::CONTROL),
                ("<|end|>", token_type::CONTROL),
                ("<|channel|>", token_type::CONTROL),
            ],
        ))
        .unwrap();
        let end = id(&t, "<|end|>");
        assert!(!t.is_end_of_generation(end));
        assert_eq!(t.token_attrs(end), Some(TokenAttrs::USER_DEFINED));
        assert!(t.is_end_of_generation(id(&t, "<|return|>")));
        // Always rendered, and recognised in text even without special parsing.
        let channel = id(&t, "<|channel|>");
        assert_eq!(t.decode(&[channel]), "<|channel|>");
        assert_eq!(t.encode("<|channel|>", false, false), [channel]);
    }

    #[test]
    fn special_ids_out_of_range_are_ignored_with_warnings() {
        let mut spec = bpe_spec(Some("gpt-2"), &[("<s>", token_type::CONTROL)]);
        let n = spec.tokens.len() as u64;
        spec.special_ids.bos = Some(n - 1);
        spec.special_ids.eos = Some(n + 5);
        spec.add_bos = Some(true);
        let t = Tokenizer::from_spec(&spec).unwrap();
        assert_eq!(t.bos(), Some(n as u32 - 1));
        assert_eq!(
            t.eos(),
            Some(11),
            "the default stays when the file's id is out of range"
        );
        assert!(t.warnings().iter().any(|w| w.contains("out of the vocab")));
        assert_eq!(t.encode("hi", true, false), [n as u32 - 1, id(&t, "hi")]);
    }

    #[test]
    fn empty_token_texts_get_placeholders() {
        let mut spec = bpe_spec(Some("gpt-2"), &[("", token_type::NORMAL)]);
        spec.tokens.push("x".into());
        spec.token_types.as_mut().unwrap().push(token_type::NORMAL);
        let t = Tokenizer::from_spec(&spec).unwrap();
        let empty = spec.tokens.len() as u32 - 2;
        assert_eq!(
            t.token_text(empty),
            Some(format!("[EMPTY_{empty}]").as_str())
        );
    }

    /// SentencePiece: `▁`-spaced pieces, scores, byte fallback, and the unknown token for bytes
    /// the vocab cannot spell.
    fn spm_spec(with_byte_tokens: bool) -> VocabSpec {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "▁", "h", "i", "hi", "▁hi"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut types = vec![
            token_type::UNKNOWN,
            token_type::CONTROL,
            token_type::CONTROL,
            token_type::NORMAL,
            token_type::NORMAL,
            token_type::NORMAL,
            token_type::NORMAL,
            token_type::NORMAL,
        ];
        if with_byte_tokens {
            for b in 0..=255u8 {
                tokens.push(format!("<0x{b:02X}>"));
                types.push(token_type::BYTE);
            }
        }
        let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
        VocabSpec {
            model: "llama".into(),
            tokens,
            scores: Some(scores),
            token_types: Some(types),
            ..VocabSpec::default()
        }
    }

    #[test]
    fn sentencepiece_prefixes_a_space_and_falls_back_to_bytes() {
        let t = Tokenizer::from_spec(&spm_spec(true)).unwrap();
        // A continuation gets no space prefix.
        assert_eq!(t.encode_continuation("hi"), [id(&t, "hi")]);
        assert_eq!(t.encode("hi", false, false), [id(&t, "▁hi")]);
        assert_eq!(t.kind(), &TokenizerKind::SentencePiece);
        assert_eq!(
            (t.bos(), t.eos(), t.special_ids().unk),
            (Some(1), Some(2), Some(0))
        );
        assert!(t.adds_bos());
        let hi = id(&t, "▁hi");
        assert_eq!(t.encode("hi", true, false), [1, hi]);
        // "é" has no token: two byte tokens.
        let ids = t.encode("hié", false, false);
        assert_eq!(ids, [hi, id(&t, "<0xC3>"), id(&t, "<0xA9>")]);
        assert_eq!(t.decode(&ids), " hié");
        // After a special token the space is prefixed again.
        assert_eq!(t.encode("hi</s>hi", false, true), [hi, 2, hi]);
        assert_eq!(t.decode_rendering_special(&[hi, 2]), " hi</s>");

        let mut no_prefix = spm_spec(true);
        no_prefix.add_space_prefix = Some(false);
        let t = Tokenizer::from_spec(&no_prefix).unwrap();
        assert_eq!(t.encode("hi", false, false), [id(&t, "hi")]);
    }

    #[test]
    fn sentencepiece_without_byte_tokens_uses_unknown() {
        let t = Tokenizer::from_spec(&spm_spec(false)).unwrap();
        assert_eq!(t.encode("é", false, false), [id(&t, "▁"), 0, 0]);
    }
}

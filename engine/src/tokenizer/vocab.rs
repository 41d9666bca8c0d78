//! The vocabulary as a GGUF file describes it ([`VocabSpec`]), and as the tokenizer uses it
//! ([`Vocab`]): token texts and attributes, special token ids, and the end-of-generation set,
//! resolved by the same rules llama.cpp applies when it loads a model.

use std::collections::BTreeSet;
use std::fmt;

use super::fast_hash::FastMap;
use super::pretokenize::PreTokenizerConfig;
use super::TokenizerError;

/// Token type codes of `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
pub mod token_type {
    /// Undefined.
    pub const UNDEFINED: i32 = 0;
    /// An ordinary piece of text.
    pub const NORMAL: i32 = 1;
    /// The unknown token.
    pub const UNKNOWN: i32 = 2;
    /// A control token (BOS, EOS, chat markers): never produced from text unless asked.
    pub const CONTROL: i32 = 3;
    /// A user-defined token: always matched in text before pre-tokenization.
    pub const USER_DEFINED: i32 = 4;
    /// Reserved, never used.
    pub const UNUSED: i32 = 5;
    /// A raw byte, spelled `<0xXX>` (SentencePiece byte fallback).
    pub const BYTE: i32 = 6;
}

/// Token attribute bits, with llama.cpp's `llama_token_attr` values so that references
/// taken from llama.cpp compare directly.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenAttrs(u32);

impl TokenAttrs {
    /// No attribute (llama.cpp's `UNDEFINED`).
    pub const UNDEFINED: TokenAttrs = TokenAttrs(0);
    /// The unknown token.
    pub const UNKNOWN: TokenAttrs = TokenAttrs(1 << 0);
    /// Reserved, never used.
    pub const UNUSED: TokenAttrs = TokenAttrs(1 << 1);
    /// Ordinary text.
    pub const NORMAL: TokenAttrs = TokenAttrs(1 << 2);
    /// Control token.
    pub const CONTROL: TokenAttrs = TokenAttrs(1 << 3);
    /// User-defined token.
    pub const USER_DEFINED: TokenAttrs = TokenAttrs(1 << 4);
    /// Byte token.
    pub const BYTE: TokenAttrs = TokenAttrs(1 << 5);

    /// The raw bits (llama.cpp's `llama_token_attr`).
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether any bit of `other` is set in `self`.
    pub fn intersects(self, other: TokenAttrs) -> bool {
        self.0 & other.0 != 0
    }

    fn from_token_type(ty: i32) -> TokenAttrs {
        match ty {
            token_type::NORMAL => TokenAttrs::NORMAL,
            token_type::UNKNOWN => TokenAttrs::UNKNOWN,
            token_type::CONTROL => TokenAttrs::CONTROL,
            token_type::USER_DEFINED => TokenAttrs::USER_DEFINED,
            token_type::UNUSED => TokenAttrs::UNUSED,
            token_type::BYTE => TokenAttrs::BYTE,
            _ => TokenAttrs::UNDEFINED,
        }
    }
}

impl std::ops::BitOr for TokenAttrs {
    type Output = TokenAttrs;
    fn bitor(self, rhs: TokenAttrs) -> TokenAttrs {
        TokenAttrs(self.0 | rhs.0)
    }
}

impl fmt::Debug for TokenAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(TokenAttrs, &str); 6] = [
            (TokenAttrs::UNKNOWN, "UNKNOWN"),
            (TokenAttrs::UNUSED, "UNUSED"),
            (TokenAttrs::NORMAL, "NORMAL"),
            (TokenAttrs::CONTROL, "CONTROL"),
            (TokenAttrs::USER_DEFINED, "USER_DEFINED"),
            (TokenAttrs::BYTE, "BYTE"),
        ];
        let names: Vec<&str> = NAMES
            .iter()
            .filter(|(bit, _)| self.intersects(*bit))
            .map(|(_, name)| *name)
            .collect();
        if names.is_empty() {
            f.write_str("UNDEFINED")
        } else {
            f.write_str(&names.join("|"))
        }
    }
}

/// A vocabulary as stored in a GGUF file's `tokenizer.ggml.*` keys, before any of llama.cpp's
/// defaults or fix-ups are applied. [`super::Tokenizer::from_gguf`] fills it from metadata; tests
/// and tools can fill it from anything.
#[derive(Debug, Clone, Default)]
pub struct VocabSpec {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the BPE pre-tokenizer name; `None` means llama.cpp's `default`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece merge priorities); missing means all zero.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type` (see [`token_type`]); missing means all normal.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`, `"left right"` in priority order (BPE only).
    pub merges: Option<Vec<String>>,
    /// Special token ids as stored (`tokenizer.ggml.*_token_id`); out-of-range ids are ignored
    /// with a warning, as llama.cpp does.
    pub special_ids: SpecialIdSpec,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece: prepend a space to the text).
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.marian.source_spm`: the serialized SentencePiece Unigram model that segments
    /// text for a `marian` vocab (its pieces map to `tokens` by text).
    pub unigram_model: Option<Vec<u8>>,
    /// `tokenizer.ggml.normalizer.lowercase` (WordPiece; absent means true, as in llama.cpp).
    pub lowercase: Option<bool>,
    /// `tokenizer.ggml.normalizer.strip_accents` (WordPiece; absent means as `lowercase`).
    pub strip_accents: Option<bool>,
}

/// Special token ids as a GGUF file may store them; `None` when the key is absent.
#[derive(Debug, Clone, Default)]
pub struct SpecialIdSpec {
    /// `tokenizer.ggml.bos_token_id`
    pub bos: Option<u64>,
    /// `tokenizer.ggml.eos_token_id`
    pub eos: Option<u64>,
    /// `tokenizer.ggml.eot_token_id`
    pub eot: Option<u64>,
    /// `tokenizer.ggml.eom_token_id`
    pub eom: Option<u64>,
    /// `tokenizer.ggml.unknown_token_id`
    pub unk: Option<u64>,
    /// `tokenizer.ggml.seperator_token_id` (sic)
    pub sep: Option<u64>,
    /// `tokenizer.ggml.padding_token_id`
    pub pad: Option<u64>,
    /// `tokenizer.ggml.mask_token_id`
    pub mask: Option<u64>,
    /// `tokenizer.ggml.fim_pre_token_id`, or the deprecated `prefix_token_id` (which wins).
    pub fim_pre: Option<u64>,
    /// `tokenizer.ggml.fim_suf_token_id`, or the deprecated `suffix_token_id` (which wins).
    pub fim_suf: Option<u64>,
    /// `tokenizer.ggml.fim_mid_token_id`, or the deprecated `middle_token_id` (which wins).
    pub fim_mid: Option<u64>,
    /// `tokenizer.ggml.fim_pad_token_id`
    pub fim_pad: Option<u64>,
    /// `tokenizer.ggml.fim_rep_token_id`
    pub fim_rep: Option<u64>,
    /// `tokenizer.ggml.fim_sep_token_id`
    pub fim_sep: Option<u64>,
}

/// Resolved special token ids: `None` where the vocab has no such token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialIds {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence.
    pub eos: Option<u32>,
    /// End of turn (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, ...).
    pub eot: Option<u32>,
    /// End of message (`<|eom_id|>`).
    pub eom: Option<u32>,
    /// Unknown.
    pub unk: Option<u32>,
    /// Separator.
    pub sep: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
    /// Mask.
    pub mask: Option<u32>,
    /// Fill-in-the-middle: prefix.
    pub fim_pre: Option<u32>,
    /// Fill-in-the-middle: suffix.
    pub fim_suf: Option<u32>,
    /// Fill-in-the-middle: middle.
    pub fim_mid: Option<u32>,
    /// Fill-in-the-middle: pad.
    pub fim_pad: Option<u32>,
    /// Fill-in-the-middle: repository name.
    pub fim_rep: Option<u32>,
    /// Fill-in-the-middle: file separator.
    pub fim_sep: Option<u32>,
}

/// Which algorithm turns text pieces into ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    /// GPT-2 style byte-level BPE (`tokenizer.ggml.model = gpt2`).
    BytePairGpt2,
    /// SentencePiece with byte fallback (`tokenizer.ggml.model = llama`).
    SentencePiece,
    /// A SentencePiece Unigram model segments the text and each piece maps to the vocab by
    /// text (`tokenizer.ggml.model = marian`, Marian's `source.spm` + `vocab.json`).
    Unigram,
    /// BERT's WordPiece over a phantom-space vocab (`tokenizer.ggml.model = bert`).
    WordPiece,
}

/// The vocabulary, resolved: what the encoder and decoder consult.
#[derive(Debug)]
pub(crate) struct Vocab {
    pub algorithm: Algorithm,
    pub texts: Vec<String>,
    pub scores: Vec<f32>,
    pub attrs: Vec<TokenAttrs>,
    /// Text to id; where texts repeat, the highest id wins (as in llama.cpp).
    pub ids_by_text: FastMap<String, u32>,
    pub special: SpecialIds,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    /// Ids that end generation.
    pub end_of_generation: BTreeSet<u32>,
    /// Control, user-defined and unknown tokens, longest text first: the order in which they
    /// are cut out of the input text before pre-tokenization.
    pub special_tokens: Vec<u32>,
}

/// Texts llama.cpp recognises as end-of-turn when the file names no EOT id.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// Texts llama.cpp treats as ending generation, whatever the file says.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// gpt-oss markers that llama.cpp always renders, by making them user-defined.
const ALWAYS_RENDERED_TEXTS: &[&str] =
    &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

impl Vocab {
    /// Applies llama.cpp's loading rules to `spec`. `pre` is the BPE pre-tokenizer's
    /// configuration (ignored for SentencePiece). Warnings llama.cpp would log are appended to
    /// `warnings`.
    pub(crate) fn resolve(
        spec: &VocabSpec,
        pre: Option<&PreTokenizerConfig>,
        warnings: &mut Vec<String>,
    ) -> Result<Vocab, TokenizerError> {
        let algorithm = match spec.model.as_str() {
            "gpt2" => Algorithm::BytePairGpt2,
            "llama" => Algorithm::SentencePiece,
            "marian" => Algorithm::Unigram,
            "bert" => Algorithm::WordPiece,
            other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
        };
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::VocabTooLarge(n));
        }
        check_len(
            "tokenizer.ggml.scores",
            spec.scores.as_ref().map(Vec::len),
            n,
        )?;
        check_len(
            "tokenizer.ggml.token_type",
            spec.token_types.as_ref().map(Vec::len),
            n,
        )?;

        // Defaults by model, then by pre-tokenizer, then the file's own values.
        let mut special = SpecialIds::default();
        let (mut add_bos, mut add_eos, mut add_space_prefix);
        match algorithm {
            Algorithm::SentencePiece => {
                special.bos = Some(1);
                special.eos = Some(2);
                special.unk = Some(0);
                add_bos = true;
                add_eos = false;
                add_space_prefix = true;
            }
            Algorithm::Unigram => {
                // MarianTokenizer: no BOS, `</s>` appended; spaces are the model's business.
                add_bos = false;
                add_eos = true;
                add_space_prefix = false;
            }
            Algorithm::WordPiece => {
                // llama.cpp's defaults, those of the original BERT vocabularies: [CLS] 101
                // starts a text, [SEP] 102 ends it, [UNK] 100, [PAD] 0, [MASK] 103. Converted
                // files name their own.
                special.bos = Some(101);
                special.unk = Some(100);
                special.sep = Some(102);
                special.pad = Some(0);
                special.mask = Some(103);
                add_bos = true;
                add_eos = false;
                add_space_prefix = false;
            }
            Algorithm::BytePairGpt2 => {
                special.bos = Some(11);
                special.eos = Some(11);
                add_bos = pre.is_some_and(|p| p.adds_bos);
                add_eos = false;
                add_space_prefix = false;
                if pre.is_some_and(|p| p.has_no_bos) {
                    special.bos = None;
                }
            }
        }
        if let Some(v) = spec.add_space_prefix {
            add_space_prefix = v;
        }

        let mut texts = Vec::with_capacity(n);
        let mut ids_by_text = FastMap::with_capacity_and_hasher(n, Default::default());
        for (i, text) in spec.tokens.iter().enumerate() {
            let text = if text.is_empty() {
                warnings.push(format!("empty token at index {i}"));
                format!("[EMPTY_{i}]")
            } else {
                text.clone()
            };
            ids_by_text.insert(text.clone(), i as u32);
            texts.push(text);
        }
        let scores = match &spec.scores {
            Some(scores) => scores[..n].to_vec(),
            None => vec![0.0; n],
        };
        let mut attrs: Vec<TokenAttrs> = match &spec.token_types {
            Some(types) => types[..n]
                .iter()
                .map(|&t| TokenAttrs::from_token_type(t))
                .collect(),
            None => vec![TokenAttrs::NORMAL; n],
        };

        // Special ids: defaults that do not fit the vocab are dropped; the file's values replace
        // them when they fit.
        let given = &spec.special_ids;
        for (name, slot, value) in [
            ("bos", &mut special.bos, given.bos),
            ("eos", &mut special.eos, given.eos),
            ("eot", &mut special.eot, given.eot),
            ("eom", &mut special.eom, given.eom),
            ("unknown", &mut special.unk, given.unk),
            ("seperator", &mut special.sep, given.sep),
            ("padding", &mut special.pad, given.pad),
            ("mask", &mut special.mask, given.mask),
            ("fim_pre", &mut special.fim_pre, given.fim_pre),
            ("fim_suf", &mut special.fim_suf, given.fim_suf),
            ("fim_mid", &mut special.fim_mid, given.fim_mid),
            ("fim_pad", &mut special.fim_pad, given.fim_pad),
            ("fim_rep", &mut special.fim_rep, given.fim_rep),
            ("fim_sep", &mut special.fim_sep, given.fim_sep),
        ] {
            if slot.is_some_and(|id| id as usize >= n) {
                warnings.push(format!(
                    "default {name} token {} is out of the vocab, disabling it",
                    slot.unwrap_or_default()
                ));
                *slot = None;
            }
            if let Some(id) = value {
                if id < n as u64 {
                    *slot = Some(id as u32);
                } else {
                    warnings.push(format!(
                        "bad special token: {name} = {id} is out of the vocab (size {n}); keeping {slot:?}"
                    ));
                }
            }
        }
        if let Some(v) = spec.add_bos {
            add_bos = v;
        }
        if let Some(v) = spec.add_eos {
            add_eos = v;
        }

        // Visit each distinct text once, with the id the text resolves to, in id order.
        let canonical: Vec<u32> = (0..n as u32)
            .filter(|&id| ids_by_text.get(&texts[id as usize]) == Some(&id))
            .collect();

        // Auto-detected EOT/EOM/FIM tokens become control tokens. Where several candidates exist
        // (`<|im_end|>` and `<|endoftext|>`), llama.cpp takes whichever its hash map yields first,
        // an order that differs between C++ standard libraries; egpu takes the first in the
        // list's order, which puts chat end-of-turn markers first.
        for (slot, candidates) in [
            (&mut special.eot, EOT_TEXTS),
            (&mut special.eom, EOM_TEXTS),
            (&mut special.fim_pre, FIM_PRE_TEXTS),
            (&mut special.fim_suf, FIM_SUF_TEXTS),
            (&mut special.fim_mid, FIM_MID_TEXTS),
            (&mut special.fim_pad, FIM_PAD_TEXTS),
            (&mut special.fim_rep, FIM_REP_TEXTS),
            (&mut special.fim_sep, FIM_SEP_TEXTS),
        ] {
            if slot.is_some() {
                continue;
            }
            if let Some(&id) = candidates.iter().find_map(|&text| ids_by_text.get(text)) {
                *slot = Some(id);
                make_control(&mut attrs[id as usize], &texts[id as usize], warnings);
            }
        }

        // Control tokens named "unused" are unused.
        for &id in &canonical {
            let attr = &mut attrs[id as usize];
            if attr.intersects(TokenAttrs::CONTROL) && texts[id as usize].contains("unused") {
                *attr = *attr | TokenAttrs::UNUSED;
            }
        }

        // End of generation: FIM pad/repo/separator, well-known texts, then EOS/EOT/EOM.
        let mut end_of_generation = BTreeSet::new();
        end_of_generation.extend(special.fim_pad);
        end_of_generation.extend(special.fim_rep);
        end_of_generation.extend(special.fim_sep);
        for &id in &canonical {
            if END_OF_GENERATION_TEXTS.contains(&texts[id as usize].as_str()) {
                end_of_generation.insert(id);
                make_control(&mut attrs[id as usize], &texts[id as usize], warnings);
            }
        }
        for &id in &canonical {
            if ALWAYS_RENDERED_TEXTS.contains(&texts[id as usize].as_str()) {
                attrs[id as usize] = TokenAttrs::USER_DEFINED;
            }
        }
        for (name, id) in [
            ("eos", special.eos),
            ("eot", special.eot),
            ("eom", special.eom),
        ] {
            if let Some(id) = id {
                if end_of_generation.insert(id) {
                    warnings.push(format!(
                        "{name} token {id} was not among the end-of-generation tokens; added"
                    ));
                }
            }
        }
        let eog_with_text = |eog: &BTreeSet<u32>, text: &str| {
            eog.iter().copied().find(|&id| texts[id as usize] == text)
        };
        let has = |eog: &BTreeSet<u32>, text: &str| eog_with_text(eog, text).is_some();
        // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
        if let Some(end) = eog_with_text(&end_of_generation, "<|end|>") {
            let eog = &end_of_generation;
            let calls = has(eog, "<|call|>") || has(eog, "<|calls|>");
            if calls && (has(eog, "<|return|>") || has(eog, "<|flush|>")) {
                end_of_generation.remove(&end);
                attrs[end as usize] = TokenAttrs::USER_DEFINED;
            }
        }
        // Where "<|tool_response>" or "<|plamo:eos|>" ends generation, "</s>" is ordinary text.
        let eog = &end_of_generation;
        if has(eog, "<|tool_response>") || has(eog, "<|plamo:eos|>") {
            if let Some(s) = eog_with_text(eog, "</s>") {
                end_of_generation.remove(&s);
                attrs[s as usize] = TokenAttrs::NORMAL;
            }
        }

        let special_attrs = TokenAttrs::CONTROL | TokenAttrs::USER_DEFINED | TokenAttrs::UNKNOWN;
        let mut special_tokens: Vec<u32> = (0..n as u32)
            .filter(|&id| attrs[id as usize].intersects(special_attrs))
            .collect();
        special_tokens.sort_by(|&a, &b| {
            texts[b as usize]
                .len()
                .cmp(&texts[a as usize].len())
                .then(a.cmp(&b))
        });

        Ok(Vocab {
            algorithm,
            texts,
            scores,
            attrs,
            ids_by_text,
            special,
            add_bos,
            add_eos,
            add_space_prefix,
            end_of_generation,
            special_tokens,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.texts.len()
    }

    pub(crate) fn id_of(&self, text: &str) -> Option<u32> {
        self.ids_by_text.get(text).copied()
    }
}

fn make_control(attr: &mut TokenAttrs, text: &str, warnings: &mut Vec<String>) {
    if !attr.intersects(TokenAttrs::CONTROL) {
        warnings.push(format!(
            "control-looking token {text:?} was not a control token; treating it as one"
        ));
        *attr = *attr | TokenAttrs::CONTROL;
    }
}

fn check_len(key: &'static str, found: Option<usize>, tokens: usize) -> Result<(), TokenizerError> {
    match found {
        Some(found) if found < tokens => Err(TokenizerError::ArrayTooShort { key, found, tokens }),
        _ => Ok(()),
    }
}

//! WordPiece, BERT's tokenizer (`tokenizer.ggml.model = bert`), as transformers'
//! `BertTokenizer` and llama.cpp's WPM tokenizer apply it.
//!
//! 1. Normalise: drop NUL, U+FFFD and control characters; lowercase and strip accents (NFD,
//!    then drop nonspacing marks) where the vocab says so.
//! 2. Split into words at whitespace, and make every punctuation character (and ASCII symbol)
//!    and every CJK ideograph a word of its own.
//! 3. Cover each word with the longest vocabulary pieces, left to right. A word that cannot be
//!    covered, or is longer than 100 characters, is one unknown token.
//!
//! GGUF stores the vocabulary in llama.cpp's "phantom space" form: a piece that starts a word
//! is `▁piece`, a continuation is the bare piece (`##ing` in the Hugging Face vocab is `ing`
//! here).

use unicode_normalization::UnicodeNormalization;

use super::fast_hash::FastMap;
use super::unicode::{class_of, is_whitespace, CharClass};
use super::unicode_tables::NONSPACING_MARK_RANGES;

/// transformers' `max_input_chars_per_word`: longer words are one unknown token.
const MAX_WORD_CHARS: usize = 100;

/// The marker a word-initial piece starts with.
const WORD_START: char = '▁';

/// How text is normalised before it is split (`tokenizer.ggml.normalizer.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Normalizer {
    pub lowercase: bool,
    pub strip_accents: bool,
}

#[derive(Debug)]
pub(crate) struct WordPiece {
    normalizer: Normalizer,
    /// The longest piece, in bytes: no match is tried beyond it.
    max_piece_bytes: usize,
}

impl WordPiece {
    pub fn new(texts: &[String], normalizer: Normalizer) -> WordPiece {
        WordPiece {
            normalizer,
            max_piece_bytes: texts.iter().map(String::len).max().unwrap_or(0),
        }
    }

    /// Appends the ids of `text` to `out`.
    pub fn encode(&self, text: &str, ids: &FastMap<String, u32>, unknown: u32, out: &mut Vec<u32>) {
        let mut piece = String::new();
        for word in self.words(text) {
            let chars = word.chars().count();
            let before = out.len();
            if chars <= MAX_WORD_CHARS && self.cover(&word, ids, &mut piece, out) {
                continue;
            }
            out.truncate(before);
            out.push(unknown);
        }
    }

    /// Greedy longest-match-first pieces of one word; false if some part of it matches none.
    fn cover(
        &self,
        word: &str,
        ids: &FastMap<String, u32>,
        piece: &mut String,
        out: &mut Vec<u32>,
    ) -> bool {
        let mut start = 0;
        while start < word.len() {
            let rest = &word[start..];
            // Candidate ends at char boundaries, longest first, none beyond the longest piece.
            let prefix = if start == 0 { WORD_START.len_utf8() } else { 0 };
            let ends: Vec<usize> = rest
                .char_indices()
                .map(|(i, _)| i)
                .skip(1)
                .chain([rest.len()])
                .filter(|&end| prefix + end <= self.max_piece_bytes)
                .collect();
            let mut found = None;
            for &end in ends.iter().rev() {
                piece.clear();
                if start == 0 {
                    piece.push(WORD_START);
                }
                piece.push_str(&rest[..end]);
                if let Some(&id) = ids.get(piece.as_str()) {
                    found = Some((id, end));
                    break;
                }
            }
            let Some((id, len)) = found else {
                return false;
            };
            out.push(id);
            start += len;
        }
        true
    }

    /// The normalised words of `text`.
    fn words(&self, text: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut word = String::new();
        let finish = |word: &mut String, words: &mut Vec<String>| {
            if !word.is_empty() {
                words.push(std::mem::take(word));
            }
        };
        let push = |c: char, word: &mut String, words: &mut Vec<String>| {
            if is_whitespace(c) {
                finish(word, words);
                return;
            }
            let class = class_of(c);
            if c == '\0' || c == '\u{FFFD}' || class == CharClass::Other {
                // Controls and format characters (whitespace was handled above).
                return;
            }
            if self.normalizer.strip_accents && is_nonspacing_mark(c) {
                return;
            }
            let splits = class == CharClass::Punctuation
                || (c.is_ascii() && class == CharClass::Symbol)
                || is_cjk_ideograph(c);
            if splits {
                finish(word, words);
                push_lower(c, self.normalizer.lowercase, word);
                finish(word, words);
            } else {
                push_lower(c, self.normalizer.lowercase, word);
            }
        };
        if self.normalizer.strip_accents {
            // transformers lowercases before decomposing; lowercasing never creates marks
            // that decomposition would not, so decomposing first gives the same words.
            for c in text.nfd() {
                push(c, &mut word, &mut words);
            }
        } else {
            for c in text.chars() {
                push(c, &mut word, &mut words);
            }
        }
        finish(&mut word, &mut words);
        words
    }
}

fn push_lower(c: char, lowercase: bool, word: &mut String) {
    if lowercase {
        word.extend(c.to_lowercase());
    } else {
        word.push(c);
    }
}

fn is_nonspacing_mark(c: char) -> bool {
    let cp = c as u32;
    let i = NONSPACING_MARK_RANGES.partition_point(|&(first, _)| first <= cp);
    i > 0 && cp <= NONSPACING_MARK_RANGES[i - 1].1
}

/// The CJK Unified Ideographs blocks BERT splits into single characters (transformers'
/// `_is_chinese_char`).
fn is_cjk_ideograph(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(pieces: &[&str]) -> (WordPiece, FastMap<String, u32>) {
        let texts: Vec<String> = pieces.iter().map(|s| s.to_string()).collect();
        let ids = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let normalizer = Normalizer {
            lowercase: true,
            strip_accents: true,
        };
        (WordPiece::new(&texts, normalizer), ids)
    }

    #[test]
    fn words_are_covered_longest_piece_first_and_unknown_words_are_one_token() {
        let (wp, ids) = model(&[
            "[UNK]", "▁un", "▁unaff", "able", "▁the", "aff", "▁,", "▁cafe",
        ]);
        let mut out = Vec::new();
        wp.encode("The UNAFFable, Café xyz", &ids, 0, &mut out);
        // the | unaff·able (not un·aff·able: the longest first piece wins) | , | cafe (its
        // accent stripped) | xyz (no piece covers it)
        assert_eq!(out, vec![4, 2, 3, 6, 7, 0]);
    }

    #[test]
    fn punctuation_and_cjk_split_and_controls_vanish() {
        let (wp, _) = model(&[]);
        assert_eq!(
            wp.words("a.b\u{0007}c 中文 x$y"),
            vec!["a", ".", "bc", "中", "文", "x", "$", "y"]
        );
        // A non-ASCII symbol does not split.
        assert_eq!(wp.words("a€b"), vec!["a€b"]);
    }
}

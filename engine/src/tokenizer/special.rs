//! Cutting special tokens out of the input before the text is tokenized.
//!
//! llama.cpp takes the special tokens longest first and, for each, splits every remaining text
//! fragment at each (non-overlapping, leftmost-first) occurrence. Order matters: with tokens
//! `bcd` and `ab`, text `abcd` becomes `a` + `bcd`, not `ab` + `cd`. Scanning all texts for each
//! of thousands of tokens would be slow, so one Aho-Corasick pass first finds which tokens
//! occur at all; only those are split on, in the same order.

use aho_corasick::AhoCorasick;

use super::vocab::{TokenAttrs, Vocab};

/// A piece of input: text still to tokenize, or a special token already recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// Finds special tokens in text.
#[derive(Debug)]
pub(crate) struct SpecialMatcher {
    /// Patterns are `Vocab::special_tokens`' texts, in that order.
    automaton: Option<AhoCorasick>,
}

impl SpecialMatcher {
    pub(crate) fn new(vocab: &Vocab) -> SpecialMatcher {
        let patterns = vocab
            .special_tokens
            .iter()
            .map(|&id| vocab.texts[id as usize].as_str());
        // Building can only fail for sizes far beyond any vocab; without the automaton,
        // `partition` splits on nothing, which is still safe.
        SpecialMatcher {
            automaton: AhoCorasick::new(patterns).ok(),
        }
    }

    /// Splits `text` into fragments. With `parse_special` off, only user-defined tokens are
    /// recognised (control and unknown tokens stay text), as in llama.cpp.
    pub(crate) fn partition<'t>(
        &self,
        vocab: &Vocab,
        text: &'t str,
        parse_special: bool,
    ) -> Vec<Fragment<'t>> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(text)];
        let Some(automaton) = &self.automaton else {
            return fragments;
        };
        let mut present = vec![false; vocab.special_tokens.len()];
        let mut any = false;
        for found in automaton.find_overlapping_iter(text) {
            present[found.pattern().as_usize()] = true;
            any = true;
        }
        if !any {
            return fragments;
        }
        let skipped_unless_parsing = TokenAttrs::CONTROL | TokenAttrs::UNKNOWN;
        for (index, &id) in vocab.special_tokens.iter().enumerate() {
            if !present[index]
                || (!parse_special && vocab.attrs[id as usize].intersects(skipped_unless_parsing))
            {
                continue;
            }
            let needle = vocab.texts[id as usize].as_str();
            let mut split = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(haystack) = fragment else {
                    split.push(fragment);
                    continue;
                };
                let mut rest_start = 0;
                for (at, _) in haystack.match_indices(needle) {
                    if at > rest_start {
                        split.push(Fragment::Text(&haystack[rest_start..at]));
                    }
                    split.push(Fragment::Token(id));
                    rest_start = at + needle.len();
                }
                if rest_start < haystack.len() {
                    split.push(Fragment::Text(&haystack[rest_start..]));
                }
            }
            fragments = split;
        }
        fragments
    }
}

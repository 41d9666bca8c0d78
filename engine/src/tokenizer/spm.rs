//! SentencePiece (llama.cpp's `llama` vocab type): start from single characters and repeatedly
//! join the adjacent pair whose joined text is the highest-scoring token; characters left
//! without a token are spelled with byte tokens (`<0xXX>`).
//!
//! The input is the whole text fragment (no pre-tokenization), with spaces already replaced by
//! `▁` by the caller.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::Vocab;

/// Byte fallback of a SentencePiece vocab: the token of each byte.
#[derive(Debug)]
pub(crate) struct SpmModel {
    /// `<0xXX>`, else the one-byte token, else the unknown token, else nothing.
    byte_tokens: [Option<u32>; 256],
}

impl SpmModel {
    pub(crate) fn new(vocab: &Vocab) -> SpmModel {
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            let one_byte = u8::try_from(b)
                .ok()
                .filter(u8::is_ascii)
                .and_then(|b| vocab.id_of(char::from(b).encode_utf8(&mut [0; 4])));
            // llama.cpp aborts when a byte has no token at all; the unknown token is a gentler
            // stand-in for such broken vocabs.
            *slot = vocab
                .id_of(&format!("<0x{b:02X}>"))
                .or(one_byte)
                .or(vocab.special.unk);
        }
        SpmModel { byte_tokens }
    }

    /// Appends the ids of `text`.
    pub(crate) fn encode(&self, text: &str, vocab: &Vocab, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .map(|(start, c)| Symbol {
                start,
                len: c.len_utf8(),
                next: NONE,
                prev: NONE,
            })
            .collect();
        let count = symbols.len();
        for (i, symbol) in symbols.iter_mut().enumerate() {
            symbol.prev = i.wrapping_sub(1);
            symbol.next = if i + 1 < count { i + 1 } else { NONE };
        }

        let mut queue = BinaryHeap::new();
        for right in 1..count {
            push_candidate(text, vocab, &symbols, &mut queue, right - 1, right);
        }
        while let Some(candidate) = queue.pop() {
            let (left, right) = (candidate.left, candidate.right);
            // Stale if either side was merged away or has grown since it was queued.
            if symbols[left].len == 0
                || symbols[right].len == 0
                || symbols[left].len + symbols[right].len != candidate.len
            {
                continue;
            }
            symbols[left].len += symbols[right].len;
            symbols[right].len = 0;
            let next = symbols[right].next;
            symbols[left].next = next;
            if next != NONE {
                symbols[next].prev = left;
            }
            let prev = symbols[left].prev;
            if prev != NONE {
                push_candidate(text, vocab, &symbols, &mut queue, prev, left);
            }
            if next != NONE {
                push_candidate(text, vocab, &symbols, &mut queue, left, next);
            }
        }

        // Every merged symbol is a token (merges are only queued for tokens), so only single
        // characters can miss and need byte fallback.
        let mut i = if count > 0 { 0 } else { NONE };
        while i != NONE {
            let symbol = symbols[i];
            let piece = &text[symbol.start..symbol.start + symbol.len];
            match vocab.id_of(piece) {
                Some(id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
            i = symbol.next;
        }
    }
}

fn push_candidate(
    text: &str,
    vocab: &Vocab,
    symbols: &[Symbol],
    queue: &mut BinaryHeap<Candidate>,
    left: usize,
    right: usize,
) {
    let start = symbols[left].start;
    let len = symbols[left].len + symbols[right].len;
    if let Some(id) = vocab.id_of(&text[start..start + len]) {
        queue.push(Candidate {
            score: vocab.scores[id as usize],
            left,
            right,
            len,
        });
    }
}

const NONE: usize = usize::MAX;

#[derive(Debug, Clone, Copy)]
struct Symbol {
    /// Byte offset in the text; a symbol always covers `start..start + len`.
    start: usize,
    /// Byte length; 0 once merged into its left neighbour.
    len: usize,
    prev: usize,
    next: usize,
}

/// A pair whose joined text was a token when queued.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

// The heap pops the highest score first; among equal scores, the leftmost pair.
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

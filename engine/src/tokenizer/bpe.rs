//! Byte-level BPE (GPT-2 style): each pre-tokenized word is spelled in GPT-2's byte alphabet and
//! its adjacent symbols are merged, lowest merge rank first, until no listed merge applies.
//!
//! Strings that take part in merges are interned, so a merge lookup is one hash of two `u32`s.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::unicode::BYTE_TO_CHAR;
use super::vocab::Vocab;

/// Index of an interned string (a symbol's spelling).
type PieceId = u32;

#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    result: PieceId,
}

/// The merge table and interned symbol spellings of a byte-level BPE vocab.
#[derive(Debug)]
pub(crate) struct BpeModel {
    /// Spelling of each piece.
    piece_texts: Vec<Box<str>>,
    /// The vocab token spelled like each piece, if there is one.
    piece_tokens: Vec<Option<u32>>,
    /// `(left, right)` to the merge that joins them. The first listing of a pair wins.
    merges: HashMap<(PieceId, PieceId), Merge>,
    /// The piece of the single character that spells each byte.
    byte_pieces: [PieceId; 256],
    /// Tokens spelled by one ASCII character: the last resort for a symbol that is no token.
    ascii_tokens: [Option<u32>; 128],
    /// A word that is itself a token is emitted whole (LLaMA 3's `ignore_merges`).
    ignores_merges: bool,
}

struct Interner {
    ids: HashMap<Box<str>, PieceId>,
    texts: Vec<Box<str>>,
}

impl Interner {
    fn intern(&mut self, text: &str) -> PieceId {
        if let Some(&id) = self.ids.get(text) {
            return id;
        }
        let id = self.texts.len() as PieceId;
        self.texts.push(text.into());
        self.ids.insert(text.into(), id);
        id
    }
}

impl BpeModel {
    /// Builds the merge table from `tokenizer.ggml.merges` (`"left right"`, highest priority
    /// first). A line is split at its first space after the first byte, as llama.cpp does; a
    /// line with no such space can never apply and is skipped.
    pub(crate) fn new(vocab: &Vocab, merge_lines: &[String], ignores_merges: bool) -> BpeModel {
        let mut interner = Interner {
            ids: HashMap::with_capacity(merge_lines.len() * 2),
            texts: Vec::with_capacity(merge_lines.len() * 2),
        };
        let mut byte_pieces = [0; 256];
        for (b, piece) in byte_pieces.iter_mut().enumerate() {
            *piece = interner.intern(BYTE_TO_CHAR[b].encode_utf8(&mut [0; 4]));
        }
        let mut merges = HashMap::with_capacity(merge_lines.len());
        for (rank, line) in merge_lines.iter().enumerate() {
            let Some(space) = line.bytes().skip(1).position(|b| b == b' ').map(|i| i + 1) else {
                continue;
            };
            let (left, right) = (&line[..space], &line[space + 1..]);
            if right.is_empty() {
                continue; // symbols are never empty
            }
            let left_id = interner.intern(left);
            let right_id = interner.intern(right);
            let result = interner.intern(&format!("{left}{right}"));
            merges.entry((left_id, right_id)).or_insert(Merge {
                rank: rank as u32,
                result,
            });
        }
        let piece_tokens = interner.texts.iter().map(|t| vocab.id_of(t)).collect();
        let mut ascii_tokens = [None; 128];
        for (b, token) in ascii_tokens.iter_mut().enumerate() {
            *token = vocab.id_of(char::from(b as u8).encode_utf8(&mut [0; 4]));
        }
        BpeModel {
            piece_texts: interner.texts,
            piece_tokens,
            merges,
            byte_pieces,
            ascii_tokens,
            ignores_merges,
        }
    }

    /// Appends the ids of one pre-tokenized word.
    pub(crate) fn encode_word(
        &self,
        word: &str,
        vocab: &Vocab,
        scratch: &mut BpeScratch,
        out: &mut Vec<u32>,
    ) {
        if self.ignores_merges {
            scratch.spelled.clear();
            scratch
                .spelled
                .extend(word.bytes().map(|b| BYTE_TO_CHAR[b as usize]));
            if let Some(id) = vocab.id_of(&scratch.spelled) {
                out.push(id);
                return;
            }
        }

        let symbols = &mut scratch.symbols;
        symbols.clear();
        symbols.extend(word.bytes().enumerate().map(|(i, b)| Symbol {
            piece: self.byte_pieces[b as usize],
            prev: i.wrapping_sub(1),
            next: i + 1,
        }));
        let Some(last) = symbols.last_mut() else {
            return;
        };
        last.next = NONE;

        // Candidate merges, lowest rank first and leftmost among equal ranks.
        let queue = &mut scratch.queue;
        queue.clear();
        for left in 1..symbols.len() {
            self.push_candidate(symbols, queue, left - 1, left);
        }
        while let Some(Reverse(candidate)) = queue.pop() {
            let (left, right) = (candidate.left as usize, candidate.right as usize);
            // Stale if either side has changed since the candidate was queued.
            if !symbols[left].alive()
                || !symbols[right].alive()
                || symbols[left].piece != candidate.left_piece
                || symbols[right].piece != candidate.right_piece
            {
                continue;
            }
            let next = symbols[right].next;
            symbols[left].piece = candidate.result;
            symbols[left].next = next;
            symbols[right].piece = DEAD;
            if next != NONE {
                symbols[next].prev = left;
            }
            let prev = symbols[left].prev;
            if prev != NONE {
                self.push_candidate(symbols, queue, prev, left);
            }
            if next != NONE {
                self.push_candidate(symbols, queue, left, next);
            }
        }

        // The first symbol is never merged away, so the chain starts at 0.
        let mut i = 0;
        while i != NONE {
            let piece = symbols[i].piece as usize;
            match self.piece_tokens[piece] {
                Some(id) => out.push(id),
                None => {
                    // No token spells this symbol: fall back to single characters, as llama.cpp
                    // does (only one-byte, i.e. ASCII, spellings can match).
                    out.extend(
                        self.piece_texts[piece]
                            .bytes()
                            .filter(u8::is_ascii)
                            .filter_map(|b| self.ascii_tokens[b as usize]),
                    );
                }
            }
            i = symbols[i].next;
        }
    }

    fn push_candidate(
        &self,
        symbols: &[Symbol],
        queue: &mut BinaryHeap<Reverse<Candidate>>,
        left: usize,
        right: usize,
    ) {
        let (left_piece, right_piece) = (symbols[left].piece, symbols[right].piece);
        if let Some(merge) = self.merges.get(&(left_piece, right_piece)) {
            queue.push(Reverse(Candidate {
                rank: merge.rank,
                left: left as u32,
                right: right as u32,
                left_piece,
                right_piece,
                result: merge.result,
            }));
        }
    }
}

const NONE: usize = usize::MAX;
const DEAD: PieceId = PieceId::MAX;

#[derive(Debug, Clone, Copy)]
struct Symbol {
    piece: PieceId,
    prev: usize,
    next: usize,
}

impl Symbol {
    fn alive(&self) -> bool {
        self.piece != DEAD
    }
}

/// A merge that applied when it was queued. Ordered by rank, then by position, so the heap
/// yields what llama.cpp's queue yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    rank: u32,
    left: u32,
    right: u32,
    left_piece: PieceId,
    right_piece: PieceId,
    result: PieceId,
}

/// Buffers reused across words, so encoding a long text does not allocate per word.
#[derive(Debug, Default)]
pub(crate) struct BpeScratch {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Reverse<Candidate>>,
    spelled: String,
}

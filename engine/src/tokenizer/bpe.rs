//! Byte-level BPE (GPT-2 style): each pre-tokenized word is spelled in GPT-2's byte alphabet and
//! its adjacent symbols are merged, lowest merge rank first, until no listed merge applies.
//!
//! Symbols are numbered: a symbol spelled like a vocab token has that token's id, and the few
//! merge halves and results that are no token get ids past the vocab. A merge lookup is then
//! one hash of two `u32`s.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::fast_hash::FastMap;
use super::unicode::BYTE_TO_CHAR;
use super::vocab::Vocab;

/// A symbol's spelling: a token id below the vocab size, else an index into
/// `BpeModel::extra_texts` (offset by the vocab size).
type PieceId = u32;

#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    result: PieceId,
}

/// The merge table and interned symbol spellings of a byte-level BPE vocab.
#[derive(Debug)]
pub(crate) struct BpeModel {
    /// The number of tokens: pieces from here on are no token.
    vocab_size: u32,
    /// Spellings of the pieces that are no token.
    extra_texts: Vec<Box<str>>,
    /// `(left, right)` to the merge that joins them. The first listing of a pair wins.
    merges: FastMap<(PieceId, PieceId), Merge>,
    /// The piece of the single character that spells each byte.
    byte_pieces: [PieceId; 256],
    /// Tokens spelled by one ASCII character: the last resort for a symbol that is no token.
    ascii_tokens: [Option<u32>; 128],
    /// A word that is itself a token is emitted whole (LLaMA 3's `ignore_merges`).
    ignores_merges: bool,
}

/// Numbers spellings: token ids for tokens, new ids past the vocab for the rest.
struct Interner<'v> {
    vocab: &'v Vocab,
    extra_ids: FastMap<Box<str>, PieceId>,
    extra_texts: Vec<Box<str>>,
}

impl Interner<'_> {
    fn intern(&mut self, text: &str) -> PieceId {
        if let Some(id) = self.vocab.id_of(text) {
            return id;
        }
        if let Some(&id) = self.extra_ids.get(text) {
            return id;
        }
        let id = (self.vocab.len() + self.extra_texts.len()) as PieceId;
        self.extra_texts.push(text.into());
        self.extra_ids.insert(text.into(), id);
        id
    }
}

impl BpeModel {
    /// Builds the merge table from `tokenizer.ggml.merges` (`"left right"`, highest priority
    /// first). A line is split at its first space after the first byte, as llama.cpp does; a
    /// line with no such space can never apply and is skipped.
    pub(crate) fn new(vocab: &Vocab, merge_lines: &[String], ignores_merges: bool) -> BpeModel {
        let mut interner = Interner {
            vocab,
            extra_ids: FastMap::default(),
            extra_texts: Vec::new(),
        };
        let mut byte_pieces = [0; 256];
        for (b, piece) in byte_pieces.iter_mut().enumerate() {
            *piece = interner.intern(BYTE_TO_CHAR[b].encode_utf8(&mut [0; 4]));
        }
        let mut merges = FastMap::with_capacity_and_hasher(merge_lines.len(), Default::default());
        let mut joined = String::new();
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
            joined.clear();
            joined.push_str(left);
            joined.push_str(right);
            let result = interner.intern(&joined);
            merges.entry((left_id, right_id)).or_insert(Merge {
                rank: rank as u32,
                result,
            });
        }
        let mut ascii_tokens = [None; 128];
        for (b, token) in ascii_tokens.iter_mut().enumerate() {
            *token = vocab.id_of(char::from(b as u8).encode_utf8(&mut [0; 4]));
        }
        BpeModel {
            vocab_size: vocab.len() as u32,
            extra_texts: interner.extra_texts,
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

        if word.len() <= SHORT_WORD {
            self.merge_short(word, scratch);
        } else {
            self.merge_long(word, scratch);
        }
        for &piece in &scratch.pieces {
            if piece < self.vocab_size {
                out.push(piece);
            } else {
                // No token spells this symbol: fall back to single characters, as llama.cpp
                // does (only one-byte, i.e. ASCII, spellings can match).
                let text = &self.extra_texts[(piece - self.vocab_size) as usize];
                out.extend(
                    text.bytes()
                        .filter(u8::is_ascii)
                        .filter_map(|b| self.ascii_tokens[b as usize]),
                );
            }
        }
    }

    fn merge_of(&self, left: PieceId, right: PieceId) -> Option<Merge> {
        self.merges.get(&(left, right)).copied()
    }

    /// Merges a short word by scanning its pairs for the lowest rank (leftmost among equals)
    /// each round: what the queue of [`BpeModel::merge_long`] yields, without its overhead.
    /// Leaves the final symbols in `scratch.pieces`.
    fn merge_short(&self, word: &str, scratch: &mut BpeScratch) {
        let pieces = &mut scratch.pieces;
        pieces.clear();
        pieces.extend(word.bytes().map(|b| self.byte_pieces[b as usize]));
        let pairs = &mut scratch.pairs;
        pairs.clear();
        pairs.extend(pieces.windows(2).map(|w| self.merge_of(w[0], w[1])));
        loop {
            let mut best: Option<(usize, Merge)> = None;
            for (i, merge) in pairs.iter().enumerate() {
                if let Some(merge) = merge {
                    if best.is_none_or(|(_, b)| merge.rank < b.rank) {
                        best = Some((i, *merge));
                    }
                }
            }
            let Some((i, merge)) = best else {
                break;
            };
            pieces[i] = merge.result;
            pieces.remove(i + 1);
            pairs.remove(i);
            if i > 0 {
                pairs[i - 1] = self.merge_of(pieces[i - 1], pieces[i]);
            }
            if i + 1 < pieces.len() {
                pairs[i] = self.merge_of(pieces[i], pieces[i + 1]);
            }
        }
    }

    /// Merges a long word with a priority queue of candidate merges, lowest rank first and
    /// leftmost among equal ranks; stale candidates are skipped when popped. O(n log n), so a
    /// 100 KB word without breaks is no problem. Leaves the final symbols in `scratch.pieces`.
    fn merge_long(&self, word: &str, scratch: &mut BpeScratch) {
        let symbols = &mut scratch.symbols;
        symbols.clear();
        symbols.extend(word.bytes().enumerate().map(|(i, b)| Symbol {
            piece: self.byte_pieces[b as usize],
            prev: i.wrapping_sub(1),
            next: i + 1,
        }));
        scratch.pieces.clear();
        let Some(last) = symbols.last_mut() else {
            return;
        };
        last.next = NONE;

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
            scratch.pieces.push(symbols[i].piece);
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
        if let Some(merge) = self.merge_of(left_piece, right_piece) {
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
/// Words up to this many bytes are merged by [`BpeModel::merge_short`].
const SHORT_WORD: usize = 48;
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
    /// A word's symbols, at the end its final ones.
    pieces: Vec<PieceId>,
    /// The merge of each adjacent pair of `pieces` (short words).
    pairs: Vec<Option<Merge>>,
    /// Linked symbols (long words).
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Reverse<Candidate>>,
    spelled: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::pretokenize::PreTokenizerConfig;
    use crate::tokenizer::VocabSpec;

    /// A vocab of every string over {a, b, c} up to 5 letters, each made by a merge at a
    /// pseudo-random split, in pseudo-random rank order: many ties between competing merges.
    fn synthetic_model() -> (Vocab, BpeModel) {
        let mut state = 0x1234_5678_9ABC_DEF1u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut tokens: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        let mut merges = Vec::new();
        let mut frontier = tokens.clone();
        for _ in 1..5 {
            let mut longer = Vec::new();
            for t in &frontier {
                for c in ["a", "b", "c"] {
                    let word = format!("{t}{c}");
                    let split = 1 + (next() as usize) % (word.len() - 1);
                    merges.push(format!("{} {}", &word[..split], &word[split..]));
                    longer.push(word);
                }
            }
            tokens.extend(longer.iter().cloned());
            frontier = longer;
        }
        // Shuffle the ranks.
        for i in (1..merges.len()).rev() {
            merges.swap(i, (next() as usize) % (i + 1));
        }
        let spec = VocabSpec {
            model: "gpt2".into(),
            pre: Some("gpt-2".into()),
            tokens,
            merges: Some(merges.clone()),
            ..VocabSpec::default()
        };
        let pre = PreTokenizerConfig::for_name("gpt-2");
        let vocab = Vocab::resolve(&spec, pre.as_ref(), &mut Vec::new()).expect("vocab");
        let model = BpeModel::new(&vocab, &merges, false);
        (vocab, model)
    }

    #[test]
    fn short_and_long_merging_agree() {
        let (_, model) = synthetic_model();
        let mut state = 0xDEAD_BEEF_CAFE_F00Du64;
        let mut scratch = BpeScratch::default();
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = 1 + (state % 80) as usize;
            let word: String = (0..len)
                .map(|i| ['a', 'b', 'c'][((state >> (i % 60)) as usize + i * 7) % 3])
                .collect();
            model.merge_short(&word, &mut scratch);
            let short = scratch.pieces.clone();
            model.merge_long(&word, &mut scratch);
            assert_eq!(short, scratch.pieces, "{word}");
        }
    }

    #[test]
    fn unknown_symbols_fall_back_to_ascii_tokens() {
        let (vocab, model) = synthetic_model();
        let mut out = Vec::new();
        // "d" is not in the vocab at all, so it is dropped, as in llama.cpp.
        model.encode_word("abd", &vocab, &mut BpeScratch::default(), &mut out);
        let texts: Vec<&str> = out
            .iter()
            .map(|&id| vocab.texts[id as usize].as_str())
            .collect();
        assert_eq!(texts.concat(), "ab");
    }
}

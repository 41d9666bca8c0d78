//! SentencePiece Unigram models read from their `.spm` protobuf (`source.spm` in a Marian
//! folder), segmenting text exactly as the `sentencepiece` library does.
//!
//! Encoding is two steps:
//!
//! 1. **Normalization.** The model's `precompiled_charsmap` (a darts-clone double-array trie
//!    followed by a blob of NUL-terminated replacement strings; `nmt_nfkc` for opus-mt) rewrites
//!    the longest matching prefix at each position; text it does not cover is copied a character
//!    at a time, and bytes that are not UTF-8 become U+FFFD. Then leading, trailing and repeated
//!    spaces are dropped, a space is prepended (`add_dummy_prefix`) and spaces are spelled `▁`.
//! 2. **Viterbi.** Among all segmentations into pieces of the model, the one with the highest
//!    sum of piece scores wins; a character no piece starts with becomes the unknown piece,
//!    scored 10 below the lowest piece score, and a run of them is reported as one unknown piece.
//!    On equal sums the path found first (shorter piece earlier) is kept, as in sentencepiece's
//!    `EncodeOptimized`.
//!
//! Only what Unigram encoding needs is read. BPE, word and char models are refused, as are
//! `treat_whitespace_as_suffix` models, rather than segmented wrongly.

use std::collections::HashMap;

use prost::Message;

/// Errors reading a `.spm` model.
#[derive(Debug, thiserror::Error)]
pub enum SentencePieceError {
    #[error("not a SentencePiece model: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("the SentencePiece model has no pieces")]
    NoPieces,
    #[error("SentencePiece model type {0} is not supported (only Unigram, type 1)")]
    UnsupportedModelType(i32),
    #[error("SentencePiece option {0} is not supported")]
    UnsupportedOption(&'static str),
    #[error("the SentencePiece model has no unknown piece")]
    NoUnknownPiece,
    #[error("corrupt precompiled_charsmap: {0}")]
    BadCharsmap(String),
}

/// The parts of sentencepiece's `ModelProto` that encoding reads (field numbers as in
/// `sentencepiece_model.proto`; unknown fields are skipped).
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, repeated, tag = "1")]
        pub pieces: Vec<Piece>,
        #[prost(message, optional, tag = "2")]
        pub trainer_spec: Option<TrainerSpec>,
        #[prost(message, optional, tag = "3")]
        pub normalizer_spec: Option<NormalizerSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Piece {
        #[prost(string, optional, tag = "1")]
        pub piece: Option<String>,
        #[prost(float, optional, tag = "2")]
        pub score: Option<f32>,
        #[prost(int32, optional, tag = "3")]
        pub r#type: Option<i32>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TrainerSpec {
        #[prost(int32, optional, tag = "3")]
        pub model_type: Option<i32>,
        #[prost(bool, optional, tag = "24")]
        pub treat_whitespace_as_suffix: Option<bool>,
        #[prost(bool, optional, tag = "35")]
        pub byte_fallback: Option<bool>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NormalizerSpec {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(bytes = "vec", optional, tag = "2")]
        pub precompiled_charsmap: Option<Vec<u8>>,
        #[prost(bool, optional, tag = "3")]
        pub add_dummy_prefix: Option<bool>,
        #[prost(bool, optional, tag = "4")]
        pub remove_extra_whitespaces: Option<bool>,
        #[prost(bool, optional, tag = "5")]
        pub escape_whitespaces: Option<bool>,
    }
}

/// A piece's type, as `ModelProto.SentencePiece.Type` numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceKind {
    fn from_proto(t: Option<i32>) -> PieceKind {
        match t.unwrap_or(1) {
            2 => PieceKind::Unknown,
            3 => PieceKind::Control,
            4 => PieceKind::UserDefined,
            5 => PieceKind::Unused,
            6 => PieceKind::Byte,
            _ => PieceKind::Normal,
        }
    }
}

/// One entry of the model's vocabulary.
#[derive(Debug, Clone)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceKind,
}

/// Score below the lowest piece score given to an unknown character.
const UNKNOWN_PENALTY: f32 = 10.0;

/// A Unigram SentencePiece model.
#[derive(Debug, Clone)]
pub struct SentencePiece {
    pieces: Vec<Piece>,
    /// Pieces the lattice may use (normal, user-defined), by text.
    by_text: HashMap<String, u32>,
    /// Longest such piece, in bytes.
    max_piece_bytes: usize,
    unknown_id: u32,
    unknown_score: f32,
    max_score: f32,
    normalizer: Normalizer,
}

#[derive(Debug, Clone)]
struct Normalizer {
    charsmap: Option<Charsmap>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

impl SentencePiece {
    /// Parses a serialized `ModelProto` (the bytes of a `.spm` file).
    pub fn from_bytes(bytes: &[u8]) -> Result<SentencePiece, SentencePieceError> {
        let model = proto::ModelProto::decode(bytes)?;
        let trainer = model.trainer_spec.unwrap_or_default();
        let model_type = trainer.model_type.unwrap_or(1);
        if model_type != 1 {
            return Err(SentencePieceError::UnsupportedModelType(model_type));
        }
        if trainer.treat_whitespace_as_suffix.unwrap_or(false) {
            return Err(SentencePieceError::UnsupportedOption(
                "treat_whitespace_as_suffix",
            ));
        }
        if trainer.byte_fallback.unwrap_or(false) {
            return Err(SentencePieceError::UnsupportedOption("byte_fallback"));
        }
        if model.pieces.is_empty() {
            return Err(SentencePieceError::NoPieces);
        }
        let pieces: Vec<Piece> = model
            .pieces
            .into_iter()
            .map(|p| Piece {
                text: p.piece.unwrap_or_default(),
                score: p.score.unwrap_or(0.0),
                kind: PieceKind::from_proto(p.r#type),
            })
            .collect();
        let unknown_id = pieces
            .iter()
            .position(|p| p.kind == PieceKind::Unknown)
            .ok_or(SentencePieceError::NoUnknownPiece)? as u32;
        let mut by_text = HashMap::with_capacity(pieces.len());
        let mut max_piece_bytes = 1;
        let (mut min_score, mut max_score) = (f32::INFINITY, f32::NEG_INFINITY);
        for (id, piece) in pieces.iter().enumerate() {
            if matches!(piece.kind, PieceKind::Normal | PieceKind::UserDefined) {
                if piece.text.is_empty() {
                    continue;
                }
                by_text.entry(piece.text.clone()).or_insert(id as u32);
                max_piece_bytes = max_piece_bytes.max(piece.text.len());
            }
            if piece.kind == PieceKind::Normal {
                min_score = min_score.min(piece.score);
                max_score = max_score.max(piece.score);
            }
        }
        if !min_score.is_finite() {
            (min_score, max_score) = (0.0, 0.0);
        }
        let spec = model.normalizer_spec.unwrap_or_default();
        let charsmap = match spec.precompiled_charsmap {
            Some(bytes) if !bytes.is_empty() => Some(Charsmap::new(bytes)?),
            _ => None,
        };
        if charsmap.is_none() && !matches!(spec.name.as_deref(), None | Some("" | "identity")) {
            // A named rule set without its compiled table (a `normalization_rule_tsv` model)
            // cannot be applied faithfully.
            return Err(SentencePieceError::UnsupportedOption(
                "a normalization rule without precompiled_charsmap",
            ));
        }
        Ok(SentencePiece {
            pieces,
            by_text,
            max_piece_bytes,
            unknown_id,
            unknown_score: min_score - UNKNOWN_PENALTY,
            max_score,
            normalizer: Normalizer {
                charsmap,
                add_dummy_prefix: spec.add_dummy_prefix.unwrap_or(true),
                remove_extra_whitespaces: spec.remove_extra_whitespaces.unwrap_or(true),
                escape_whitespaces: spec.escape_whitespaces.unwrap_or(true),
            },
        })
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    pub fn unknown_id(&self) -> u32 {
        self.unknown_id
    }

    /// The text as the model sees it (see the module docs).
    pub fn normalize(&self, text: &str) -> String {
        self.normalizer.normalize(text.as_bytes())
    }

    /// Text to piece ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let normalized = self.normalize(text);
        self.segment(&normalized)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Text to pieces as sentencepiece's `encode(out_type=str)` gives them: each piece's text,
    /// except that an unknown piece is the (normalized) text it covers. Marian maps these strings
    /// to its own vocabulary, so an unknown character the shared vocabulary does know keeps
    /// its id.
    pub fn encode_pieces(&self, text: &str) -> Vec<(u32, String)> {
        let normalized = self.normalize(text);
        self.segment(&normalized)
            .into_iter()
            .map(|(id, span)| {
                let surface = if id == self.unknown_id {
                    normalized[span].to_owned()
                } else {
                    self.pieces[id as usize].text.clone()
                };
                (id, surface)
            })
            .collect()
    }

    /// Viterbi segmentation of normalized text: each piece's id and the bytes it covers.
    fn segment(&self, text: &str) -> Vec<(u32, std::ops::Range<usize>)> {
        if text.is_empty() {
            return Vec::new();
        }
        let bytes = text.len();
        // best[end] = (score of the best path ending at byte `end`, its last piece, its start).
        let mut best: Vec<Option<(f32, u32, usize)>> = vec![None; bytes + 1];
        best[0] = Some((0.0, 0, 0));
        for (start, c) in text.char_indices() {
            let Some((score_here, _, _)) = best[start] else {
                continue;
            };
            let char_end = start + c.len_utf8();
            let mut single_char_piece = false;
            let limit = (start + self.max_piece_bytes).min(bytes);
            // Prefixes in increasing length: on equal scores the first stays.
            let mut end = char_end;
            while end <= limit {
                if text.is_char_boundary(end) {
                    if let Some(&id) = self.by_text.get(&text[start..end]) {
                        let piece = &self.pieces[id as usize];
                        let score = if piece.kind == PieceKind::UserDefined {
                            (end - start) as f32 * self.max_score - 0.1
                        } else {
                            piece.score
                        };
                        relax(&mut best[end], score_here + score, id, start);
                        single_char_piece |= end == char_end;
                    }
                }
                end += 1;
            }
            if !single_char_piece {
                relax(
                    &mut best[char_end],
                    score_here + self.unknown_score,
                    self.unknown_id,
                    start,
                );
            }
        }
        let mut pieces: Vec<(u32, std::ops::Range<usize>)> = Vec::new();
        let mut end = bytes;
        while end > 0 {
            let Some((_, id, start)) = best[end] else {
                // Unreachable: every character has at least the unknown piece.
                break;
            };
            // A run of unknown characters is one unknown piece, as sentencepiece reports it.
            match pieces.last_mut() {
                Some((last, span)) if id == self.unknown_id && *last == self.unknown_id => {
                    span.start = start;
                }
                _ => pieces.push((id, start..end)),
            }
            end = start;
        }
        pieces.reverse();
        pieces
    }
}

fn relax(slot: &mut Option<(f32, u32, usize)>, score: f32, id: u32, start: usize) {
    if slot.is_none_or(|(best, _, _)| score > best) {
        *slot = Some((score, id, start));
    }
}

impl Normalizer {
    fn normalize(&self, mut input: &[u8]) -> String {
        let space: &str = if self.escape_whitespaces { "▁" } else { " " };
        let mut out = String::with_capacity(input.len() + 3);
        if self.remove_extra_whitespaces {
            while !input.is_empty() {
                let (piece, consumed) = self.normalize_prefix(input);
                if piece != " " {
                    break;
                }
                input = &input[consumed..];
            }
        }
        if input.is_empty() {
            return out;
        }
        if self.add_dummy_prefix {
            out.push_str(space);
        }
        let mut previous_was_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let (piece, consumed) = self.normalize_prefix(input);
            input = &input[consumed..];
            let mut piece = piece;
            if previous_was_space && self.remove_extra_whitespaces {
                piece = piece.trim_start_matches(' ');
            }
            if !piece.is_empty() {
                for c in piece.chars() {
                    if c == ' ' && self.escape_whitespaces {
                        out.push('▁');
                    } else {
                        out.push(c);
                    }
                }
                previous_was_space = piece.ends_with(' ');
            }
            if !self.remove_extra_whitespaces {
                previous_was_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }

    /// The replacement for the longest normalizable prefix of `input`, and its length in bytes:
    /// a string of the table, the prefix's first character itself, or U+FFFD for a byte that
    /// does not start valid UTF-8. Borrowed, so normalizing allocates nothing per character.
    fn normalize_prefix<'a>(&'a self, input: &'a [u8]) -> (&'a str, usize) {
        if let Some(map) = &self.charsmap {
            if let Some(found) = map.longest_match(input) {
                return found;
            }
        }
        first_char(input).unwrap_or(("\u{FFFD}", 1))
    }
}

/// The first character of `bytes` (as text, and its length), if they start with valid UTF-8.
fn first_char(bytes: &[u8]) -> Option<(&str, usize)> {
    let len = match bytes.first()? {
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return None,
    };
    let text = std::str::from_utf8(bytes.get(..len)?).ok()?;
    Some((text, len))
}

/// sentencepiece's precompiled normalization table: a u32 (little-endian) byte length of a
/// darts-clone double array, the array's u32 units, then NUL-terminated replacement strings
/// that leaf values point into.
#[derive(Debug, Clone)]
struct Charsmap {
    units: Vec<u32>,
    replacements: Vec<u8>,
}

impl Charsmap {
    fn new(bytes: Vec<u8>) -> Result<Charsmap, SentencePieceError> {
        let bad = |why: &str| SentencePieceError::BadCharsmap(why.to_owned());
        let header: [u8; 4] = bytes
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| bad("shorter than its header"))?;
        let trie_bytes = u32::from_le_bytes(header) as usize;
        if !trie_bytes.is_multiple_of(4) || trie_bytes == 0 || bytes.len() - 4 < trie_bytes {
            return Err(bad("the trie size does not fit the table"));
        }
        let units = bytes[4..4 + trie_bytes]
            .chunks_exact(4)
            .map(|u| u32::from_le_bytes([u[0], u[1], u[2], u[3]]))
            .collect();
        Ok(Charsmap {
            units,
            replacements: bytes[4 + trie_bytes..].to_vec(),
        })
    }

    /// The longest key of the trie that prefixes `input`: its replacement and length.
    fn longest_match(&self, input: &[u8]) -> Option<(&str, usize)> {
        // darts-clone unit fields.
        fn has_leaf(unit: u32) -> bool {
            (unit >> 8) & 1 == 1
        }
        fn value(unit: u32) -> u32 {
            unit & ((1 << 31) - 1)
        }
        fn label(unit: u32) -> u32 {
            unit & ((1 << 31) | 0xFF)
        }
        fn offset(unit: u32) -> usize {
            ((unit >> 10) << ((unit & (1 << 9)) >> 6)) as usize
        }
        let mut best = None;
        let mut node = offset(*self.units.first()?);
        for (i, &byte) in input.iter().enumerate() {
            node ^= byte as usize;
            let unit = *self.units.get(node)?;
            if label(unit) != byte as u32 {
                break;
            }
            node ^= offset(unit);
            if has_leaf(unit) {
                let leaf = *self.units.get(node)?;
                best = Some((value(leaf) as usize, i + 1));
            }
        }
        let (at, consumed) = best?;
        let tail = self.replacements.get(at..)?;
        let end = tail.iter().position(|&b| b == 0)?;
        // A replacement that is not UTF-8 is a corrupt table; treat it as no match.
        let replacement = std::str::from_utf8(&tail[..end]).ok()?;
        Some((replacement, consumed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(pieces: &[(&str, f32, i32)]) -> Vec<u8> {
        proto::ModelProto {
            pieces: pieces
                .iter()
                .map(|&(p, s, t)| proto::Piece {
                    piece: Some(p.into()),
                    score: Some(s),
                    r#type: Some(t),
                })
                .collect(),
            trainer_spec: Some(proto::TrainerSpec {
                model_type: Some(1),
                ..Default::default()
            }),
            normalizer_spec: Some(proto::NormalizerSpec {
                name: Some("identity".into()),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn viterbi_prefers_the_highest_scoring_segmentation() {
        let spm = SentencePiece::from_bytes(&model(&[
            ("<unk>", 0.0, 2),
            ("▁", -1.0, 1),
            ("▁ab", -2.0, 1),
            ("a", -1.0, 1),
            ("b", -1.0, 1),
            ("c", -5.0, 1),
            ("bc", -1.5, 1),
        ]))
        .unwrap();
        // "▁ab" + "c" = -7; "▁" + "a" + "bc" = -3.5.
        assert_eq!(spm.encode("abc"), vec![1, 3, 6]);
        assert_eq!(spm.normalize("  a   b "), "▁a▁b");
        // An unknown character is one unknown piece; so is a run of them.
        assert_eq!(spm.encode("aé"), vec![1, 3, 0]);
        assert_eq!(spm.encode("aéèb"), vec![1, 3, 0, 4]);
        assert_eq!(spm.encode("   "), Vec::<u32>::new());
    }

    #[test]
    fn refuses_what_it_cannot_segment_faithfully() {
        assert!(matches!(
            SentencePiece::from_bytes(b"\xff\xff\xff"),
            Err(SentencePieceError::Decode(_))
        ));
        assert!(matches!(
            SentencePiece::from_bytes(&model(&[("a", 0.0, 1)])),
            Err(SentencePieceError::NoUnknownPiece)
        ));
        let mut bpe = proto::ModelProto::decode(&model(&[("<unk>", 0.0, 2)])[..]).unwrap();
        bpe.trainer_spec = Some(proto::TrainerSpec {
            model_type: Some(2),
            ..Default::default()
        });
        assert!(matches!(
            SentencePiece::from_bytes(&bpe.encode_to_vec()),
            Err(SentencePieceError::UnsupportedModelType(2))
        ));
        let mut bad_map = proto::ModelProto::decode(&model(&[("<unk>", 0.0, 2)])[..]).unwrap();
        bad_map.normalizer_spec = Some(proto::NormalizerSpec {
            precompiled_charsmap: Some(vec![0xff, 0xff, 0, 0, 1]),
            ..Default::default()
        });
        assert!(matches!(
            SentencePiece::from_bytes(&bad_map.encode_to_vec()),
            Err(SentencePieceError::BadCharsmap(_))
        ));
    }

    #[test]
    fn invalid_utf8_becomes_the_replacement_character() {
        let spm = SentencePiece::from_bytes(&model(&[("<unk>", 0.0, 2)])).unwrap();
        assert_eq!(
            spm.normalizer.normalize(b"a\xffb"),
            "▁a\u{FFFD}b".to_owned()
        );
    }
}

//! Ids back to text: each token's bytes (llama.cpp's `token_to_piece`), and a streaming decoder
//! that only ever emits whole UTF-8 characters.

use super::unicode::char_to_byte;
use super::vocab::{Algorithm, TokenAttrs, Vocab};
use super::Tokenizer;

/// The bytes every token renders to when special tokens are rendered, stored back to back.
#[derive(Debug)]
pub(crate) struct Pieces {
    bytes: Vec<u8>,
    /// `offsets[id]..offsets[id + 1]` is token `id`'s piece.
    offsets: Vec<usize>,
}

impl Pieces {
    pub(crate) fn new(vocab: &Vocab) -> Pieces {
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(vocab.len() + 1);
        offsets.push(0);
        for id in 0..vocab.len() {
            append_piece(vocab, id, &mut bytes);
            offsets.push(bytes.len());
        }
        Pieces { bytes, offsets }
    }

    /// Token `id`'s bytes with special tokens rendered; empty for ids outside the vocab.
    pub(crate) fn get(&self, id: u32) -> &[u8] {
        let id = id as usize;
        match (self.offsets.get(id), self.offsets.get(id + 1)) {
            (Some(&start), Some(&end)) => &self.bytes[start..end],
            _ => &[],
        }
    }
}

/// llama.cpp's `token_to_piece(id, special = true)`.
fn append_piece(vocab: &Vocab, id: usize, out: &mut Vec<u8>) {
    let text = &vocab.texts[id];
    let attrs = vocab.attrs[id];
    if attrs.intersects(TokenAttrs::CONTROL | TokenAttrs::UNKNOWN | TokenAttrs::USER_DEFINED) {
        out.extend_from_slice(text.as_bytes());
    } else if attrs.intersects(TokenAttrs::NORMAL) {
        match vocab.algorithm {
            Algorithm::SentencePiece | Algorithm::Unigram | Algorithm::WordPiece => {
                out.extend_from_slice(text.replace('▁', " ").as_bytes())
            }
            Algorithm::BytePairGpt2 => append_byte_level(text, out),
        }
    } else if attrs.intersects(TokenAttrs::BYTE) {
        out.push(byte_token_value(text));
    }
    // Undefined and unused tokens render as nothing.
}

/// A byte-level BPE token's bytes: each character stands for one byte. A character outside the
/// byte alphabet is rendered as llama.cpp renders it, `[UNK_BYTE_0x<hex>` + token + `]`.
fn append_byte_level(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                for b in c.encode_utf8(&mut [0; 4]).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
}

/// The value of a byte token, `<0xXX>`: the hex digits at offsets 3 and 4, read like C's
/// `strtol` (leading hex digits only, 0 if none) so malformed tokens behave as in llama.cpp.
fn byte_token_value(text: &str) -> u8 {
    let digits = text.as_bytes().get(3..).unwrap_or_default();
    let mut value = 0u8;
    for &d in digits.iter().take(2) {
        match char::from(d).to_digit(16) {
            Some(v) => value = value * 16 + v as u8,
            None => break,
        }
    }
    value
}

/// Turns a stream of token ids into text as they arrive, never splitting a UTF-8 character.
///
/// A character whose bytes span several tokens (byte-fallback tokens for an emoji, or
/// byte-level BPE pieces that end mid-character) is held back until complete. Bytes that can
/// never form a character come out as U+FFFD. Everything emitted, concatenated with
/// [`StreamDecoder::finish`]'s result, equals [`Tokenizer::decode`] of the same ids (or its
/// special-rendering variant).
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    render_special: bool,
    pending: Vec<u8>,
}

impl<'t> StreamDecoder<'t> {
    pub(crate) fn new(tokenizer: &'t Tokenizer, render_special: bool) -> StreamDecoder<'t> {
        StreamDecoder {
            tokenizer,
            render_special,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text that is now complete (often empty while a character
    /// is still partial).
    pub fn push(&mut self, id: u32) -> String {
        self.pending
            .extend_from_slice(self.tokenizer.token_bytes(id, self.render_special));
        let mut out = String::new();
        let mut consumed = 0;
        loop {
            match std::str::from_utf8(&self.pending[consumed..]) {
                Ok(valid) => {
                    out.push_str(valid);
                    consumed = self.pending.len();
                    break;
                }
                Err(error) => {
                    let valid_end = consumed + error.valid_up_to();
                    // Lossless: everything before `valid_up_to` is valid UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[consumed..valid_end]));
                    match error.error_len() {
                        // Invalid bytes: they can never become a character.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            consumed = valid_end + bad;
                        }
                        // A character cut short at the end: wait for the next token.
                        None => {
                            consumed = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        out
    }

    /// Ends the stream: whatever is still held back (an incomplete character) comes out as
    /// U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_token_values_parse_like_strtol() {
        assert_eq!(byte_token_value("<0x41>"), 0x41);
        assert_eq!(byte_token_value("<0xff>"), 0xFF);
        assert_eq!(byte_token_value("<0xZ1>"), 0);
        assert_eq!(byte_token_value("<0x4>"), 4);
        assert_eq!(byte_token_value("ab"), 0);
    }

    #[test]
    fn byte_level_text_maps_back_to_bytes() {
        let mut out = Vec::new();
        append_byte_level("ĠhiĊ", &mut out);
        assert_eq!(out, b" hi\n");
        let mut odd = Vec::new();
        append_byte_level("a中", &mut odd);
        assert_eq!(odd, "a[UNK_BYTE_0xe4b8ada中]".as_bytes());
    }
}

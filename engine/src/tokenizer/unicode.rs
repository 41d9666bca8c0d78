//! Character classes for pre-tokenization, and GPT-2's byte-level alphabet.

use super::unicode_tables::CLASS_RUNS;

/// The Unicode general-category class of a code point, as far as the pre-tokenizers care.
///
/// Separators, controls, format characters, private use and unassigned code points are all
/// [`CharClass::Other`]: no pre-tokenizer distinguishes them. Whitespace is a separate property
/// (see [`is_whitespace`]), because it cuts across categories (tab is a control, space a separator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CharClass {
    /// `\p{L}`
    Letter,
    /// `\p{N}`
    Number,
    /// `\p{P}`
    Punctuation,
    /// `\p{S}`
    Symbol,
    /// `\p{M}`
    Mark,
    /// Everything else: `\p{Z}`, `\p{C}` and unassigned.
    Other,
}

/// The class of `c`, from tables generated for Unicode 15.1 (the version llama.cpp uses).
pub(crate) fn class_of(c: char) -> CharClass {
    let cp = c as u32;
    if let Some(&class) = ASCII_CLASSES.get(cp as usize) {
        return class;
    }
    // The first run starts at 0, so the index is never below zero.
    let run = CLASS_RUNS.partition_point(|&(start, _)| start <= cp) - 1;
    CLASS_RUNS[run].1
}

/// ASCII's classes, looked up directly: most text is mostly ASCII.
static ASCII_CLASSES: [CharClass; 128] = ascii_classes();

const fn ascii_classes() -> [CharClass; 128] {
    let mut table = [CharClass::Other; 128];
    let mut b = 0u8;
    while b < 128 {
        table[b as usize] = match b {
            b'A'..=b'Z' | b'a'..=b'z' => CharClass::Letter,
            b'0'..=b'9' => CharClass::Number,
            b'$' | b'+' | b'<' | b'=' | b'>' | b'^' | b'`' | b'|' | b'~' => CharClass::Symbol,
            b'!'..=b'/' | b':'..=b'@' | b'['..=b'_' | b'{'..=b'}' => CharClass::Punctuation,
            _ => CharClass::Other,
        };
        b += 1;
    }
    table
}

/// Unicode `White_Space`, what llama.cpp (and `\s` in the tokenizers' regexes) means by whitespace.
/// Rust's `char::is_whitespace` is defined as exactly that property.
pub(crate) fn is_whitespace(c: char) -> bool {
    c.is_whitespace()
}

/// Bytes that GPT-2's byte-level alphabet maps to the character of the same value: the printable
/// Latin-1 characters except the soft hyphen. Every other byte maps to U+0100 and up, in order.
const fn is_printable_byte(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// GPT-2's byte-level alphabet: the visible character that stands for each byte in the vocab.
pub(crate) const BYTE_TO_CHAR: [char; 256] = byte_to_char_table();

const fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_shifted = 0x100u32;
    let mut b = 0usize;
    while b < 256 {
        let cp = if is_printable_byte(b as u8) {
            b as u32
        } else {
            let cp = next_shifted;
            next_shifted += 1;
            cp
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0', // unreachable: every value is below U+0144
        };
        b += 1;
    }
    table
}

/// The non-printable bytes in order: U+0100 + n stands for `SHIFTED_BYTES[n]`.
const SHIFTED_BYTES: [u8; 68] = shifted_bytes_table();

const fn shifted_bytes_table() -> [u8; 68] {
    let mut table = [0u8; 68];
    let mut n = 0usize;
    let mut b = 0usize;
    while b < 256 {
        if !is_printable_byte(b as u8) {
            table[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    table
}

/// The byte a character of GPT-2's byte-level alphabet stands for, or `None` if the character
/// is not in the alphabet.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 0x100 {
        let b = cp as u8;
        return is_printable_byte(b).then_some(b);
    }
    SHIFTED_BYTES.get((cp - 0x100) as usize).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_of_sample_characters() {
        assert_eq!(class_of('a'), CharClass::Letter);
        assert_eq!(class_of('Z'), CharClass::Letter);
        assert_eq!(class_of('7'), CharClass::Number);
        assert_eq!(class_of('½'), CharClass::Number);
        assert_eq!(class_of('Ⅻ'), CharClass::Number);
        assert_eq!(class_of('!'), CharClass::Punctuation);
        assert_eq!(class_of('«'), CharClass::Punctuation);
        assert_eq!(class_of('$'), CharClass::Symbol);
        assert_eq!(class_of('`'), CharClass::Symbol);
        assert_eq!(class_of('😀'), CharClass::Symbol);
        assert_eq!(class_of('\u{0301}'), CharClass::Mark);
        assert_eq!(class_of('ि'), CharClass::Mark);
        assert_eq!(class_of(' '), CharClass::Other);
        assert_eq!(class_of('\n'), CharClass::Other);
        assert_eq!(class_of('\u{0378}'), CharClass::Other); // unassigned
        assert_eq!(class_of('中'), CharClass::Letter);
        assert_eq!(class_of('\u{10FFFF}'), CharClass::Other);
        // Assigned in Unicode 15.1 (CJK Extension I): a letter for llama.cpp too.
        assert_eq!(class_of('\u{2EBF0}'), CharClass::Letter);
    }

    #[test]
    fn ascii_shortcut_agrees_with_the_generated_table() {
        for b in 0..128u32 {
            let run = CLASS_RUNS.partition_point(|&(start, _)| start <= b) - 1;
            assert_eq!(ASCII_CLASSES[b as usize], CLASS_RUNS[run].1, "{b:#x}");
        }
    }

    #[test]
    fn whitespace_is_the_white_space_property() {
        let expected: Vec<u32> = [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680]
            .into_iter()
            .chain(0x2000..=0x200A)
            .chain([0x2028, 0x2029, 0x202F, 0x205F, 0x3000])
            .collect();
        let found: Vec<u32> = (0..=0x10FFFFu32)
            .filter_map(char::from_u32)
            .filter(|&c| is_whitespace(c))
            .map(|c| c as u32)
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn byte_alphabet_round_trips_and_is_distinct() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = BYTE_TO_CHAR[b as usize];
            assert!(seen.insert(c), "byte {b:#x} maps to a repeated char");
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_TO_CHAR[b'a' as usize], 'a');
        assert_eq!(char_to_byte('中'), None);
        assert_eq!(char_to_byte('\u{AD}'), None);
    }
}

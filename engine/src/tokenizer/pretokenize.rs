//! BPE pre-tokenizers: split text into words before merges, as llama.cpp does for each
//! `tokenizer.ggml.pre`.
//!
//! llama.cpp applies a list of regexes in turn, each one refining the pieces the previous ones
//! left. Its common regexes (GPT-2's, LLaMA 3's, Qwen 2's) run as hand-written scanners; the rest
//! run through `std::regex` over text whose non-ASCII characters are collapsed to one byte per
//! Unicode category. Here every stage is a scanner over code points with the same semantics, and
//! character classes come from the same Unicode version (15.1) llama.cpp uses, so the words are
//! the same.

use std::fmt;

use super::unicode::{class_of, is_whitespace, CharClass};

/// A pre-tokenizer family: one sequence of splitting stages. Several `tokenizer.ggml.pre` names
/// share a family (see [`PreTokenizerConfig::for_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// llama.cpp's fallback (`default`, or no `tokenizer.ggml.pre`): punctuation runs, then
    /// GPT-2's regex, then digit runs, then ASCII digit triples.
    Default,
    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// LLaMA 3: case-insensitive contractions, a letter run with one optional leading
    /// non-letter, digits in threes, punctuation runs that swallow trailing newlines, and
    /// whitespace that ends at its last newline.
    Llama3,
    /// Qwen 2: as LLaMA 3, but every digit is its own word.
    Qwen2,
    /// StarCoder / SmolLM: every digit is its own word, then GPT-2's regex on the rest.
    StarCoder,
}

impl fmt::Display for PreTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PreTokenizer::Default => "default",
            PreTokenizer::Gpt2 => "gpt2",
            PreTokenizer::Llama3 => "llama3",
            PreTokenizer::Qwen2 => "qwen2",
            PreTokenizer::StarCoder => "starcoder",
        })
    }
}

/// What a `tokenizer.ggml.pre` name means to llama.cpp: the splitting family plus the loading
/// flags that come with the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreTokenizerConfig {
    /// How text is split into words.
    pub family: PreTokenizer,
    /// A word that is itself a vocab token is emitted whole, without merges (LLaMA 3).
    pub ignores_merges: bool,
    /// BOS is added by default (before `tokenizer.ggml.add_bos_token` is consulted).
    pub adds_bos: bool,
    /// The vocab has no BOS token, whatever the default says (ChatGLM).
    pub has_no_bos: bool,
}

impl PreTokenizerConfig {
    /// The configuration llama.cpp uses for the pre-tokenizer `name`, or `None` for names egpu
    /// does not support (llama.cpp refuses unknown names too).
    pub fn for_name(name: &str) -> Option<PreTokenizerConfig> {
        let plain = |family| PreTokenizerConfig {
            family,
            ignores_merges: false,
            adds_bos: false,
            has_no_bos: false,
        };
        Some(match name {
            "default" => plain(PreTokenizer::Default),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" => PreTokenizerConfig {
                ignores_merges: true,
                adds_bos: true,
                ..plain(PreTokenizer::Llama3)
            },
            "dbrx" | "smaug-bpe" => plain(PreTokenizer::Llama3),
            "chatglm-bpe" => PreTokenizerConfig {
                has_no_bos: true,
                ..plain(PreTokenizer::Llama3)
            },
            "glm4" | "glm5" => PreTokenizerConfig {
                has_no_bos: true,
                ignores_merges: true,
                ..plain(PreTokenizer::Llama3)
            },
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "mpt" | "olmo" => {
                plain(PreTokenizer::Gpt2)
            }
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone"
            | "minerva-7b" => plain(PreTokenizer::StarCoder),
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "megrez" => {
                plain(PreTokenizer::Qwen2)
            }
            _ => return None,
        })
    }
}

impl PreTokenizer {
    /// Splits `text` into words, appending them to `words` in order. The words concatenate
    /// back to `text`, and none is empty.
    pub(crate) fn split<'t>(self, text: &'t str, words: &mut Vec<&'t str>) {
        if text.is_empty() {
            return;
        }
        let chars: Vec<char> = text.chars().collect();
        let mut ends = vec![chars.len()];
        let stages: &[Stage] = match self {
            PreTokenizer::Default => &[
                Stage::Isolate(punctuation_run),
                Stage::Scan(gpt2_word),
                Stage::Isolate(number_run),
                Stage::Isolate(ascii_digit_triple),
            ],
            PreTokenizer::Gpt2 => &[Stage::Scan(gpt2_word)],
            PreTokenizer::Llama3 => &[Stage::Scan(llama3_word)],
            PreTokenizer::Qwen2 => &[Stage::Scan(qwen2_word)],
            PreTokenizer::StarCoder => &[Stage::Isolate(single_number), Stage::Scan(gpt2_word)],
        };
        for stage in stages {
            ends = stage.refine(&chars, &ends);
        }

        // Character positions back to byte offsets.
        let mut byte = 0;
        let mut char_pos = 0;
        for end in ends {
            let start = byte;
            while char_pos < end {
                byte += chars[char_pos].len_utf8();
                char_pos += 1;
            }
            words.push(&text[start..byte]);
        }
    }
}

/// The length of the match or word that starts at `pos` in `piece` (0: no match there).
type MatchAt = fn(piece: &[char], pos: usize) -> usize;

/// One regex of a pre-tokenizer's list.
enum Stage {
    /// A regex whose alternatives cover every character: the piece becomes consecutive words.
    Scan(MatchAt),
    /// A regex that matches only some characters: its matches become words, and so does the
    /// text between them.
    Isolate(MatchAt),
}

impl Stage {
    /// Splits every piece (given by its end position) further.
    fn refine(&self, chars: &[char], ends: &[usize]) -> Vec<usize> {
        let mut out = Vec::with_capacity(ends.len() * 2);
        let mut start = 0;
        for &end in ends {
            let piece = &chars[start..end];
            match *self {
                Stage::Scan(word_len) => {
                    let mut pos = 0;
                    while pos < piece.len() {
                        // Every scanner consumes at least one character; the max is a backstop
                        // against an infinite loop.
                        pos = (pos + word_len(piece, pos).max(1)).min(piece.len());
                        out.push(start + pos);
                    }
                }
                Stage::Isolate(match_len) => {
                    let mut gap_start = 0;
                    let mut pos = 0;
                    while pos < piece.len() {
                        let len = match_len(piece, pos);
                        if len == 0 {
                            pos += 1;
                            continue;
                        }
                        if pos > gap_start {
                            out.push(start + pos);
                        }
                        pos = (pos + len).min(piece.len());
                        out.push(start + pos);
                        gap_start = pos;
                    }
                    if gap_start < piece.len() {
                        out.push(end);
                    }
                }
            }
            start = end;
        }
        out
    }
}

fn is_letter(c: char) -> bool {
    class_of(c) == CharClass::Letter
}

fn is_number(c: char) -> bool {
    class_of(c) == CharClass::Number
}

/// `[^\s\p{L}\p{N}]`
fn is_other(c: char) -> bool {
    !is_whitespace(c) && !matches!(class_of(c), CharClass::Letter | CharClass::Number)
}

fn is_newline(c: char) -> bool {
    c == '\r' || c == '\n'
}

/// The end of the run of characters matching `pred` that starts at `pos` (`pos` if none).
fn run_end(piece: &[char], pos: usize, pred: impl Fn(char) -> bool) -> usize {
    let mut end = pos;
    while end < piece.len() && pred(piece[end]) {
        end += 1;
    }
    end
}

/// `'s|'t|'re|'ve|'m|'ll|'d`, optionally case-insensitive: the match length, or 0.
fn contraction_len(piece: &[char], pos: usize, any_case: bool) -> usize {
    if piece[pos] != '\'' || pos + 1 >= piece.len() {
        return 0;
    }
    // Only ASCII letters matter: no other character lowercases to one of these.
    let fold = |c: char| if any_case { c.to_ascii_lowercase() } else { c };
    let first = fold(piece[pos + 1]);
    if matches!(first, 's' | 't' | 'm' | 'd') {
        return 2;
    }
    if pos + 2 < piece.len() {
        let second = fold(piece[pos + 2]);
        if matches!((first, second), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
            return 3;
        }
    }
    0
}

/// `\s+(?!\S)|\s+` at `pos`: a whitespace run, less its last character when a non-space follows
/// (that character then leads the next word). 0 if `pos` is not whitespace.
fn whitespace_len(piece: &[char], pos: usize) -> usize {
    let end = run_end(piece, pos, is_whitespace);
    let len = end - pos;
    if len > 1 && end < piece.len() {
        len - 1
    } else {
        len
    }
}

/// GPT-2's regex: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn gpt2_word(piece: &[char], pos: usize) -> usize {
    let contraction = contraction_len(piece, pos, false);
    if contraction > 0 {
        return contraction;
    }
    let body = if piece[pos] == ' ' { pos + 1 } else { pos };
    if let Some(&c) = piece.get(body) {
        let end = match class_of(c) {
            CharClass::Letter => run_end(piece, body, is_letter),
            CharClass::Number => run_end(piece, body, is_number),
            _ if !is_whitespace(c) => run_end(piece, body, is_other),
            _ => body,
        };
        if end > body {
            return end - pos;
        }
    }
    whitespace_len(piece, pos).max(1)
}

/// LLaMA 3's regex (`digits` = 3) and Qwen 2's (`digits` = 1):
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
fn llama3_family_word(piece: &[char], pos: usize, digits: usize) -> usize {
    let contraction = contraction_len(piece, pos, true);
    if contraction > 0 {
        return contraction;
    }
    let c = piece[pos];
    let class = class_of(c);
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if !is_newline(c)
        && class != CharClass::Number
        && (class == CharClass::Letter || piece.get(pos + 1).is_some_and(|&n| is_letter(n)))
    {
        return run_end(piece, pos + 1, is_letter) - pos;
    }
    // \p{N}{1,digits}
    if class == CharClass::Number {
        return (run_end(piece, pos, is_number) - pos).min(digits);
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'. A lone space at the end of the piece also lands here (as in
    // llama.cpp); it becomes a one-character word, which is what `\s+` would give it anyway.
    let body = if c == ' ' { pos + 1 } else { pos };
    if piece.get(body).is_none_or(|&b| is_other(b)) {
        let end = run_end(piece, body, is_other);
        return run_end(piece, end, is_newline) - pos;
    }
    // \s*[\r\n]+ : whitespace up to and including its last newline.
    let ws_end = run_end(piece, pos, is_whitespace);
    if let Some(last_newline) = (pos..ws_end).rev().find(|&i| is_newline(piece[i])) {
        return last_newline + 1 - pos;
    }
    whitespace_len(piece, pos).max(1)
}

fn llama3_word(piece: &[char], pos: usize) -> usize {
    llama3_family_word(piece, pos, 3)
}

fn qwen2_word(piece: &[char], pos: usize) -> usize {
    llama3_family_word(piece, pos, 1)
}

/// `\p{N}`
fn single_number(piece: &[char], pos: usize) -> usize {
    usize::from(is_number(piece[pos]))
}

/// `\p{N}+`
fn number_run(piece: &[char], pos: usize) -> usize {
    run_end(piece, pos, is_number) - pos
}

/// `[\p{P}\$\+<=>\^~\|]+`
fn punctuation_run(piece: &[char], pos: usize) -> usize {
    let is_punctuation = |c: char| class_of(c) == CharClass::Punctuation || "$+<=>^~|".contains(c);
    run_end(piece, pos, is_punctuation) - pos
}

/// `[0-9][0-9][0-9]`
fn ascii_digit_triple(piece: &[char], pos: usize) -> usize {
    if pos + 3 <= piece.len() && piece[pos..pos + 3].iter().all(char::is_ascii_digit) {
        3
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: PreTokenizer, text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        pre.split(text, &mut out);
        assert_eq!(
            out.concat(),
            text,
            "words must concatenate back to the text"
        );
        assert!(out.iter().all(|w| !w.is_empty()));
        out
    }

    #[test]
    fn gpt2_splits_words_numbers_and_spaces() {
        assert_eq!(
            words(PreTokenizer::Gpt2, "Hello world's 123 !!  x\n\n"),
            ["Hello", " world", "'s", " 123", " !!", " ", " x", "\n\n"]
        );
        assert_eq!(words(PreTokenizer::Gpt2, "I'M"), ["I", "'", "M"]);
        assert_eq!(words(PreTokenizer::Gpt2, " "), [" "]);
        assert_eq!(words(PreTokenizer::Gpt2, ""), Vec::<&str>::new());
    }

    #[test]
    fn llama3_groups_digits_in_threes_and_keeps_newlines_with_punctuation() {
        assert_eq!(
            words(PreTokenizer::Llama3, "I'M 1234567 ok.\n\n  hi"),
            ["I", "'M", " ", "123", "456", "7", " ok", ".\n\n", " ", " hi"]
        );
        assert_eq!(words(PreTokenizer::Llama3, "a \n b"), ["a", " \n", " b"]);
        assert_eq!(words(PreTokenizer::Llama3, "x "), ["x", " "]);
    }

    #[test]
    fn qwen2_isolates_every_digit() {
        assert_eq!(
            words(PreTokenizer::Qwen2, "a 123"),
            ["a", " ", "1", "2", "3"]
        );
    }

    #[test]
    fn starcoder_isolates_digits_before_gpt2() {
        assert_eq!(
            words(PreTokenizer::StarCoder, "x 12ab"),
            ["x", " ", "1", "2", "ab"]
        );
    }

    #[test]
    fn default_splits_punctuation_numbers_and_triples() {
        assert_eq!(
            words(PreTokenizer::Default, "a+=b 1234567"),
            ["a", "+=", "b", " ", "123", "456", "7"]
        );
    }

    /// Splits `text` the way llama.cpp's regex list does, with a real regex engine: each regex in
    /// turn cuts every piece into its matches and the text between them.
    fn regex_words(regexes: &[fancy_regex::Regex], text: &str) -> Vec<String> {
        let mut pieces = vec![text.to_owned()];
        for regex in regexes {
            let mut next = Vec::new();
            for piece in &pieces {
                let mut last = 0;
                for found in regex.find_iter(piece) {
                    let found = found.expect("regex runs");
                    if found.start() > last {
                        next.push(piece[last..found.start()].to_owned());
                    }
                    next.push(found.as_str().to_owned());
                    last = found.end();
                }
                if last < piece.len() {
                    next.push(piece[last..].to_owned());
                }
            }
            pieces = next;
        }
        pieces
    }

    const GPT2_REGEX: &str =
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    /// The scanners agree with the regexes llama.cpp lists, on random text drawn from characters
    /// of every class (whose classes are the same in Unicode 15.1 and the regex crate's tables).
    #[test]
    fn scanners_agree_with_the_regexes_they_implement() {
        let families: [(PreTokenizer, &[&str]); 5] = [
            (PreTokenizer::Gpt2, &[GPT2_REGEX]),
            (
                PreTokenizer::Llama3,
                &[
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                ],
            ),
            (
                PreTokenizer::Qwen2,
                &[
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                ],
            ),
            (PreTokenizer::StarCoder, &[r"\p{N}", GPT2_REGEX]),
            (
                PreTokenizer::Default,
                &[
                    r"[\p{P}\$\+<=>\^~\|]+",
                    GPT2_REGEX,
                    r"\p{N}+",
                    r"[0-9][0-9][0-9]",
                ],
            ),
        ];
        let compiled: Vec<(PreTokenizer, Vec<fancy_regex::Regex>)> = families
            .iter()
            .map(|(family, patterns)| {
                let regexes = patterns
                    .iter()
                    .map(|p| fancy_regex::Regex::new(p).expect("pattern compiles"))
                    .collect();
                (*family, regexes)
            })
            .collect();
        let alphabet: Vec<char> = "aZé中ि\u{301}1٣²Ⅻ'sStTrReEvVmMlLdD .,!?$+<=>^~|`_-#\"\t\n\r\u{b}\u{a0}\u{3000}\u{2028}😀€\u{200d}\u{0}"
            .chars()
            .collect();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let len = (next() % 24) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            for (family, regexes) in &compiled {
                assert_eq!(
                    words(*family, &text),
                    regex_words(regexes, &text),
                    "{family} on {text:?}"
                );
            }
        }
    }

    #[test]
    fn every_supported_name_resolves_and_unknown_names_do_not() {
        for name in [
            "default",
            "gpt-2",
            "llama-bpe",
            "smollm",
            "qwen2",
            "starcoder",
        ] {
            assert!(PreTokenizerConfig::for_name(name).is_some(), "{name}");
        }
        assert_eq!(
            PreTokenizerConfig::for_name("smollm").map(|c| c.family),
            Some(PreTokenizer::StarCoder)
        );
        assert!(PreTokenizerConfig::for_name("llama-bpe").is_some_and(|c| c.ignores_merges));
        assert!(PreTokenizerConfig::for_name("no-such-pre").is_none());
    }
}

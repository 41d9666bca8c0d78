//! egpu's tokenizers against llama.cpp: token ids for every corpus entry, with and without
//! special-token handling; each token's piece and attributes; special ids and the
//! end-of-generation set; the streaming decoder; and speed on long inputs without word breaks.
//!
//! References come from `scripts/gen_tokenizer_refs.py` (llama.cpp as vendored in
//! llama-cpp-python 0.3.36). The two real models are required (`scripts/fetch-models.sh`); the
//! vocab-only files llama.cpp ships (`scripts/fetch-vocabs.sh`) are checked when present and
//! reported as skipped otherwise (visible with `--show-output`), except under CI (`$CI` set),
//! where they are required.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egpu_engine::gguf::GgufFile;
use egpu_engine::tokenizer::{Tokenizer, TokenizerKind, VocabSpec};
use serde_json::Value;

struct Reference {
    header: Value,
    entries: Vec<Entry>,
}

struct Entry {
    id: String,
    text: String,
    /// `llama_tokenize(text, add_special = false, parse_special = false)`
    plain: Vec<u32>,
    /// `llama_tokenize(text, add_special = true, parse_special = true)`
    special: Vec<u32>,
    /// llama.cpp's pieces of `plain` (special tokens hidden), concatenated.
    plain_bytes: Vec<u8>,
    /// llama.cpp's pieces of `special` (special tokens rendered), concatenated.
    special_bytes: Vec<u8>,
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an id list")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

/// A rendering field: a string, or `{"hex": ...}` for bytes that are not UTF-8.
fn rendering(value: Option<&Value>, text: &str) -> Vec<u8> {
    match value {
        None => text.as_bytes().to_vec(),
        Some(Value::String(s)) => s.as_bytes().to_vec(),
        Some(other) => {
            let hex = other["hex"].as_str().expect("hex rendering");
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
                .collect()
        }
    }
}

fn read_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.split('\n')
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

fn corpus() -> Vec<(String, String)> {
    read_lines(&common::fixture("tokenizer/corpus.jsonl"))
        .into_iter()
        .map(|v| {
            let id = v["id"].as_str().expect("id").to_owned();
            let text = v["text"].as_str().expect("text").to_owned();
            (id, text)
        })
        .collect()
}

fn reference(vocab: &str) -> Reference {
    let corpus = corpus();
    let mut lines = read_lines(&common::fixture(&format!("tokenizer/{vocab}.jsonl"))).into_iter();
    let header = lines.next().expect("a header line");
    let entries: Vec<Entry> = lines
        .zip(&corpus)
        .map(|(v, (id, text))| {
            assert_eq!(
                v["id"].as_str(),
                Some(id.as_str()),
                "references out of step with corpus"
            );
            let plain = ids(&v["plain"]);
            let special = v.get("special").map(ids).unwrap_or_else(|| plain.clone());
            Entry {
                id: id.clone(),
                text: text.clone(),
                plain_bytes: rendering(v.get("detok_plain"), text),
                special_bytes: rendering(v.get("detok_special"), text),
                plain,
                special,
            }
        })
        .collect();
    assert_eq!(
        entries.len(),
        corpus.len(),
        "{vocab}: references do not cover the corpus"
    );
    Reference { header, entries }
}

fn load(path: &Path) -> (GgufFile, Tokenizer) {
    let file = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tokenizer =
        Tokenizer::from_gguf(file.metadata()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (file, tokenizer)
}

/// Loads a vocab with `tokenizer.ggml.pre` replaced (as the references do with llama.cpp's
/// `kv_overrides`).
fn load_with_pre(path: &Path, pre: &str) -> (GgufFile, Tokenizer) {
    let file = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut spec =
        VocabSpec::from_gguf(file.metadata()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    spec.pre = Some(pre.to_owned());
    let tokenizer =
        Tokenizer::from_spec(&spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (file, tokenizer)
}

fn fnv1a64(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}
const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;

fn opt_id(value: &Value) -> Option<u32> {
    value.as_u64().map(|v| v as u32)
}

fn show(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// Checks one vocab against llama.cpp; panics listing the first differences.
fn check_against_llamacpp(vocab: &str, path: &Path) {
    let reference = reference(vocab);
    let header = &reference.header;
    let overrides = header["overrides"].as_object().expect("overrides");
    assert!(
        overrides.keys().all(|k| k == "tokenizer.ggml.pre"),
        "only the pre-tokenizer can be overridden: {overrides:?}"
    );
    let (file, tokenizer) = match overrides.get("tokenizer.ggml.pre").and_then(Value::as_str) {
        Some(pre) => load_with_pre(path, pre),
        None => load(path),
    };
    assert_eq!(
        header["file"].as_str(),
        path.file_name().and_then(|n| n.to_str())
    );
    let mut failures: Vec<String> = Vec::new();

    // Vocab-wide facts.
    let n = tokenizer.vocab_size();
    if header["n_vocab"].as_u64() != Some(n as u64) {
        failures.push(format!("vocab size {n}, llama.cpp {}", header["n_vocab"]));
    }
    let specials = tokenizer.special_ids();
    for (name, ours) in [
        ("bos", specials.bos),
        ("eos", specials.eos),
        ("sep", specials.sep),
        ("pad", specials.pad),
    ] {
        if opt_id(&header[name]) != ours {
            failures.push(format!("{name}: ours {ours:?}, llama.cpp {}", header[name]));
        }
    }
    let fim = [
        specials.fim_pre,
        specials.fim_suf,
        specials.fim_mid,
        specials.fim_pad,
        specials.fim_rep,
        specials.fim_sep,
    ];
    let their_fim: Vec<Option<u32>> = header["fim"]
        .as_array()
        .unwrap()
        .iter()
        .map(opt_id)
        .collect();
    if their_fim != fim {
        failures.push(format!("fim ids: ours {fim:?}, llama.cpp {their_fim:?}"));
    }
    let their_eot = opt_id(&header["eot"]);
    if tokenizer.eot() != their_eot {
        // Without an eot_token_id key, llama.cpp takes the first well-known end-of-turn text its
        // hash map yields, an order that differs between C++ standard libraries. Both choices
        // must then still be end-of-generation tokens; with the key, they must agree.
        let keyed = file.metadata().get("tokenizer.ggml.eot_token_id").is_some();
        let both_eog = [tokenizer.eot(), their_eot]
            .iter()
            .all(|id| id.is_some_and(|id| tokenizer.is_end_of_generation(id)));
        if keyed || !both_eog {
            failures.push(format!(
                "eot: ours {:?}, llama.cpp {their_eot:?}",
                tokenizer.eot()
            ));
        } else {
            println!(
                "{vocab}: eot {:?} where llama.cpp's hash order picked {their_eot:?} (both end generation)",
                tokenizer.eot()
            );
        }
    }
    if header["add_bos"].as_bool() != Some(tokenizer.adds_bos())
        || header["add_eos"].as_bool() != Some(tokenizer.adds_eos())
    {
        failures.push(format!(
            "add_bos/add_eos: ours {}/{}, llama.cpp {}/{}",
            tokenizer.adds_bos(),
            tokenizer.adds_eos(),
            header["add_bos"],
            header["add_eos"]
        ));
    }
    let their_eog: BTreeSet<u32> = ids(&header["eog"]).into_iter().collect();
    let our_eog: BTreeSet<u32> = tokenizer.end_of_generation_ids().collect();
    if their_eog != our_eog {
        failures.push(format!(
            "end of generation: ours {our_eog:?}, llama.cpp {their_eog:?}"
        ));
    }
    for id in &their_eog {
        assert!(tokenizer.is_end_of_generation(*id));
    }

    // Every token's attributes and pieces, by chunk hashes.
    let chunk = header["chunk"].as_u64().unwrap() as usize;
    let hashes = |key: &str| -> Vec<String> {
        header[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let (their_attrs, their_pieces, their_special_pieces) = (
        hashes("attr_fnv"),
        hashes("piece_fnv"),
        hashes("piece_special_fnv"),
    );
    for (c, start) in (0..n).step_by(chunk).enumerate() {
        let (mut ha, mut hp, mut hs) = (FNV_OFFSET, FNV_OFFSET, FNV_OFFSET);
        for id in start..(start + chunk).min(n) {
            let id = id as u32;
            ha = fnv1a64(ha, &tokenizer.token_attrs(id).unwrap().bits().to_le_bytes());
            for (hash, special) in [(&mut hp, false), (&mut hs, true)] {
                let piece = tokenizer.token_bytes(id, special);
                *hash = fnv1a64(*hash, &(piece.len() as u32).to_le_bytes());
                *hash = fnv1a64(*hash, piece);
            }
        }
        for (what, ours, theirs) in [
            ("attributes", ha, &their_attrs),
            ("pieces", hp, &their_pieces),
            ("pieces (special rendered)", hs, &their_special_pieces),
        ] {
            if theirs.get(c).map(String::as_str) != Some(format!("{ours:016x}").as_str()) {
                failures.push(format!(
                    "token {what} differ in ids {start}..{}",
                    start + chunk
                ));
            }
        }
    }

    // Every corpus entry, both ways.
    let mut agree = 0;
    let mut decoded_agree = 0;
    let mut diffs = Vec::new();
    for e in &reference.entries {
        for (mode, add_special, theirs, their_bytes) in [
            ("plain", false, &e.plain, &e.plain_bytes),
            ("special", true, &e.special, &e.special_bytes),
        ] {
            let ours = tokenizer.encode(&e.text, add_special, add_special);
            if &ours == theirs {
                agree += 1;
            } else {
                diffs.push(format!(
                    "{} ({mode}) {:?}\n    ours:      {ours:?}\n    llama.cpp: {theirs:?}",
                    e.id, e.text
                ));
            }
            let our_bytes: Vec<u8> = theirs
                .iter()
                .flat_map(|&id| tokenizer.token_bytes(id, add_special).to_vec())
                .collect();
            if &our_bytes == their_bytes {
                decoded_agree += 1;
            } else {
                diffs.push(format!(
                    "{} ({mode}) decode\n    ours:      {}\n    llama.cpp: {}",
                    e.id,
                    show(&our_bytes),
                    show(their_bytes)
                ));
            }
        }
    }
    let total = reference.entries.len() * 2;
    println!(
        "{vocab} ({}): {} corpus entries; ids agree for {agree}/{total} ({:.2}%), decoding for {decoded_agree}/{total}",
        tokenizer.kind(),
        reference.entries.len(),
        100.0 * agree as f64 / total as f64
    );
    failures.extend(diffs.iter().take(8).cloned());
    if !diffs.is_empty() {
        failures.push(format!("{} differences in total", diffs.len()));
    }
    assert!(
        failures.is_empty(),
        "{vocab} differs from llama.cpp:\n  {}",
        failures.join("\n  ")
    );
}

fn vocab_file(name: &str) -> PathBuf {
    common::models_dir()
        .join("vocab")
        .join(format!("ggml-vocab-{name}.gguf"))
}

/// Checks one of llama.cpp's vocab-only files against the references named `reference`, if
/// the file has been fetched.
fn check_vocab_file_if_present(name: &str, reference: &str) {
    let path = vocab_file(name);
    if path.is_file() {
        check_against_llamacpp(reference, &path);
    } else {
        // CI fetches the vocabs (scripts/test.sh), so a missing one there is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing in CI: run scripts/fetch-vocabs.sh",
            path.display()
        );
        eprintln!(
            "SKIPPED {reference}: {} is missing (run scripts/fetch-vocabs.sh to include it)",
            path.display()
        );
    }
}

#[test]
fn smollm2_tokenizes_like_llamacpp() {
    check_against_llamacpp("smollm2", &common::model_path(common::SMOLLM2));
}

#[test]
fn gemma3_tokenizes_like_llamacpp() {
    check_against_llamacpp("gemma3", &common::model_path(common::GEMMA3));
}

#[test]
fn llama_bpe_vocab_tokenizes_like_llamacpp() {
    check_vocab_file_if_present("llama-bpe", "llama-bpe");
}

#[test]
fn qwen2_vocab_tokenizes_like_llamacpp() {
    check_vocab_file_if_present("qwen2", "qwen2");
}

#[test]
fn gpt2_vocab_tokenizes_like_llamacpp() {
    check_vocab_file_if_present("gpt-2", "gpt-2");
}

/// No vocab ships with llama.cpp's `default` pre-tokenizer: GPT-2's, with the name overridden.
#[test]
fn gpt2_vocab_with_default_pre_tokenizer_tokenizes_like_llamacpp() {
    check_vocab_file_if_present("gpt-2", "gpt-2-default-pre");
}

#[test]
fn llama_spm_vocab_tokenizes_like_llamacpp() {
    check_vocab_file_if_present("llama-spm", "llama-spm");
}

#[test]
fn smollm2_prompts_match_the_shared_reference() {
    let (_, tokenizer) = load(&common::model_path(common::SMOLLM2));
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("tokenizer/smollm2-prompts.json")).unwrap(),
    )
    .unwrap();
    let prompts = fixture["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 3);
    for prompt in prompts {
        let text = prompt["text"].as_str().unwrap();
        let expected = ids(&prompt["ids"]);
        // The GGUF says add_bos_token = false: adding specials changes nothing.
        assert_eq!(tokenizer.encode(text, true, true), expected, "{text:?}");
        assert_eq!(tokenizer.encode(text, false, false), expected, "{text:?}");
        assert_eq!(tokenizer.decode(&expected), text);
    }
}

#[test]
fn kinds_and_special_tokens_are_reported() {
    let (_, smollm) = load(&common::model_path(common::SMOLLM2));
    assert_eq!(
        smollm.kind().to_string(),
        "gpt2 BPE (smollm, starcoder rules)"
    );
    assert!(matches!(smollm.kind(), TokenizerKind::BytePairGpt2 { pre, .. } if pre == "smollm"));
    assert_eq!(smollm.vocab_size(), 49152);
    assert_eq!((smollm.bos(), smollm.eos()), (Some(1), Some(2)));
    let im_end = smollm.token_id("<|im_end|>").unwrap();
    assert!(smollm.is_end_of_generation(im_end));
    assert!(!smollm.is_end_of_generation(smollm.token_id("<|im_start|>").unwrap()));
    assert_eq!(smollm.encode("<|im_start|>", false, true), [1]);
    assert_ne!(smollm.encode("<|im_start|>", false, false), [1]);
    assert_eq!(smollm.decode(&[1, 504]), "The");
    assert_eq!(
        smollm.decode_rendering_special(&[1, 504]),
        "<|im_start|>The"
    );

    let (_, gemma) = load(&common::model_path(common::GEMMA3));
    assert_eq!(gemma.kind().to_string(), "llama SentencePiece");
    assert_eq!((gemma.bos(), gemma.eos()), (Some(2), Some(1)));
    let end_of_turn = gemma.token_id("<end_of_turn>").unwrap();
    assert!(gemma.is_end_of_generation(end_of_turn));
    assert_eq!(gemma.eot(), Some(end_of_turn));
    assert_eq!(gemma.encode("", true, true), [2]);
    assert!(gemma.encode("", false, false).is_empty());
}

/// Feeds ids one at a time: text comes out only in whole characters, and all of it equals the
/// one-shot decoding.
fn check_streaming(tokenizer: &Tokenizer, text: &str) -> usize {
    let ids = tokenizer.encode(text, false, false);
    let mut decoder = tokenizer.stream_decoder();
    let mut streamed = String::new();
    let mut held_back = 0;
    for &id in &ids {
        let chunk = decoder.push(id);
        assert!(
            !chunk.contains('\u{FFFD}') || text.contains('\u{FFFD}'),
            "{text:?}: U+FFFD mid-stream"
        );
        streamed.push_str(&chunk);
        if decoder.pending_len() > 0 {
            held_back += 1;
        }
    }
    streamed.push_str(&decoder.finish());
    assert_eq!(streamed, tokenizer.decode(&ids), "{text:?}");
    assert_eq!(streamed, text, "{text:?} does not round-trip");
    held_back
}

#[test]
fn stream_decoder_never_splits_characters() {
    let texts = [
        "👨‍👩‍👧‍👦 family, 👍🏽, 🇯🇵, 🫠🫶🪿",
        "日本語のテキスト、한국어 문장, 中文：量子力学",
        "𒀀𒀁 cuneiform 𓀀 and 𝐀𝐁𝐂",
        "ᚠᛇᚻ᛫ᛒᛦᚦ ꯃꯤꯇꯩꯂꯣꯟ አማርኛ",
    ];
    for model in [common::SMOLLM2, common::GEMMA3] {
        let (_, tokenizer) = load(&common::model_path(model));
        let held_back: usize = texts.iter().map(|t| check_streaming(&tokenizer, t)).sum();
        assert!(
            held_back > 0,
            "{model}: no token ended mid-character, so nothing was exercised"
        );
        for (id, text) in corpus() {
            if !id.starts_with("special") {
                check_streaming(&tokenizer, &text);
            }
        }
    }
}

#[test]
fn stream_decoder_replaces_invalid_bytes_only_when_flushed_or_impossible() {
    let (_, gemma) = load(&common::model_path(common::GEMMA3));
    let byte = |b: u8| gemma.token_id(&format!("<0x{b:02X}>")).unwrap();
    let mut decoder = gemma.stream_decoder();
    // The first two bytes of "€" (E2 82 AC): held back, nothing emitted.
    assert_eq!(decoder.push(byte(0xE2)), "");
    assert_eq!(decoder.push(byte(0x82)), "");
    assert_eq!(decoder.pending_len(), 2);
    assert_eq!(decoder.push(byte(0xAC)), "€");
    // A stray continuation byte can never become a character: replaced at once.
    assert_eq!(decoder.push(byte(0x80)), "\u{FFFD}");
    // A lead byte followed by a non-continuation: replaced, and the next byte kept.
    assert_eq!(decoder.push(byte(0xF0)), "");
    assert_eq!(decoder.push(byte(b'A')), "\u{FFFD}A");
    // Cut short at the end: flushed as U+FFFD.
    assert_eq!(decoder.push(byte(0xE4)), "");
    assert_eq!(decoder.finish(), "\u{FFFD}");
    assert_eq!(decoder.pending_len(), 0);
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

#[test]
fn long_inputs_without_breaks_encode_fast() {
    const LIMIT: Duration = Duration::from_secs(5);
    let inputs = [
        "a".repeat(100_000),
        " ".repeat(100_000),
        "\n".repeat(100_000),
        "中".repeat(35_000),
        "😀".repeat(25_000),
        "1".repeat(100_000),
        "ab1_".repeat(25_000),
    ];
    for model in [common::SMOLLM2, common::GEMMA3] {
        let (_, tokenizer) = load(&common::model_path(model));
        for text in &inputs {
            let (ids, took) = timed(|| tokenizer.encode(text, false, false));
            let first = text.chars().next().unwrap();
            println!(
                "{model}: {} bytes of {first:?}...: {} ids in {took:?}",
                text.len(),
                ids.len()
            );
            assert!(
                took < LIMIT,
                "{model}: {} bytes of {first:?} took {took:?}",
                text.len()
            );
            assert_eq!(tokenizer.decode(&ids), *text);
        }
    }
}

/// A small deterministic generator, so failures reproduce.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn arbitrary_text_never_panics_and_round_trips() {
    let pools: [&[char]; 4] = [
        &[
            'a', 'Z', ' ', ' ', '\n', '\t', '\r', '\'', 's', '1', '.', '!', '<', '|', '>',
        ],
        &[
            'é', '中', '한', 'ع', 'ि', '\u{301}', '\u{200d}', '😀', '🏽', '\u{a0}', '\u{3000}',
            '²', '٣',
        ],
        &[
            '\0',
            '\u{7f}',
            '\u{85}',
            '\u{feff}',
            '\u{e000}',
            '\u{378}',
            '\u{10ffff}',
            '\u{fffd}',
        ],
        &['▁', 'Ġ', 'Ċ', '<', '0', 'x', 'A', '>', ' '],
    ];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for model in [common::SMOLLM2, common::GEMMA3] {
        let (_, tokenizer) = load(&common::model_path(model));
        for _ in 0..300 {
            let len = (rng.next() % 40) as usize;
            let text: String = (0..len)
                .map(|_| {
                    let pool = pools[(rng.next() % pools.len() as u64) as usize];
                    pool[(rng.next() % pool.len() as u64) as usize]
                })
                .collect();
            for (add, parse) in [(false, false), (true, false), (false, true), (true, true)] {
                let ids = tokenizer.encode(&text, add, parse);
                assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
                tokenizer.decode_rendering_special(&ids);
            }
            // Without special-token parsing every character is tokenized as text, and both
            // vocabs spell every byte, so decoding gives the text back; except that
            // SentencePiece writes spaces as '▁', so a '▁' in the text comes back as a space
            // (in llama.cpp too).
            let ids = tokenizer.encode(&text, false, false);
            let expected = match tokenizer.kind() {
                TokenizerKind::SentencePiece => text.replace('▁', " "),
                _ => text.clone(),
            };
            assert_eq!(tokenizer.decode(&ids), expected, "{model}: {text:?}");
        }
        // Ids outside the vocab render as nothing.
        assert_eq!(
            tokenizer.decode(&[u32::MAX, tokenizer.vocab_size() as u32]),
            ""
        );
    }
}

/// The tiny synthetic models committed under fixtures/models carry llama.cpp's tokenization of a
/// few strings with their (gpt-2, llama-bpe and qwen2) vocabs.
#[test]
fn tiny_model_vocabs_tokenize_like_llamacpp() {
    let mut checked = 0;
    for name in [
        "tiny-gpt2",
        "tiny-llama31",
        "tiny-llama31-q8_0",
        "tiny-qwen2",
        "tiny-qwen3",
    ] {
        let (_, tokenizer) = load(&common::fixture(&format!("models/{name}.gguf")));
        let reference: Value = serde_json::from_str(
            &std::fs::read_to_string(common::fixture(&format!("models/{name}.ref.json"))).unwrap(),
        )
        .unwrap();
        for check in reference["tokenizer_check"].as_array().unwrap() {
            let text = check["text"].as_str().unwrap();
            let parse_special = check["parse_special"].as_bool().unwrap();
            let expected = ids(&check["llama_cpp_ids"]);
            let ours = tokenizer.encode(text, false, parse_special);
            assert_eq!(ours, expected, "{name}: {text:?}");
            assert_eq!(
                tokenizer.decode_rendering_special(&ours),
                check["llama_cpp_detok"].as_str().unwrap(),
                "{name}: {text:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 15);
}

//! Hand-written BPE (egpu's `tokenizer` module) versus a Hugging Face `tokenizers::Tokenizer`
//! assembled from the same GGUF vocab and merges: agreement with llama.cpp on the tokenizer
//! corpus, and encoding throughput on the corpus and on large texts.
//!
//! Only byte-level BPE vocabs are compared: `tokenizers` has no score-driven SentencePiece BPE
//! (its Unigram model is a different algorithm), so a SentencePiece GGUF such as Gemma's has no
//! faithful `tokenizers` equivalent to measure.
//!
//! Run (release, from this folder; models from scripts/fetch-models.sh and fetch-vocabs.sh):
//!
//! ```text
//! cargo run --release -- [--models DIR] [--big FILE]...
//! ```
//!
//! Each `--big` file is tokenized whole (repeated to at least 1 MiB); without any, the corpus
//! texts joined and repeated to 1 MiB stand in.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egpu_engine::gguf::GgufFile;
use egpu_engine::tokenizer::{
    PreTokenizer, PreTokenizerConfig, TokenAttrs, Tokenizer, TokenizerKind, VocabSpec,
};
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

type Error = Box<dyn std::error::Error + Send + Sync>;

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// (reference name, file under the models folder)
const VOCABS: [(&str, &str); 4] = [
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("llama-bpe", "vocab/ggml-vocab-llama-bpe.gguf"),
    ("qwen2", "vocab/ggml-vocab-qwen2.gguf"),
    ("gpt-2", "vocab/ggml-vocab-gpt-2.gguf"),
];

fn main() -> Result<(), Error> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut models = std::env::var_os("EGPU_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("models"));
    let mut big_files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--models" => models = PathBuf::from(args.next().ok_or("--models needs a folder")?),
            "--big" => big_files.push(PathBuf::from(args.next().ok_or("--big needs a file")?)),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let fixtures = repo.join("engine/tests/fixtures/tokenizer");
    let corpus = read_corpus(&fixtures.join("corpus.jsonl"))?;
    let corpus_bytes: usize = corpus.iter().map(String::len).sum();

    let mut big_texts: Vec<(String, String)> = Vec::new();
    for file in &big_files {
        let text = std::fs::read_to_string(file)?;
        big_texts.push((file.display().to_string(), repeat_to(&[text], 1 << 20)));
    }
    if big_texts.is_empty() {
        big_texts.push(("corpus repeated".to_owned(), repeat_to(&corpus, 1 << 20)));
    }
    big_texts.push(("'a' x 100000".to_owned(), "a".repeat(100_000)));

    for (name, file) in VOCABS {
        let path = models.join(file);
        if !path.is_file() {
            println!("== {name}: {} missing, skipped\n", path.display());
            continue;
        }
        let gguf = GgufFile::open(&path)?;
        let spec = VocabSpec::from_gguf(gguf.metadata())?;

        let (egpu, egpu_build) = timed(|| Tokenizer::from_spec(&spec));
        let egpu = egpu?;
        let (hf_plain, hf_build) = timed(|| hf_tokenizer(&spec, &egpu, false));
        let hf_plain = hf_plain?;
        let hf_special = hf_tokenizer(&spec, &egpu, true)?;
        println!("== {name}: {} ({} tokens)", egpu.kind(), egpu.vocab_size());
        println!(
            "build: egpu {:.0} ms, tokenizers {:.0} ms",
            ms(egpu_build),
            ms(hf_build)
        );

        // Agreement with llama.cpp.
        let reference = read_reference(&fixtures.join(format!("{name}.jsonl")))?;
        let (mut egpu_ok, mut hf_ok, mut shown) = ([0usize; 2], [0usize; 2], 0);
        for (text, (plain, special)) in corpus.iter().zip(&reference) {
            let add_bos = egpu.adds_bos();
            let hf = |tk: &tokenizers::Tokenizer| -> Result<Vec<u32>, Error> {
                Ok(tk.encode_fast(text.as_str(), false)?.get_ids().to_vec())
            };
            let hf_plain_ids = hf(&hf_plain)?;
            let mut hf_special_ids: Vec<u32> = egpu.bos().filter(|_| add_bos).into_iter().collect();
            hf_special_ids.extend(hf(&hf_special)?);
            for (mode, ours, theirs, expected) in [
                (0, egpu.encode(text, false, false), hf_plain_ids, plain),
                (1, egpu.encode(text, true, true), hf_special_ids, special),
            ] {
                egpu_ok[mode] += usize::from(&ours == expected);
                hf_ok[mode] += usize::from(&theirs == expected);
                if &theirs != expected && shown < 3 {
                    shown += 1;
                    println!(
                        "  tokenizers differs ({}): {text:?}\n    tokenizers: {theirs:?}\n    llama.cpp:  {expected:?}",
                        ["plain", "special"][mode]
                    );
                }
            }
        }
        let n = corpus.len();
        println!(
            "agreement with llama.cpp over {n} entries (plain / special): egpu {}/{n} {}/{n}, tokenizers {}/{n} {}/{n}",
            egpu_ok[0], egpu_ok[1], hf_ok[0], hf_ok[1]
        );

        // Throughput.
        let (egpu_corpus, hf_corpus) = (
            throughput(|| {
                corpus
                    .iter()
                    .map(|t| egpu.encode(t, false, false).len())
                    .sum()
            }),
            throughput(|| {
                corpus
                    .iter()
                    .map(|t| {
                        hf_plain
                            .encode_fast(t.as_str(), false)
                            .map_or(0, |e| e.len())
                    })
                    .sum()
            }),
        );
        report(
            "corpus, entry by entry",
            corpus_bytes,
            egpu_corpus,
            hf_corpus,
        );
        for (label, text) in &big_texts {
            let egpu_run = throughput(|| egpu.encode(text, false, false).len());
            let hf_run = throughput(|| {
                hf_plain
                    .encode_fast(text.as_str(), false)
                    .map_or(0, |e| e.len())
            });
            let same = egpu.encode(text, false, false)
                == hf_plain.encode_fast(text.as_str(), false)?.get_ids();
            report(
                &format!("{label} (same ids: {same})"),
                text.len(),
                egpu_run,
                hf_run,
            );
        }
        println!();
    }
    Ok(())
}

/// A `tokenizers` BPE pipeline equivalent to `spec`'s: its vocab and merges, the same
/// pre-tokenizer regexes, GPT-2's byte-level mapping. With `with_specials`, control,
/// user-defined and unknown tokens are added tokens (matched before pre-tokenization, as
/// llama.cpp does with `parse_special`); without, only user-defined ones are.
fn hf_tokenizer(
    spec: &VocabSpec,
    egpu: &Tokenizer,
    with_specials: bool,
) -> Result<tokenizers::Tokenizer, Error> {
    let TokenizerKind::BytePairGpt2 { family, .. } = egpu.kind() else {
        return Err("only byte-level BPE vocabs have a tokenizers equivalent".into());
    };
    let vocab: Vocab = spec
        .tokens
        .iter()
        .enumerate()
        .map(|(id, text)| (text.clone(), id as u32))
        .collect();
    let merges = spec
        .merges
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter_map(|line| {
            let space = line.bytes().skip(1).position(|b| b == b' ')? + 1;
            Some((line[..space].to_owned(), line[space + 1..].to_owned()))
        })
        .collect();
    let ignores_merges = spec
        .pre
        .as_deref()
        .and_then(PreTokenizerConfig::for_name)
        .is_some_and(|c| c.ignores_merges);
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignores_merges)
        .build()?;

    let split = |regex: &str| -> Result<PreTokenizerWrapper, Error> {
        Ok(Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )?
        .into())
    };
    let bytes_only = ByteLevel::new(false, false, false).into();
    let pre = match family {
        PreTokenizer::Gpt2 => Sequence::new(vec![ByteLevel::new(false, false, true).into()]),
        PreTokenizer::StarCoder => Sequence::new(vec![
            split(r"\p{N}")?,
            ByteLevel::new(false, false, true).into(),
        ]),
        PreTokenizer::Llama3 => Sequence::new(vec![split(LLAMA3_REGEX)?, bytes_only]),
        PreTokenizer::Qwen2 => Sequence::new(vec![split(QWEN2_REGEX)?, bytes_only]),
        PreTokenizer::Default => Sequence::new(vec![
            split(r"[\p{P}\$\+<=>\^~\|]+")?,
            split(GPT2_REGEX)?,
            split(r"\p{N}+")?,
            split(r"[0-9][0-9][0-9]")?,
            bytes_only,
        ]),
    };
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let mut added = Vec::new();
    for id in 0..egpu.vocab_size() as u32 {
        let attrs = egpu.token_attrs(id).unwrap_or_default();
        let wanted = if with_specials {
            TokenAttrs::CONTROL | TokenAttrs::USER_DEFINED | TokenAttrs::UNKNOWN
        } else {
            TokenAttrs::USER_DEFINED
        };
        if attrs.intersects(wanted) {
            let text = egpu.token_text(id).unwrap_or_default();
            added.push(AddedToken::from(text.to_owned(), true));
        }
    }
    tokenizer.add_special_tokens(&added);
    Ok(tokenizer)
}

fn read_corpus(path: &Path) -> Result<Vec<String>, Error> {
    std::fs::read_to_string(path)?
        .split('\n')
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            Ok(v["text"].as_str().ok_or("no text")?.to_owned())
        })
        .collect()
}

/// llama.cpp's ids for one corpus entry: (plain, special).
type ReferenceIds = (Vec<u32>, Vec<u32>);

/// Each entry's ids from a reference file.
fn read_reference(path: &Path) -> Result<Vec<ReferenceIds>, Error> {
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default()
    };
    std::fs::read_to_string(path)?
        .split('\n')
        .filter(|l| !l.trim().is_empty())
        .skip(1)
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            let plain = ids(&v["plain"]);
            let special = v.get("special").map(ids).unwrap_or_else(|| plain.clone());
            Ok((plain, special))
        })
        .collect()
}

fn repeat_to(parts: &[String], min_len: usize) -> String {
    let mut out = String::new();
    while out.len() < min_len {
        for part in parts {
            out.push_str(part);
            out.push('\n');
        }
    }
    out
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// Runs `f` (which returns a token count) for at least a second; (seconds per run, tokens).
fn throughput(mut f: impl FnMut() -> usize) -> (f64, usize) {
    let tokens = f(); // warm-up (and the tokenizers cache)
    let start = Instant::now();
    let mut runs = 0u32;
    while start.elapsed() < Duration::from_secs(1) || runs < 3 {
        std::hint::black_box(f());
        runs += 1;
    }
    (start.elapsed().as_secs_f64() / f64::from(runs), tokens)
}

fn report(label: &str, bytes: usize, egpu: (f64, usize), hf: (f64, usize)) {
    let mbps = |secs: f64| bytes as f64 / secs / 1e6;
    println!(
        "{label}: {:.2} MB; egpu {:.1} MB/s ({} tokens), tokenizers {:.1} MB/s ({} tokens); egpu/tokenizers = {:.2}x",
        bytes as f64 / 1e6,
        mbps(egpu.0),
        egpu.1,
        mbps(hf.0),
        hf.1,
        hf.0 / egpu.0
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

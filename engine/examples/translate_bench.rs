//! Marian translation speed and memory of the CPU engine on a Hugging Face folder, for
//! `bench/bench_marian.py` (which runs transformers beside it). Prints one JSON line.
//!
//! ```text
//! cargo run --release -p egpu-engine --example translate_bench -- FOLDER \
//!     [--quantize q8_0] [--threads 2] [--beams 4] [--max-tokens 64] [--sentences FILE] [--reps 3]
//! ```
//! The folder is converted (timed), loaded, and the sentences (one per line; a built-in set by
//! default: `bench/data/marian-sentences.txt`) are translated as one batch `--reps` times after a warm-up; the best time counts.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use egpu_engine::convert::{gguf_from_hf_folder, WeightFormat};
use egpu_engine::gguf::GgufFile;
use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::marian::MarianModel;
use egpu_engine::tokenizer::Tokenizer;

/// The default sentences: the ones `bench/bench_marian.py` gives transformers too.
const SENTENCES: &str = include_str!("../../bench/data/marian-sentences.txt");

/// Resident memory of this process now (`VmRSS`) or at its peak (`VmHWM`), from /proc (Linux);
/// 0 elsewhere.
fn rss_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut folder = None;
    let (mut threads, mut beams, mut max_tokens, mut reps) = (2usize, 0usize, 64usize, 3usize);
    let mut format = WeightFormat::F32;
    let mut sentences: Vec<String> = SENTENCES.lines().map(str::to_owned).collect();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--threads" | "-t" => threads = value()?.parse()?,
            "--beams" => beams = value()?.parse()?,
            "--max-tokens" => max_tokens = value()?.parse()?,
            "--reps" => reps = value()?.parse()?,
            "--quantize" => {
                let name = value()?;
                format = WeightFormat::parse(&name).ok_or(format!("unknown format {name}"))?;
            }
            "--sentences" => {
                sentences = std::fs::read_to_string(value()?)?
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            other if !other.starts_with('-') => folder = Some(other.to_owned()),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let folder = folder.ok_or("a Marian folder is required")?;
    let started = Instant::now();
    let bytes = gguf_from_hf_folder(std::path::Path::new(&folder), format)?;
    // Written out and mapped, as egpud keeps a conversion, so that the memory measured below is
    // the mapping's and not the conversion's buffer.
    let converted =
        std::env::temp_dir().join(format!("translate_bench-{}.gguf", std::process::id()));
    std::fs::write(&converted, &bytes)?;
    drop(bytes);
    let convert_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let file = Arc::new(GgufFile::open(&converted)?);
    std::fs::remove_file(&converted)?;
    let tokenizer = Tokenizer::from_gguf(file.metadata())?;
    let model = MarianModel::load(file)?;
    let load_s = started.elapsed().as_secs_f64();
    let pool = ThreadPool::new(threads);
    let sources: Vec<Vec<u32>> = sentences
        .iter()
        .map(|s| tokenizer.encode(s, true, false))
        .collect();
    let mut settings = model.search_settings().clone();
    if beams > 0 {
        settings.num_beams = beams;
    }
    settings.max_length = max_tokens + 1;
    let mut best = f64::INFINITY;
    let mut tokens = 0;
    for rep in 0..=reps {
        let started = Instant::now();
        let out = model
            .translate(&pool, &sources, &settings, &mut || true)?
            .ok_or("cancelled")?;
        let seconds = started.elapsed().as_secs_f64();
        tokens = out.iter().map(|h| h.tokens.len()).sum::<usize>();
        if rep > 0 {
            best = best.min(seconds);
        }
    }
    println!(
        "{{\"convert_s\": {convert_s:.3}, \"load_s\": {load_s:.3}, \"weight_bytes\": {}, \
         \"rss_bytes\": {}, \"peak_rss_bytes\": {}, \"sentences\": {}, \"beams\": {}, \"output_tokens\": {tokens}, \
         \"seconds\": {best:.4}, \"sentences_per_s\": {:.3}, \"output_tokens_per_s\": {:.2}}}",
        model.weight_bytes(),
        rss_bytes("VmRSS:"),
        rss_bytes("VmHWM:"),
        sources.len(),
        settings.num_beams,
        sources.len() as f64 / best,
        tokens as f64 / best
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("translate_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

//! Greedy generation, timing prefill and decode: a quick speed check.
//!
//! ```text
//! cargo run --release -p egpu-engine --example generate -- MODEL.gguf \
//!     [--prompt TEXT | --ids 504,3575,282,4649,314 | --prompt-len N] [-n 32] [-t 2] [--chunk 512]
//! ```
//! `--prompt` is tokenized with the model's own vocabulary (BOS added if the GGUF says so);
//! `--prompt-len N` makes a synthetic prompt of N ids (for prefill timing). The default prompt
//! is "The capital of France is".

use std::process::ExitCode;
use std::time::Instant;

use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model};
use egpu_engine::tokenizer::Tokenizer;

enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Synthetic(usize),
}

struct Args {
    model: String,
    prompt: Prompt,
    n_new: usize,
    threads: usize,
    chunk: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut model = None;
    let mut prompt = Prompt::Text("The capital of France is".into());
    let mut n_new = 32;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut chunk = 512;
    let num = |v: Option<String>, flag: &str| -> Result<usize, String> {
        v.ok_or(format!("{flag} needs a value"))?
            .parse()
            .map_err(|e| format!("{flag}: {e}"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--prompt" => prompt = Prompt::Text(args.next().ok_or("--prompt needs a value")?),
            "--ids" => {
                prompt = Prompt::Ids(
                    args.next()
                        .ok_or("--ids needs a value")?
                        .split(',')
                        .map(|s| s.trim().parse().map_err(|e| format!("--ids: {e}")))
                        .collect::<Result<_, _>>()?,
                )
            }
            "--prompt-len" => prompt = Prompt::Synthetic(num(args.next(), "--prompt-len")?),
            "-n" => n_new = num(args.next(), "-n")?,
            "-t" | "--threads" => threads = num(args.next(), "-t")?,
            "--chunk" => chunk = num(args.next(), "--chunk")?.max(1),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s => model = Some(s.to_owned()),
        }
    }
    Ok(Args {
        model: model
            .ok_or("usage: generate MODEL.gguf [--prompt TEXT | --ids a,b,c] [-n N] [-t T]")?,
        prompt,
        n_new,
        threads,
        chunk,
    })
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let t0 = Instant::now();
    let model = Model::open(&args.model)?;
    let cfg = model.config();
    eprintln!(
        "loaded {} ({} layers, embd {}) in {:.2?}",
        cfg.arch.name(),
        cfg.n_layer,
        cfg.n_embd,
        t0.elapsed()
    );
    let tokenizer = Tokenizer::from_gguf(model.file().metadata());
    let ids: Vec<u32> = match &args.prompt {
        Prompt::Text(text) => tokenizer
            .as_ref()
            .map_err(|e| e.to_string())?
            .encode(text, true, false),
        Prompt::Ids(ids) => ids.clone(),
        // Arbitrary in-vocabulary ids: prefill speed does not depend on which.
        Prompt::Synthetic(n) => (0..*n as u32).map(|i| 200 + (i * 37) % 20000).collect(),
    };
    let pool = ThreadPool::new(args.threads);
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(ids.len() + args.n_new)?;

    let t0 = Instant::now();
    let mut next = 0;
    let chunks: Vec<&[u32]> = ids.chunks(args.chunk).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let wanted = if i + 1 == chunks.len() {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        let logits = model.forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(&mut cache, chunk, wanted)],
        )?;
        if let Some(row) = logits.last(0) {
            next = egpu_engine::sampler::argmax(row).map_or(0, |i| i as u32);
        }
    }
    let prefill = t0.elapsed();

    let mut generated = vec![next];
    let t0 = Instant::now();
    for _ in 1..args.n_new {
        let token = [next];
        let logits = model.forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(&mut cache, &token, LogitsWanted::Last)],
        )?;
        next = egpu_engine::sampler::argmax(logits.last(0).ok_or("no logits")?)
            .map_or(0, |i| i as u32);
        generated.push(next);
    }
    let decode = t0.elapsed();

    println!("prompt ids: {ids:?}");
    println!("generated ids: {generated:?}");
    if let Ok(tokenizer) = &tokenizer {
        println!("generated text: {:?}", tokenizer.decode(&generated));
    }
    println!(
        "prefill: {} tokens in {:.3?} = {:.1} tok/s ({} threads)",
        ids.len(),
        prefill,
        ids.len() as f64 / prefill.as_secs_f64(),
        args.threads
    );
    let n_decode = args.n_new.saturating_sub(1);
    println!(
        "decode: {} tokens in {:.3?} = {:.1} tok/s",
        n_decode,
        decode,
        n_decode as f64 / decode.as_secs_f64().max(1e-9)
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

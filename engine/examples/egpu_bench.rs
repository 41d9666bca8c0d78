//! Prefill and decode speed of the CPU engine on one GGUF, for `bench/bench.py` (which runs
//! llama.cpp beside it). Prints one JSON line: `{"prefill_tok_s": …, "decode_tok_s": …}`.
//!
//! ```text
//! cargo run --release -p egpu-engine --example egpu_bench -- \
//!     --model MODEL.gguf [--threads 2] [--prompt 512] [--gen 128] [--decode-from-empty] [--json]
//! ```
//! Like llama-bench: the prompt is synthetic ids (speed does not depend on the text), prefill is
//! one forward pass over the whole prompt, decode is `--gen` single-token steps after it; with
//! `--decode-from-empty` they start from an empty cache instead, as llama-bench's `tg` test does
//! (attention then covers positions 0..gen, not prompt..prompt+gen).

use std::process::ExitCode;
use std::time::Instant;

use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model};

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut model_path = None;
    let (mut threads, mut n_prompt, mut n_gen, mut json) = (1usize, 512usize, 128usize, false);
    let mut decode_from_empty = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || -> Result<usize, Box<dyn std::error::Error>> {
            Ok(args.next().ok_or(format!("{arg} needs a value"))?.parse()?)
        };
        match arg.as_str() {
            "--model" => model_path = args.next(),
            "--threads" | "-t" => threads = value()?,
            "--prompt" => n_prompt = value()?,
            "--gen" => n_gen = value()?,
            "--json" => json = true,
            "--decode-from-empty" => decode_from_empty = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let model = Model::open(model_path.ok_or("--model is required")?)?;
    let pool = ThreadPool::new(threads);
    let mut scratch = model.new_scratch();
    let prompt: Vec<u32> = (0..n_prompt as u32)
        .map(|i| 100 + (i * 7919) % 1000)
        .collect();

    // Warm-up: fault the weights in and start the pool, as llama-bench's warm-up run does
    // (eight tokens of the same kind as the prompt's, however short the prompt is).
    let warm_up: Vec<u32> = (0..8).map(|i| 100 + (i * 7919) % 1000).collect();
    let mut cache = model.new_kv_cache(n_prompt + n_gen + 8)?;
    model.forward(
        &pool,
        &mut scratch,
        &mut [BatchItem::append(&mut cache, &warm_up, LogitsWanted::Last)],
    )?;
    cache.truncate(0);

    let t0 = Instant::now();
    model.forward(
        &pool,
        &mut scratch,
        &mut [BatchItem::append(&mut cache, &prompt, LogitsWanted::Last)],
    )?;
    let prefill = t0.elapsed().as_secs_f64();

    if decode_from_empty {
        cache.truncate(0);
    }
    let token = [100u32];
    let t0 = Instant::now();
    for _ in 0..n_gen {
        model.forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(&mut cache, &token, LogitsWanted::Last)],
        )?;
    }
    let decode = t0.elapsed().as_secs_f64();

    let (pp, tg) = (n_prompt as f64 / prefill, n_gen as f64 / decode);
    if json {
        let path = egpu_engine::kernels::KernelPath::best();
        println!(
            "{{\"prefill_tok_s\": {pp:.3}, \"decode_tok_s\": {tg:.3}, \"kernels\": \"{}\", \"tile\": \"{}\"}}",
            path.name(),
            path.tile_kernel()
        );
    } else {
        println!("prefill {n_prompt} tokens: {pp:.1} tok/s; decode {n_gen} tokens: {tg:.1} tok/s ({threads} threads)");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egpu_bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

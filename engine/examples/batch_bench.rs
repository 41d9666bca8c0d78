//! How a decode step's time grows with the number of sequences in it: what continuous batching
//! in egpud can gain. Each sequence first gets a `--ctx`-token prompt, then every step feeds
//! one token to each of N sequences in a single forward pass.
//!
//! ```text
//! cargo run --release -p egpu-engine --example batch_bench -- MODEL.gguf [--threads 2] [--ctx 64] [--steps 32] [--only N]
//! ```
//! Prints, per N in 1, 2, 4, 8: ms per step and aggregate tokens/s.

use std::time::Instant;

use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: batch_bench MODEL.gguf [--threads N] [--ctx N] [--steps N]")?;
    let (mut threads, mut ctx, mut steps, mut only) = (2usize, 64usize, 32usize, 0usize);
    while let Some(flag) = args.next() {
        let value: usize = args.next().ok_or("a flag needs a value")?.parse()?;
        match flag.as_str() {
            "--threads" => threads = value,
            "--ctx" => ctx = value,
            "--steps" => steps = value,
            "--only" => only = value,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let model = Model::open(&path)?;
    let pool = ThreadPool::new(threads);
    let mut scratch = model.new_scratch();
    println!("batch  ms/step  tok/s  vs 1");
    let mut single = 0.0;
    for n in [1usize, 2, 4, 8]
        .into_iter()
        .filter(|&n| only == 0 || n == only)
    {
        let mut caches = (0..n)
            .map(|_| model.new_kv_cache(ctx + steps + 1))
            .collect::<Result<Vec<_>, _>>()?;
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|s| {
                (0..ctx as u32)
                    .map(|i| 100 + (i * 31 + s as u32 * 7) % 900)
                    .collect()
            })
            .collect();
        let mut items: Vec<BatchItem> = caches
            .iter_mut()
            .zip(&prompts)
            .map(|(c, p)| BatchItem::append(c, p, LogitsWanted::Last))
            .collect();
        model.forward(&pool, &mut scratch, &mut items)?;
        let token = [200u32];
        let t0 = Instant::now();
        for _ in 0..steps {
            let mut items: Vec<BatchItem> = caches
                .iter_mut()
                .map(|c| BatchItem::append(c, &token, LogitsWanted::Last))
                .collect();
            model.forward(&pool, &mut scratch, &mut items)?;
        }
        let per_step = t0.elapsed().as_secs_f64() / steps as f64;
        let rate = n as f64 / per_step;
        if n == 1 {
            single = rate;
        }
        println!(
            "{n:5}  {:7.2}  {rate:5.0}  {:.2}x",
            per_step * 1e3,
            rate / single
        );
    }
    Ok(())
}

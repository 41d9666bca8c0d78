//! One chat turn on the CPU engine, in-process: the model's chat template, its tokenizer, the
//! sampler and a stream-safe detokenizer, printing text as it is generated. This is what the
//! README's first command runs until egpud serves the same path over its socket.
//!
//! ```text
//! cargo run --release -p egpu-engine --example chat -- MODEL.gguf "Your message" \
//!     [-n 128] [-t THREADS] [--temp 0] [--seed 1] [--raw]
//! ```

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use egpu_engine::chat::{ChatMessage, ChatTemplate};
use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model};
use egpu_engine::sampler::{Sampler, SamplingParams};
use egpu_engine::tokenizer::Tokenizer;

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut positional = Vec::new();
    let mut n_new = 128usize;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut params = SamplingParams::default();
    let mut raw = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "-n" => n_new = value()?.parse()?,
            "-t" | "--threads" => threads = value()?.parse()?,
            "--temp" => params.temperature = value()?.parse()?,
            "--seed" => params.seed = Some(value()?.parse()?),
            "--raw" => raw = true,
            _ => positional.push(arg),
        }
    }
    let [path, message] = positional.as_slice() else {
        return Err(
            "usage: chat MODEL.gguf \"message\" [-n N] [-t T] [--temp T] [--seed S] [--raw]".into(),
        );
    };

    let t0 = Instant::now();
    let model = Model::open(path)?;
    let meta = model.file().metadata();
    let tokenizer = Tokenizer::from_gguf(meta)?;
    let prompt = if raw {
        message.clone()
    } else {
        ChatTemplate::from_gguf(meta)?.render(&[ChatMessage::user(message.as_str())], true)?
    };
    // A chat template writes the model's special tokens (bos included) itself, so templated
    // text is tokenized without adding them again, as transformers does; raw text gets them.
    let ids = tokenizer.encode(&prompt, raw, true);
    eprintln!(
        "[{} · {} prompt tokens · loaded in {:.0?} · {threads} threads]",
        model.config().arch.name(),
        ids.len(),
        t0.elapsed()
    );

    let pool = ThreadPool::new(threads);
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(ids.len() + n_new)?;
    let mut sampler = Sampler::new(params);
    sampler.accept_all(&ids);
    let mut decoder = tokenizer.stream_decoder();
    let mut out = std::io::stdout().lock();

    let t0 = Instant::now();
    let logits = model.forward(
        &pool,
        &mut scratch,
        &mut [BatchItem::append(&mut cache, &ids, LogitsWanted::Last)],
    )?;
    let mut next = sampler.sample(logits.last(0).ok_or("no logits")?);
    let prefill = t0.elapsed();
    let t0 = Instant::now();
    let mut generated = 0;
    while generated < n_new && !tokenizer.is_end_of_generation(next) {
        sampler.accept(next);
        write!(out, "{}", decoder.push(next))?;
        out.flush()?;
        generated += 1;
        let token = [next];
        let logits = model.forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(&mut cache, &token, LogitsWanted::Last)],
        )?;
        next = sampler.sample(logits.last(0).ok_or("no logits")?);
    }
    writeln!(out, "{}", decoder.finish())?;
    eprintln!(
        "[prefill {:.1} tok/s · decode {generated} tokens at {:.1} tok/s]",
        ids.len() as f64 / prefill.as_secs_f64(),
        generated as f64 / t0.elapsed().as_secs_f64().max(1e-9)
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat: error: {e}");
            ExitCode::FAILURE
        }
    }
}

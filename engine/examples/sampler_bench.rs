//! Micro-benchmark of choosing one token from a vocabulary's logits, with the settings that
//! the daemon's front ends send when a client leaves them at their defaults.
//!
//! ```text
//! cargo run -p egpu-engine --release --example sampler_bench -- [--vocab 262144] [--reps 200]
//! ```
//!
//! The logits are synthetic but shaped like a language model's: a few hundred plausible
//! tokens a few units below the best one, and a long tail far below (one logit every
//! vocabulary entry, as the LM head gives them). Prints microseconds per sampled token for
//! each setting; compare builds in one run, as timings on a shared machine drift.

use std::time::Instant;

use egpu_engine::sampler::{Rng, Sampler, SamplingParams};

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut vocab, mut reps) = (262_144usize, 200usize);
    while let Some(arg) = args.next() {
        let mut value = || -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} takes a number"))
        };
        match arg.as_str() {
            "--vocab" => vocab = value(),
            "--reps" => reps = value(),
            other => panic!("unknown argument {other}"),
        }
    }
    let logits = synthetic_logits(vocab, 1);
    let settings: [(&str, SamplingParams); 5] = [
        ("greedy", SamplingParams::default()),
        (
            "OpenAI defaults (temperature 1)",
            SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
        ),
        (
            "OpenAI, top_p 0.9",
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "Ollama defaults (0.8, top_k 40, top_p 0.9, repeat 1.1 over 64)",
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.9,
                repeat_penalty: 1.1,
                penalty_last_n: 64,
                ..Default::default()
            },
        ),
        (
            "creative (0.8, top_k 40, top_p 0.95, min_p 0.05)",
            SamplingParams::creative(),
        ),
    ];
    let mut checksum = 0u64;
    for (name, params) in settings {
        let mut sampler = Sampler::new(SamplingParams {
            seed: Some(7),
            ..params
        });
        // Sixty-four recent tokens for the penalties, as a conversation would have.
        sampler.accept_all(
            &(0..64)
                .map(|i| (i * 977 % vocab) as u32)
                .collect::<Vec<_>>(),
        );
        let t0 = Instant::now();
        for _ in 0..reps {
            checksum += u64::from(sampler.sample(&logits));
        }
        let per = t0.elapsed().as_secs_f64() / reps as f64;
        println!("{name:<66} {:>9.1} µs per token (vocab {vocab})", per * 1e6);
    }
    // Keep the results observable so that no work is optimized away.
    println!("checksum {checksum}");
}

/// Logits of `n` tokens: about 1% within a few units of the top, the rest spread far below.
fn synthetic_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let u = rng.next_f64() as f32;
            let v = rng.next_f64() as f32;
            if u < 0.01 {
                20.0 - 6.0 * v
            } else {
                8.0 * v - 4.0
            }
        })
        .collect()
}

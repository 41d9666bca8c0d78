//! Micro-benchmark of attention's inner kernels as prefill and decode call them, one thread.
//!
//! ```text
//! cargo run -p egpu-engine --release --example attention_bench -- [--dim 64] [--group 3] [--reps 200]
//! ```
//!
//! Prefill: a tile of 16 tokens' query rows (`16 × group`) against full blocks of 64 f16 keys
//! and values (scores, online softmax, weighted sum), as `models::decoder::attention` runs the
//! blocks before a tile's own positions. Diagonal: one token's `group` rows against the first
//! `1..=64` keys of a block, every length in turn, as the block holding each token's own
//! position (and every decode step's last block) runs. Prints multiply-adds per nanosecond
//! for the scores and the weighted sums and nanoseconds per softmax weight; compare builds
//! in one run, as timings on a shared machine drift.

use std::time::Instant;

use egpu_engine::kernels::{online_softmax_step, scores_transposed_f16, weighted_sum_rows_f16};
use half::f16;

const KEY_BLOCK: usize = 64;
const TILE: usize = 16;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut dim, mut group, mut reps) = (64usize, 3usize, 200usize);
    while let Some(arg) = args.next() {
        let mut value = || -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} takes a number"))
        };
        match arg.as_str() {
            "--dim" => dim = value(),
            "--group" => group = value(),
            "--reps" => reps = value(),
            other => panic!("unknown argument {other}"),
        }
    }
    let wave = |i: usize, f: f32| f16::from_f32((i as f32 * f).sin());
    let keys: Vec<f16> = (0..dim * KEY_BLOCK).map(|i| wave(i, 0.37)).collect();
    let values: Vec<f16> = (0..KEY_BLOCK * dim).map(|i| wave(i, 0.13)).collect();
    let scale = 1.0 / (dim as f32).sqrt();

    // Prefill: TILE × group rows against whole blocks.
    let rows = TILE * group;
    let q: Vec<f32> = (0..rows * dim).map(|i| (i as f32 * 0.3).sin()).collect();
    let mut scores = vec![0f32; rows * KEY_BLOCK];
    let mut out = vec![0f32; rows * dim];
    let (mut max, mut sum) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
    let (mut t_scores, mut t_softmax, mut t_sum) = (0f64, 0f64, 0f64);
    for _ in 0..reps {
        let t0 = Instant::now();
        scores_transposed_f16(&q, dim, &keys, KEY_BLOCK, 0..KEY_BLOCK, scale, &mut scores);
        let t1 = Instant::now();
        for (r, (s, oh)) in scores
            .chunks_exact_mut(KEY_BLOCK)
            .zip(out.chunks_exact_mut(dim))
            .enumerate()
        {
            online_softmax_step(s, &mut max[r], &mut sum[r], oh);
        }
        let t2 = Instant::now();
        weighted_sum_rows_f16(&mut out, &scores, &values, dim);
        let t3 = Instant::now();
        t_scores += (t1 - t0).as_secs_f64();
        t_softmax += (t2 - t1).as_secs_f64();
        t_sum += (t3 - t2).as_secs_f64();
    }
    let macs = (reps * rows * KEY_BLOCK * dim) as f64;
    let weights = (reps * rows * KEY_BLOCK) as f64;
    println!(
        "prefill  (dim {dim}, {rows} rows × {KEY_BLOCK} keys): scores {:.1} MAC/ns, softmax {:.2} ns/weight, weighted sum {:.1} MAC/ns",
        macs / t_scores * 1e-9,
        t_softmax / weights * 1e9,
        macs / t_sum * 1e-9
    );

    // Diagonal: one token's rows against 1..=64 keys.
    let q1 = &q[..group * dim];
    let mut out1 = vec![0f32; group * dim];
    let (mut t_scores, mut t_softmax, mut t_sum, mut n_total) = (0f64, 0f64, 0f64, 0usize);
    for _ in 0..reps {
        for n in 1..=KEY_BLOCK {
            let s = &mut scores[..group * n];
            let (mut max, mut sum) = (vec![f32::NEG_INFINITY; group], vec![0f32; group]);
            let t0 = Instant::now();
            scores_transposed_f16(q1, dim, &keys, KEY_BLOCK, 0..n, scale, s);
            let t1 = Instant::now();
            for (r, (s, oh)) in s
                .chunks_exact_mut(n)
                .zip(out1.chunks_exact_mut(dim))
                .enumerate()
            {
                online_softmax_step(s, &mut max[r], &mut sum[r], oh);
            }
            let t2 = Instant::now();
            for (oh, w) in out1.chunks_exact_mut(dim).zip(s.chunks_exact(n)) {
                egpu_engine::kernels::weighted_sum_f16(oh, w, &values[..n * dim]);
            }
            let t3 = Instant::now();
            t_scores += (t1 - t0).as_secs_f64();
            t_softmax += (t2 - t1).as_secs_f64();
            t_sum += (t3 - t2).as_secs_f64();
            n_total += n;
        }
    }
    let macs = (n_total * group * dim) as f64;
    let weights = (n_total * group) as f64;
    println!(
        "diagonal (dim {dim}, {group} rows × 1..={KEY_BLOCK} keys): scores {:.1} MAC/ns, softmax {:.2} ns/weight, weighted sum {:.1} MAC/ns",
        macs / t_scores * 1e-9,
        t_softmax / weights * 1e9,
        macs / t_sum * 1e-9
    );
    // Keep the results observable so that no work is optimized away.
    let checksum: f32 = out.iter().chain(&out1).sum();
    println!("checksum {checksum}");
}

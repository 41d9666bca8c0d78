//! The matmul kernels on real model weights: the first rows of one tensor of every type and
//! shape in SmolLM2 (Q4_1, Q8_0) and Gemma 3 (Q5_0, Q8_0, Q4_K, Q6_K), through every available
//! path, against the exact-f32 reference.
//!
//! Bound per output `y = Σ w_i x_i` (see `engine/src/kernels/tests.rs` for the derivation): the
//! 8-bit activation rounding moves each `x_i` by at most `dx_c / 2` (`dx_c = max|x| / 127` over
//! its 32-element chunk), so `|y_fast − y_exact| ≤ Σ_c (dx_c/2) Σ_{i∈c} |w_i|`, plus f32
//! summation error `2·(n/32 + 64)·ε·S`. Here `S` bounds the magnitude of the summed terms from
//! the dequantized weights alone: a chunk's scale·quant and offset parts are each at most twice
//! its largest weight for the types in these models (the offset is the block minimum, or 32 Q6_K
//! steps), so `S = Σ_i 4·max_c|w|·(|x_i| + dx_c)`.

mod common;

use egpu_engine::gguf::GgufFile;
use egpu_engine::kernels::{
    matmul, matmul_reference, matmul_with_path, KernelPath, ThreadPool, WeightMatrix,
};

/// Deterministic activations shaped like hidden states: mostly small, a few large.
fn activations(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            if i % 131 == 7 {
                v * 30.0
            } else {
                v
            }
        })
        .collect()
}

/// The first `rows` rows of `w`.
fn first_rows<'a>(w: &WeightMatrix<'a>, rows: usize) -> WeightMatrix<'a> {
    let rows = rows.min(w.rows);
    WeightMatrix {
        rows,
        data: &w.data[..rows * w.row_bytes()],
        ..*w
    }
}

/// `(quantization bound, summation bound)` per output.
fn bounds(w: &WeightMatrix, x: &[f32], n_tokens: usize) -> Vec<(f32, f32)> {
    let (rows, cols) = (w.rows, w.cols);
    let mut wf = vec![0f32; cols];
    let mut out = vec![(0f32, 0f32); rows * n_tokens];
    for r in 0..rows {
        w.dequantize_row(r, &mut wf).unwrap();
        for t in 0..n_tokens {
            let xt = &x[t * cols..(t + 1) * cols];
            let (mut quant, mut s) = (0f32, 0f32);
            for (wc, xc) in wf.chunks(32).zip(xt.chunks(32)) {
                let dx = xc.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                let wmax = wc.iter().fold(0f32, |m, v| m.max(v.abs()));
                quant += dx / 2.0 * wc.iter().map(|v| v.abs()).sum::<f32>();
                s += xc.iter().map(|v| 4.0 * wmax * (v.abs() + dx)).sum::<f32>();
            }
            let n = cols as f32;
            out[t * rows + r] = (quant * 1.0001, 2.0 * (n / 32.0 + 64.0) * f32::EPSILON * s);
        }
    }
    out
}

/// One tensor of each (type, shape) in the model.
fn sample_tensors(file: &GgufFile) -> Vec<(String, WeightMatrix<'_>)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut picked = Vec::new();
    for info in file.tensors() {
        if info.dims.len() != 2 {
            continue;
        }
        let w = WeightMatrix::from_tensor(file, info).unwrap();
        if seen.insert((w.ty, w.rows, w.cols)) {
            picked.push((info.name.clone(), w));
        }
    }
    picked
}

fn check_model(file_name: &str, expected_types: &[&str]) {
    let file = GgufFile::open(common::model_path(file_name)).unwrap();
    let pool = ThreadPool::new(2);
    let tensors = sample_tensors(&file);
    let types: std::collections::BTreeSet<String> =
        tensors.iter().map(|(_, w)| w.ty.to_string()).collect();
    for ty in expected_types {
        assert!(
            types.contains(*ty),
            "{file_name}: no {ty} tensor among {types:?}"
        );
    }
    for (name, w) in &tensors {
        // 42 rows: not a whole number of 4-row tiles.
        let w = first_rows(w, 42);
        for n_tokens in [1, 3] {
            let x = activations(n_tokens * w.cols, w.rows as u64 * 31 + n_tokens as u64);
            let bound = bounds(&w, &x, n_tokens);
            let mut exact = vec![0f32; w.rows * n_tokens];
            matmul_reference(&pool, &w, &x, n_tokens, &mut exact).unwrap();
            let (mut err2, mut norm2) = (0f64, 0f64);
            for path in KernelPath::available() {
                let mut y = vec![f32::NAN; w.rows * n_tokens];
                matmul_with_path(&pool, &w, &x, n_tokens, &mut y, path).unwrap();
                for (i, &(quant, sum)) in bound.iter().enumerate() {
                    let err = (y[i] - exact[i]).abs();
                    assert!(
                        err <= quant + sum,
                        "{file_name} {name} ({}) {path:?} tokens {n_tokens} out {i}: \
                         {} vs exact {} (err {err}, bound {quant} + {sum})",
                        w.ty,
                        y[i],
                        exact[i]
                    );
                    err2 += f64::from(err).powi(2);
                    norm2 += f64::from(exact[i]).powi(2);
                }
            }
            // And in aggregate the error is small, not just bounded. (About 1% here: a ×30
            // outlier in every fourth chunk makes that chunk's step 30× coarser for the other 31
            // values, and random activations against real rows mostly cancel, so the exact
            // results are small.)
            assert!(
                err2.sqrt() <= 0.03 * norm2.sqrt(),
                "{file_name} {name}: relative error {}",
                (err2 / norm2).sqrt()
            );
        }
    }
}

#[test]
fn smollm2_tensors_through_every_path() {
    check_model(common::SMOLLM2, &["Q4_1", "Q8_0"]);
}

#[test]
fn gemma3_tensors_through_every_path() {
    check_model(common::GEMMA3, &["Q5_0", "Q8_0", "Q4_K", "Q6_K"]);
}

/// 1, 2 and 3 threads give bit-identical results on real weights, mat-vec and mat-mat.
#[test]
fn thread_counts_agree_bit_for_bit_on_real_weights() {
    let file = GgufFile::open(common::model_path(common::GEMMA3)).unwrap();
    let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
    for name in [
        "blk.0.ffn_down.weight",
        "blk.0.ffn_gate.weight",
        "blk.0.attn_v.weight",
    ] {
        let w = WeightMatrix::from_tensor(&file, file.tensor(name).unwrap()).unwrap();
        for n_tokens in [1, 5] {
            let x = activations(n_tokens * w.cols, 3);
            let results: Vec<Vec<u32>> = pools
                .iter()
                .map(|pool| {
                    let mut y = vec![0f32; w.rows * n_tokens];
                    matmul(pool, &w, &x, n_tokens, &mut y).unwrap();
                    y.iter().map(|v| v.to_bits()).collect()
                })
                .collect();
            assert!(
                results.iter().all(|r| *r == results[0]),
                "{name} {n_tokens} tokens"
            );
        }
    }
}

//! Numerical tests of the kernels on synthetic weights. Real model tensors are exercised in
//! `engine/tests/kernels.rs`.
//!
//! Error bounds (per output value `y = Σ_i w_i·x_i`):
//!
//! - **Quantized weights, fast or scalar path vs exact f32.** The only approximation is the 8-bit
//!   activation rounding, at most half a step `dx_c/2` per element of chunk `c`, so
//!   `|y_fast − y_exact| ≤ Σ_c (dx_c/2)·Σ_{i∈c}|w_i|` — ggml's known bound for `vec_dot` against
//!   Q8 activations, made exact by using f32 (not f16) activation scales — plus f32 summation
//!   error on both sides, bounded by `(n + 64)·ε·S` with `S = Σ_i (|s_i q_i| + |o_i|)·|x_i|`
//!   the magnitude of all terms summed (integer part and offset part can cancel, so the bound
//!   must use the terms, not the result).
//! - **Fast path vs its scalar twin.** Both compute the same quantized-activation dot product
//!   from the same integers; they differ only in the order of f32 roundings, so the bound is the
//!   summation term alone: `2·(n_chunks + 64)·ε·S`.
//! - **Float weights.** No quantization: `2·(n + 64)·ε·Σ|w_i x_i|` between any two paths.

use super::decoded::tests::{sanitize_f16_scales, Rng};
use super::decoded::*;
use super::*;

fn random_f32(rng: &mut Rng) -> f32 {
    // Uniform in [-1, 1) with 24 bits of resolution.
    (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Random activations with the occasional outlier, as real hidden states have.
fn random_activations(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = random_f32(rng);
            if i % 97 == 13 {
                v * 40.0
            } else {
                v
            }
        })
        .collect()
}

/// Random bytes for `rows × cols` weights of `ty`, with sane scales (finite f16 scales for the
/// block types, random values in ±1 for float types).
fn random_weights(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols;
    match ty {
        GgmlType::F32 => (0..n).flat_map(|_| random_f32(rng).to_le_bytes()).collect(),
        GgmlType::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32(random_f32(rng)).to_le_bytes())
            .collect(),
        GgmlType::BF16 => (0..n)
            .flat_map(|_| ((random_f32(rng).to_bits() >> 16) as u16).to_le_bytes())
            .collect(),
        _ => {
            let bytes = n / ty.block_size() * ty.type_size();
            let mut data: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8).collect();
            sanitize_f16_scales(ty, &mut data);
            data
        }
    }
}

const QUANTIZED: [GgmlType; 12] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];
const FLOATS: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];

/// Per-output bounds `(quantization, summation)` for `w` against `x` (see the module docs).
fn bounds(w: &WeightMatrix, x: &[f32], n_tokens: usize) -> Vec<(f32, f32)> {
    let (rows, cols) = (w.rows, w.cols);
    let eps = f32::EPSILON;
    let mut out = vec![(0f32, 0f32); rows * n_tokens];
    let mut wf = vec![0f32; cols];
    let nc = cols / CHUNK;
    let mut chunks = vec![DecodedChunk::ZERO; nc];
    let mut offsets = vec![[0f32; 2]; nc];
    for r in 0..rows {
        dequantize_to_f32(w.ty, w.row(r), &mut wf).unwrap();
        let quantized = decoded::is_block_quantized(w.ty);
        if quantized {
            decode_row_scalar(w.ty, w.row(r), &mut chunks, &mut offsets);
        }
        for t in 0..n_tokens {
            let xt = &x[t * cols..(t + 1) * cols];
            if !quantized {
                let s: f32 = wf.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                out[t * rows + r] = (0.0, 2.0 * (cols as f32 + 64.0) * eps * s);
                continue;
            }
            let (mut quant, mut s) = (0f32, 0f32);
            for c in 0..nc {
                let xc = &xt[c * CHUNK..(c + 1) * CHUNK];
                let mut q = [0i8; CHUNK];
                let (dx, _) = quantize_chunk_scalar(xc, &mut q);
                let wc = &wf[c * CHUNK..(c + 1) * CHUNK];
                quant += dx / 2.0 * wc.iter().map(|v| v.abs()).sum::<f32>();
                for e in 0..CHUNK {
                    let raw = chunks[c].q[e];
                    let qv = if decoded::is_signed(w.ty) {
                        f32::from(raw as i8)
                    } else {
                        f32::from(raw)
                    };
                    let term = (chunks[c].scale[e / 4] * qv).abs() + offsets[c][e / 16].abs();
                    s += term * (xc[e].abs() + dx);
                }
            }
            out[t * rows + r] = (quant * 1.0001, (cols as f32 + 64.0) * eps * s);
        }
    }
    out
}

/// The bits of `w` × `n_tokens` tokens of `x` on `path`: what the bit-identity tests compare.
fn output_bits(
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    path: KernelPath,
) -> Vec<u32> {
    let mut y = vec![0f32; w.rows * n_tokens];
    matmul_with_path(pool, w, x, n_tokens, &mut y, path).unwrap();
    bits(&y)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn matrix(ty: GgmlType, rows: usize, cols: usize, data: &[u8]) -> WeightMatrix<'_> {
    WeightMatrix::rows(ty, rows, cols, data)
}

/// Every type on every available path, against the exact reference and the scalar twin, for
/// mat-vec and small and ragged mat-mat shapes (7 rows: a partial row tile; 5 tokens: a
/// partial token tile; 17 blocks per row for 32-element types).
#[test]
fn every_type_and_path_agrees_with_the_reference_within_bounds() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let rows = 7;
    for ty in QUANTIZED.into_iter().chain(FLOATS) {
        // 17 blocks for the 32-element types: two groups of eight and a tail in the batched
        // AVX2 mat-vec; 2 super-blocks for the rest.
        let cols = if ty.block_size() == 32 { 544 } else { 512 };
        let data = random_weights(&mut rng, ty, rows, cols);
        let w = matrix(ty, rows, cols, &data);
        // 1-4 tokens: the fused (batched) mat-vec on AVX2; 5: the tiled mat-mat.
        for n_tokens in [1, 2, 3, 4, 5] {
            let x = random_activations(&mut rng, n_tokens * cols);
            let bound = bounds(&w, &x, n_tokens);
            let mut exact = vec![0f32; rows * n_tokens];
            matmul_reference(&pool, &w, &x, n_tokens, &mut exact).unwrap();
            let mut twin = vec![f32::NAN; rows * n_tokens];
            matmul_with_path(&pool, &w, &x, n_tokens, &mut twin, KernelPath::Scalar).unwrap();
            for path in KernelPath::available() {
                let mut y = vec![f32::NAN; rows * n_tokens];
                matmul_with_path(&pool, &w, &x, n_tokens, &mut y, path).unwrap();
                for (i, &(quant, sum)) in bound.iter().enumerate() {
                    let err = (y[i] - exact[i]).abs();
                    assert!(
                        err <= quant + 2.0 * sum,
                        "{ty} {path:?} tokens {n_tokens} out {i}: {} vs exact {} \
                         (err {err}, bound {quant} + {})",
                        y[i],
                        exact[i],
                        2.0 * sum
                    );
                    let twin_err = (y[i] - twin[i]).abs();
                    assert!(
                        twin_err <= 2.0 * sum,
                        "{ty} {path:?} tokens {n_tokens} out {i}: {} vs scalar twin {} \
                         (err {twin_err}, bound {})",
                        y[i],
                        twin[i],
                        2.0 * sum
                    );
                }
            }
        }
    }
}

/// The quantization bound is not vacuous: on typical data the fast result is much closer to the
/// exact one than to zero.
#[test]
fn quantized_results_are_close_in_relative_terms() {
    let pool = ThreadPool::new(1);
    let mut rng = Rng(99);
    let (rows, cols) = (16, 1024);
    for ty in QUANTIZED {
        let data = random_weights(&mut rng, ty, rows, cols);
        let w = matrix(ty, rows, cols, &data);
        let x: Vec<f32> = (0..cols).map(|_| random_f32(&mut rng)).collect();
        let mut exact = vec![0f32; rows];
        let mut fast = vec![0f32; rows];
        matmul_reference(&pool, &w, &x, 1, &mut exact).unwrap();
        matmul(&pool, &w, &x, 1, &mut fast).unwrap();
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        let diff: Vec<f32> = exact.iter().zip(&fast).map(|(a, b)| a - b).collect();
        assert!(
            norm(&diff) <= 0.02 * norm(&exact),
            "{ty}: relative error {}",
            norm(&diff) / norm(&exact)
        );
    }
}

/// Each output is computed by one thread with the same operations whatever the split, so
/// different thread counts give bit-identical results on every path.
#[test]
fn thread_counts_give_bit_identical_results() {
    let mut rng = Rng(5);
    let (rows, cols, n_tokens) = (66, 1024, 4);
    let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q6_K,
        GgmlType::F16,
    ] {
        let data = random_weights(&mut rng, ty, rows, cols);
        let w = matrix(ty, rows, cols, &data);
        let x = random_activations(&mut rng, n_tokens * cols);
        for path in KernelPath::available() {
            let results: Vec<Vec<u32>> = pools
                .iter()
                .map(|pool| output_bits(pool, &w, &x, n_tokens, path))
                .collect();
            assert_eq!(results[0], results[1], "{ty} {path:?}: 1 vs 2 threads");
            assert_eq!(results[0], results[2], "{ty} {path:?}: 1 vs 3 threads");
        }
    }
}

/// Mat-mat gives, for each token, the mat-vec result of that token alone: exactly on the paths
/// that share one tile kernel, and up to summation order (the twin bound) on AVX2, whose
/// mat-vec consumes decoded chunks in registers with its own accumulation order.
/// Batch invariance at the kernel level: a token's outputs are bit-identical whether it is
/// multiplied alone (the decode step), with up to three others (the fused 1–4 token kernel) or
/// in a long run (the tiles), for every type and path. The model relies on this for a
/// sequence's logits not to depend on what else is in its batch.
#[test]
fn matmat_equals_matvec_per_token() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng(11);
    let (rows, cols) = (9, 256);
    for ty in GgmlType::all().filter(|&ty| is_supported(ty)) {
        let data = random_weights(&mut rng, ty, rows, cols);
        let w = matrix(ty, rows, cols, &data);
        for n_tokens in [2, 3, 4, 7] {
            let x = random_activations(&mut rng, n_tokens * cols);
            for path in KernelPath::available() {
                let mut all = vec![0f32; rows * n_tokens];
                matmul_with_path(&pool, &w, &x, n_tokens, &mut all, path).unwrap();
                for t in 0..n_tokens {
                    let mut one = vec![0f32; rows];
                    let xt = &x[t * cols..(t + 1) * cols];
                    matmul_with_path(&pool, &w, xt, 1, &mut one, path).unwrap();
                    for r in 0..rows {
                        let (a, b) = (one[r], all[t * rows + r]);
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{ty} {path:?} {n_tokens} tokens, t {t} r {r}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

/// With long rows the mat-mat loops split rows and tokens into several cache blocks (8192
/// columns: blocks of 8 rows and 16 tokens); ragged counts of both still produce every output,
/// within bounds and identically for any thread count.
#[test]
fn cache_blocks_cover_every_output() {
    let mut rng = Rng(77);
    let (rows, cols, n_tokens) = (21, 8192, 37);
    let pools = [ThreadPool::new(1), ThreadPool::new(3)];
    for ty in [GgmlType::Q4_1, GgmlType::Q6_K] {
        let data = random_weights(&mut rng, ty, rows, cols);
        let w = matrix(ty, rows, cols, &data);
        let x = random_activations(&mut rng, n_tokens * cols);
        let bound = bounds(&w, &x, n_tokens);
        let mut exact = vec![0f32; rows * n_tokens];
        matmul_reference(&pools[0], &w, &x, n_tokens, &mut exact).unwrap();
        for path in KernelPath::available() {
            let results: Vec<Vec<f32>> = pools
                .iter()
                .map(|pool| {
                    let mut y = vec![f32::NAN; rows * n_tokens];
                    matmul_with_path(pool, &w, &x, n_tokens, &mut y, path).unwrap();
                    y
                })
                .collect();
            assert_eq!(bits(&results[0]), bits(&results[1]), "{ty} {path:?}");
            for (i, &(quant, sum)) in bound.iter().enumerate() {
                let err = (results[0][i] - exact[i]).abs();
                assert!(err <= quant + 2.0 * sum, "{ty} {path:?} out {i}: err {err}");
            }
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod avx2_twins {
    use super::*;

    /// Each AVX2 decoder writes exactly what the scalar decoder writes.
    #[test]
    fn avx2_decoders_match_scalar_exactly() {
        if !KernelPath::Avx2.is_available() {
            return;
        }
        let mut rng = Rng(0xDEC0DE);
        for ty in QUANTIZED {
            for _ in 0..20 {
                let data = random_weights(&mut rng, ty, 1, 512);
                let nc = 512 / CHUNK;
                let mut want = (vec![DecodedChunk::ZERO; nc], vec![[0f32; 2]; nc]);
                let mut got = (vec![DecodedChunk::ZERO; nc], vec![[9f32; 2]; nc]);
                decode_row_scalar(ty, &data, &mut want.0, &mut want.1);
                // SAFETY: AVX2 is available (checked above); lengths match.
                unsafe { avx2::decode_row(ty, &data, &mut got.0, &mut got.1) };
                for c in 0..nc {
                    assert_eq!(want.0[c].q, got.0[c].q, "{ty} chunk {c} quants");
                    assert_eq!(want.0[c].scale, got.0[c].scale, "{ty} chunk {c} scales");
                    assert_eq!(want.1[c], got.1[c], "{ty} chunk {c} offsets");
                }
            }
        }
    }

    /// The AVX2 activation quantizer is bit-identical to the scalar one, including rounding ties,
    /// values that round to ±127, all-zero chunks and sign handling.
    #[test]
    fn avx2_activation_quantizer_matches_scalar_exactly() {
        if !KernelPath::Avx2.is_available() {
            return;
        }
        let mut rng = Rng(0xACE);
        let mut x = random_activations(&mut rng, 64 * CHUNK);
        // Chunk 1: exact ties (amax 127 makes the step 1, so k + 0.5 is a tie).
        for (i, v) in x[CHUNK..2 * CHUNK].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) + 0.5;
        }
        x[CHUNK] = 127.0;
        // Chunk 2: zeros; chunk 3: one value; chunk 4: tiny values.
        x[2 * CHUNK..3 * CHUNK].fill(0.0);
        x[3 * CHUNK..4 * CHUNK].fill(0.0);
        x[3 * CHUNK + 5] = -3.0;
        for v in &mut x[4 * CHUNK..5 * CHUNK] {
            *v *= 1e-30;
        }
        // Chunk 5: values just below ties.
        for (i, v) in x[5 * CHUNK..6 * CHUNK].iter_mut().enumerate() {
            *v = f32::from_bits(((i as f32 - 16.0) + 0.5).to_bits() - 1);
        }
        x[5 * CHUNK + 31] = 127.0;
        let n = x.len() / CHUNK;
        let mut want = (vec![[0i8; CHUNK]; n], vec![0f32; n], vec![[0f32; 2]; n]);
        let mut got = (vec![[0i8; CHUNK]; n], vec![0f32; n], vec![[0f32; 2]; n]);
        quantize_tokens_scalar(&x, &mut want.0, &mut want.1, &mut want.2);
        // SAFETY: AVX2 is available; lengths match.
        unsafe { avx2::quantize_tokens(&x, &mut got.0, &mut got.1, &mut got.2) };
        for c in 0..n {
            assert_eq!(want.0[c], got.0[c], "chunk {c} quants");
            assert_eq!(want.1[c].to_bits(), got.1[c].to_bits(), "chunk {c} scale");
            assert_eq!(want.2[c], got.2[c], "chunk {c} sums");
        }
    }
}

/// The x86 paths' quantized kernels (`lanes`: the interleaved mat-vec in sweeps of one to
/// eight tokens, and the rows-in-lanes tile over groups unpacked from either layout) give, for every
/// output, the bits of their scalar twin `portable::dot_block_sums_scalar`, on AVX2 and on
/// AVX-512: every quantized type, both weight layouts, partial last groups of rows (7, 13, 21
/// rows), token counts that are and are not multiples of a sweep, one and several cache blocks
/// of rows and tokens (8192 columns), on one thread and two. So a token's result cannot depend
/// on the kernel, batch or x86 path that computed it. AVX-512 is checked only where the CPU
/// has it.
#[cfg(target_arch = "x86_64")]
#[test]
fn x86_paths_give_their_scalar_twins_bits() {
    let paths = available_x86_paths();
    if !KernelPath::Avx512.is_available() {
        eprintln!("skipped: this CPU has no AVX-512 (F, BW, VL, VNNI)");
    }
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let mut rng = Rng(0x512);
    for ty in QUANTIZED {
        let shapes: &[(usize, usize, &[usize])] = if ty.block_size() == 256 {
            &[(13, 512, &[1, 2, 3, 4, 5, 6, 8, 9]), (16, 8192, &[37])]
        } else {
            &[
                (7, 544, &[1, 3, 4, 7, 8, 10]),
                (24, 96, &[2, 9, 11]),
                (21, 8192, &[37]),
            ]
        };
        for &(rows, cols, token_counts) in shapes {
            let data = random_weights(&mut rng, ty, rows, cols);
            for &n_tokens in token_counts {
                let x = random_activations(&mut rng, n_tokens * cols);
                assert_x86_paths_give_twin_bits(ty, (rows, cols, &data), &x, &paths, &pools);
            }
        }
    }
}

/// The x86 paths (AVX2, AVX-512) this CPU has.
#[cfg(target_arch = "x86_64")]
fn available_x86_paths() -> Vec<KernelPath> {
    [KernelPath::Avx2, KernelPath::Avx512]
        .into_iter()
        .filter(|p| p.is_available())
        .collect()
}

/// For `x` (whole tokens of `w`'s columns) through the matrix `(rows, cols, data)` of type
/// `ty`, in both weight layouts, on each pool and path: every output has the bits of the
/// scalar twin `portable::dot_block_sums_scalar`.
#[cfg(target_arch = "x86_64")]
fn assert_x86_paths_give_twin_bits(
    ty: GgmlType,
    (rows, cols, data): (usize, usize, &[u8]),
    x: &[f32],
    paths: &[KernelPath],
    pools: &[ThreadPool],
) {
    let w = matrix(ty, rows, cols, data);
    let packed = ArenaWeights::interleaved(&w, |_| {});
    let mut layouts = vec![w];
    layouts.extend(packed.as_ref().map(|p| p.matrix()));
    let nc = cols / CHUNK;
    let n_tokens = x.len() / cols;
    let (mut chunks, mut offsets) = (vec![DecodedChunk::ZERO; nc], vec![[0f32; 2]; nc]);
    let mut acts = QuantizedActivations::default();
    quantize_activations(&pools[0], KernelPath::Scalar, x, n_tokens, cols, &mut acts);
    let mut want = vec![0u32; rows * n_tokens];
    for r in 0..rows {
        decode_row_scalar(ty, layouts[0].row(r), &mut chunks, &mut offsets);
        for t in 0..n_tokens {
            let at = t * nc..(t + 1) * nc;
            want[t * rows + r] = portable::dot_block_sums_scalar(
                is_signed(ty),
                has_half_scales(ty),
                (has_offset(ty), offset_multiple(ty)),
                &chunks,
                &offsets,
                &acts.q[at.clone()],
                &acts.d[at.clone()],
                &acts.half_sums[at.clone()],
                &acts.chunk_sums[at],
            )
            .to_bits();
        }
    }
    for m in &layouts {
        for pool in pools {
            for &path in paths {
                assert_eq!(
                    output_bits(pool, m, x, n_tokens, path),
                    want,
                    "{ty} {rows}×{cols} {:?}, {n_tokens} tokens, {} threads, {path:?}",
                    m.layout,
                    pool.n_threads()
                );
            }
        }
    }
}

/// The integer sums cannot overflow: every quant at its largest value (all bits of every
/// block set, its f16 scales 1.0) against activations that all quantize to 127 give the twin's
/// bits on both x86 paths (AVX2 adds up to eight groups' `maddubs` pairs in 16 bits for 4-bit
/// quants, `lanes::Maddubs`), through the mat-vec and the tile.
#[cfg(target_arch = "x86_64")]
#[test]
fn largest_quants_and_activations_give_the_twins_bits() {
    let paths = available_x86_paths();
    let pools = [ThreadPool::new(1)];
    let (rows, cols) = (24, 512);
    for ty in QUANTIZED {
        let mut block = vec![0xFFu8; ty.type_size()];
        // Where each type keeps its f16 scales (GGUF's block layouts).
        let f16_at: &[usize] = match ty {
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            _ => &[0],
        };
        for &at in f16_at {
            block[at..at + 2].copy_from_slice(&half::f16::ONE.to_le_bytes());
        }
        let data = block.repeat(rows * cols / ty.block_size());
        for n_tokens in [3, 9] {
            let x = vec![1.0f32; n_tokens * cols];
            assert_x86_paths_give_twin_bits(ty, (rows, cols, &data), &x, &paths, &pools);
        }
    }
}

/// The AVX-512 float tile (two tokens per register) gives the AVX2 tile's bits: F32, F16 and
/// BF16 weights, full and partial row tiles, token counts below, at and past its eight, and
/// columns that are and are not a multiple of eight.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_float_tile_gives_the_avx2_bits() {
    if !KernelPath::Avx512.is_available() {
        eprintln!("skipped: this CPU has no AVX-512 (F, BW, VL, VNNI)");
        return;
    }
    let pool = ThreadPool::new(2);
    let mut rng = Rng(0xf512);
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        for &(rows, cols) in &[(7, 64), (16, 100), (5, 8)] {
            let data = random_weights(&mut rng, ty, rows, cols);
            let w = matrix(ty, rows, cols, &data);
            for n_tokens in [1, 7, 8, 9, 16, 19] {
                let x = random_activations(&mut rng, n_tokens * cols);
                let run = |path| output_bits(&pool, &w, &x, n_tokens, path);
                assert_eq!(
                    run(KernelPath::Avx2),
                    run(KernelPath::Avx512),
                    "{ty} {rows}×{cols}, {n_tokens} tokens"
                );
            }
        }
    }
}

/// A float matmul blocked into row chunks and token blocks gives each token the bits it gets
/// alone, on one thread or two: rows past one chunk, tokens past one block.
#[test]
fn float_matmul_blocking_keeps_each_tokens_bits() {
    let mut rng = Rng(0xb10c);
    let (rows, cols, n_tokens) = (200, 1024, 21);
    for ty in [GgmlType::F32, GgmlType::F16] {
        let data = random_weights(&mut rng, ty, rows, cols);
        let w = matrix(ty, rows, cols, &data);
        let x = random_activations(&mut rng, n_tokens * cols);
        for threads in [1, 2] {
            let pool = ThreadPool::new(threads);
            let mut all = vec![0f32; rows * n_tokens];
            matmul(&pool, &w, &x, n_tokens, &mut all).unwrap();
            for t in 0..n_tokens {
                let mut one = vec![0f32; rows];
                matmul(&pool, &w, &x[t * cols..(t + 1) * cols], 1, &mut one).unwrap();
                assert_eq!(
                    bits(&one),
                    bits(&all[t * rows..(t + 1) * rows]),
                    "{ty}, token {t}, {threads} threads"
                );
            }
        }
    }
}

/// The row-major quantized paths (portable, NEON where the CPU has it, and the scalar twin)
/// give each token the bits it gets alone, on one thread or two, whether the call decodes one
/// row tile at a time (every token in one token block: decode steps, short prompts) or
/// blocks of rows reused across token blocks (long prompts): 200 rows of 512 columns span
/// several row blocks, and 300 tokens two token blocks.
#[test]
fn quantized_row_major_blocking_keeps_each_tokens_bits() {
    let mut rng = Rng(0xb10d);
    let (rows, cols, n_tokens) = (200, 512, 300);
    let paths = [KernelPath::Portable, KernelPath::Neon, KernelPath::Scalar];
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q6_K] {
        let data = random_weights(&mut rng, ty, rows, cols);
        let w = matrix(ty, rows, cols, &data);
        let x = random_activations(&mut rng, n_tokens * cols);
        for path in paths.into_iter().filter(|p| p.is_available()) {
            for threads in [1, 2] {
                let pool = ThreadPool::new(threads);
                let all = output_bits(&pool, &w, &x, n_tokens, path);
                for t in [0, 1, 150, 277, 278, 299] {
                    let one = output_bits(&pool, &w, &x[t * cols..(t + 1) * cols], 1, path);
                    assert_eq!(
                        one,
                        all[t * rows..(t + 1) * rows],
                        "{ty} {path:?}, token {t}, {threads} threads"
                    );
                }
            }
        }
    }
}

/// The NEON path gives the portable path's bits exactly (`neon`'s docs say why it can):
/// every quantized type, with full and partial row and token tiles, one token (decode) and
/// many (prefill). Runs only on arm64 with the dot product extension
/// (`scripts/test-arm64.sh` runs it under qemu).
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_path_gives_the_portable_bits() {
    assert!(
        KernelPath::Neon.is_available(),
        "this arm64 CPU has no dot product instructions (qemu's default CPU has them)"
    );
    let pool = ThreadPool::new(2);
    let mut rng = Rng(0xa64);
    for ty in QUANTIZED {
        let shapes: &[(usize, usize)] = if ty.block_size() == 256 {
            &[(7, 512), (16, 768)]
        } else {
            &[(7, 544), (16, 96), (1, 32)]
        };
        for &(rows, cols) in shapes {
            let data = random_weights(&mut rng, ty, rows, cols);
            let w = matrix(ty, rows, cols, &data);
            for n_tokens in [1, 2, 3, 5] {
                let x = random_activations(&mut rng, n_tokens * cols);
                let run = |path| output_bits(&pool, &w, &x, n_tokens, path);
                assert_eq!(
                    run(KernelPath::Portable),
                    run(KernelPath::Neon),
                    "{ty} {rows}×{cols}, {n_tokens} tokens"
                );
            }
        }
    }
}

/// NaN or infinite activations make the outputs they reach non-finite on every path, as in
/// the exact product (a quantizer that skipped them would hide a broken model): NaN from a NaN;
/// NaN or ±∞ from an infinity (the AVX-512 path, which sums a chunk in integers before scaling
/// it, can give the ±∞ of the exact product where the others give NaN).
#[test]
fn nan_and_infinite_activations_propagate() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng(3);
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q6_K,
        GgmlType::IQ4_XS,
    ] {
        let (rows, cols) = (5, 256);
        let data = random_weights(&mut rng, ty, rows, cols);
        let w = matrix(ty, rows, cols, &data);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 37, 255] {
                let mut x = random_activations(&mut rng, 2 * cols);
                x[cols + at] = bad;
                for path in KernelPath::available() {
                    for n_tokens in [1, 2] {
                        let xs = &x[(2 - n_tokens) * cols..];
                        let mut y = vec![0f32; rows * n_tokens];
                        matmul_with_path(&pool, &w, xs, n_tokens, &mut y, path).unwrap();
                        let last = &y[(n_tokens - 1) * rows..];
                        assert!(
                            last.iter().all(|v| if bad.is_nan() {
                                v.is_nan()
                            } else {
                                !v.is_finite()
                            }),
                            "{ty} {path:?} {bad} at {at}: {last:?}"
                        );
                        if n_tokens == 2 {
                            assert!(y[..rows].iter().all(|v| v.is_finite()), "{ty} {path:?}");
                        }
                    }
                }
            }
        }
    }
}

/// Sharing the activation quantization between weights changes nothing in the results.
#[test]
fn shared_input_matmul_equals_separate_calls() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng(21);
    let cols = 256;
    let types = [
        GgmlType::Q4_1,
        GgmlType::Q6_K,
        GgmlType::F16,
        GgmlType::Q8_0,
    ];
    let data: Vec<Vec<u8>> = types
        .iter()
        .enumerate()
        .map(|(i, &ty)| random_weights(&mut rng, ty, 5 + i, cols))
        .collect();
    let ws: Vec<WeightMatrix> = types
        .iter()
        .enumerate()
        .map(|(i, &ty)| matrix(ty, 5 + i, cols, &data[i]))
        .collect();
    for n_tokens in [1, 3, 6] {
        let x = random_activations(&mut rng, n_tokens * cols);
        let mut shared: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; w.rows * n_tokens]).collect();
        let mut outs: Vec<&mut [f32]> = shared.iter_mut().map(|v| v.as_mut_slice()).collect();
        let refs: Vec<&WeightMatrix> = ws.iter().collect();
        matmul_shared_input(&pool, &refs, &x, n_tokens, &mut outs).unwrap();
        for (w, got) in ws.iter().zip(&shared) {
            let mut want = vec![0.0; w.rows * n_tokens];
            matmul(&pool, w, &x, n_tokens, &mut want).unwrap();
            assert_eq!(&want, got, "{} {n_tokens} tokens", w.ty);
        }
    }
    // Mismatched counts and columns are errors.
    let refs: Vec<&WeightMatrix> = ws.iter().collect();
    assert!(matmul_shared_input(&pool, &refs, &[0.0; 256], 1, &mut []).is_err());
    let narrow = matrix(GgmlType::Q4_1, 1, 32, &data[0][..20]);
    let mut y1 = [0.0; 5];
    let mut y2 = [0.0; 1];
    let two: [&WeightMatrix; 2] = [&ws[0], &narrow];
    assert!(matmul_shared_input(&pool, &two, &[0.0; 256], 1, &mut [&mut y1, &mut y2]).is_err());
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let pool = ThreadPool::new(2);
    let data = vec![0u8; 2 * 20]; // two Q4_1 blocks: 1 row of 64, or 2 rows of 32
    let w = matrix(GgmlType::Q4_1, 2, 32, &data);
    let mut y = vec![0f32; 2];
    assert!(matches!(
        matmul(&pool, &w, &[0.0; 31], 1, &mut y),
        Err(KernelError::Shape(_))
    ));
    assert!(matches!(
        matmul(&pool, &w, &[0.0; 32], 1, &mut y[..1]),
        Err(KernelError::Shape(_))
    ));
    assert!(matches!(
        matmul(&pool, &w, &[0.0; 64], usize::MAX, &mut y),
        Err(KernelError::Shape(_))
    ));
    // Data not matching rows × row bytes, and columns not a whole number of blocks.
    let short = matrix(GgmlType::Q4_1, 3, 32, &data);
    assert!(matches!(
        matmul(&pool, &short, &[0.0; 32], 1, &mut [0.0; 3]),
        Err(KernelError::Shape(_))
    ));
    let ragged = matrix(GgmlType::Q4_1, 1, 48, &data[..30]);
    assert!(matches!(
        matmul(&pool, &ragged, &[0.0; 48], 1, &mut [0.0; 1]),
        Err(KernelError::Shape(_))
    ));
    let unsupported = matrix(GgmlType::Q8_K, 1, 256, &[0u8; 292]);
    assert!(matches!(
        matmul(&pool, &unsupported, &[0.0; 256], 1, &mut [0.0; 1]),
        Err(KernelError::UnsupportedType { .. })
    ));
    assert!(matmul(&pool, &w, &[], 0, &mut []).is_ok());
    // Zero columns: every output is an empty sum, on every path and type family.
    for ty in [GgmlType::Q4_1, GgmlType::Q6_K, GgmlType::F16] {
        let empty = matrix(ty, 3, 0, &[]);
        for path in KernelPath::available() {
            let mut y = vec![f32::NAN; 6];
            matmul_with_path(&pool, &empty, &[], 2, &mut y, path).unwrap();
            assert_eq!(y, [0.0; 6], "{ty} {path:?}");
        }
    }
    assert!(matmul(&pool, &w, &[0.0; 32], 1, &mut y).is_ok());
}

#[test]
fn unavailable_paths_are_refused() {
    let pool = ThreadPool::new(1);
    let data = vec![0u8; 20];
    let w = matrix(GgmlType::Q4_1, 1, 32, &data);
    for path in KernelPath::ALL {
        let result = matmul_with_path(&pool, &w, &[0.0; 32], 1, &mut [0.0], path);
        assert_eq!(result.is_ok(), path.is_available(), "{path:?}");
    }
    assert!(KernelPath::best().is_available());
}

/// Widening the KV cache: every path gives every f16 value exactly (NaNs as NaNs), for every
/// one of the 65536 bit patterns, at lengths that exercise the 8-wide body and the tail.
#[test]
fn widen_f16_paths_are_exact_for_every_value() {
    let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
    for path in KernelPath::available() {
        for len in [all.len(), 13, 8, 7, 0] {
            let src = &all[all.len() - len..];
            let mut dst = vec![0f32; len];
            widen_f16_with_path(path, src, &mut dst);
            for (s, d) in src.iter().zip(&dst) {
                let want = s.to_f32();
                assert!(
                    want.to_bits() == d.to_bits() || (want.is_nan() && d.is_nan()),
                    "{path:?}: {s:?} widened to {d}, expected {want}"
                );
            }
        }
    }
}

/// The attention kernels: every path gives the portable code's bits, for odd sizes too.
#[test]
fn attention_kernels_are_bit_identical_on_every_path() {
    let mut rng = Rng(7);
    for (rows, dim, n) in [
        (3, 64, 64),
        (1, 64, 1),
        (5, 48, 19),
        (4, 128, 37),
        (11, 32, 24),
        (16, 256, 64),
    ] {
        let q = random_activations(&mut rng, rows * dim);
        let stride = n + 5;
        let kt = random_activations(&mut rng, dim * stride);
        let values = random_activations(&mut rng, n * dim);
        let weights = random_activations(&mut rng, n);
        let mut want_scores = vec![0f32; rows * n];
        super::attention::scores_transposed_body(
            &q,
            dim,
            &kt,
            stride,
            3..3 + n,
            0.125,
            &mut want_scores,
        );
        let mut want_sum = random_activations(&mut rng, dim);
        let start = want_sum.clone();
        super::attention::weighted_sum_body(&mut want_sum, &weights, &values);
        for path in KernelPath::available() {
            let mut scores = vec![0f32; rows * n];
            scores_transposed_with_path(path, &q, dim, &kt, stride, 3..3 + n, 0.125, &mut scores);
            assert!(
                scores
                    .iter()
                    .zip(&want_scores)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{path:?} scores ({rows}, {dim}, {n})"
            );
            let mut sum = start.clone();
            weighted_sum_with_path(path, &mut sum, &weights, &values);
            assert!(
                sum.iter()
                    .zip(&want_sum)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{path:?} weighted sum ({dim}, {n})"
            );
        }
    }
}

/// The weighted sums of several rows at once (a prompt's query heads and tokens that see the
/// same keys) give each row the bits of summing it alone, on every path, with f32 and with f16
/// values: row counts that leave partial groups of four, widths that leave columns past the
/// last eight (or, on AVX-512, past the last sixteen: eight and more for 40, fewer for 36),
/// key counts that leave a tail past the last four.
#[test]
fn weighted_sums_of_many_rows_equal_one_row_at_a_time() {
    let mut rng = Rng(9);
    for (rows, dim, n) in [
        (1, 8, 4),
        (4, 256, 64),
        (7, 36, 13),
        (3, 40, 10),
        (12, 64, 3),
        (9, 5, 9),
    ] {
        let half = |v: Vec<f32>| v.into_iter().map(half::f16::from_f32).collect::<Vec<_>>();
        let values16 = half(random_activations(&mut rng, n * dim));
        let values: Vec<f32> = values16.iter().map(|x| x.to_f32()).collect();
        let weights = random_activations(&mut rng, rows * n);
        let start = random_activations(&mut rng, rows * dim);
        let mut want = start.clone();
        for (y, w) in want.chunks_exact_mut(dim).zip(weights.chunks_exact(n)) {
            super::attention::weighted_sum_body(y, w, &values);
        }
        for path in KernelPath::available() {
            let mut got = start.clone();
            weighted_sum_rows_with_path(path, &mut got, &weights, &values, dim);
            assert_eq!(bits(&got), bits(&want), "{path:?} f32 ({rows}, {dim}, {n})");
            let mut got16 = start.clone();
            weighted_sum_rows_f16_with_path(path, &mut got16, &weights, &values16, dim);
            assert_eq!(
                bits(&got16),
                bits(&want),
                "{path:?} f16 ({rows}, {dim}, {n})"
            );
        }
    }
}

/// The interleaved layout is an exact re-arrangement: every row gathers back to its GGUF
/// bytes, for every type that has the layout and chunk counts with and without a ragged tail
/// of offset terms (`2 · n_chunks` not a multiple of 8).
#[test]
fn interleaved_rows_gather_back_to_their_blocks() {
    let mut rng = Rng(21);
    for ty in GgmlType::all().filter(|&ty| interleaved::has_interleaved_form(ty)) {
        let shapes: &[(usize, usize)] = if ty.block_size() == 256 {
            &[(8, 256), (16, 512), (24, 768)]
        } else {
            &[(8, 32), (16, 96), (24, 576)]
        };
        for &(rows, cols) in shapes {
            let data = random_weights(&mut rng, ty, rows, cols);
            let w = matrix(ty, rows, cols, &data);
            let packed = ArenaWeights::interleaved(&w, |_| {}).unwrap();
            assert_eq!(
                packed.bytes(),
                data.len(),
                "{ty}: the layout keeps the size"
            );
            let p = packed.matrix();
            let mut buf = Vec::new();
            for r in 0..rows {
                assert_eq!(
                    p.row_blocks(r, &mut buf),
                    w.row(r),
                    "{ty} {rows}×{cols} row {r}"
                );
            }
        }
    }
    // No interleaved form: float types, and row counts that are not whole groups.
    let data = random_weights(&mut rng, GgmlType::F16, 8, 256);
    assert!(ArenaWeights::interleaved(&matrix(GgmlType::F16, 8, 256, &data), |_| {}).is_none());
    let data = random_weights(&mut rng, GgmlType::Q4_1, 9, 64);
    assert!(ArenaWeights::interleaved(&matrix(GgmlType::Q4_1, 9, 64, &data), |_| {}).is_none());
}

/// Every kernel gives bit-identical results on the interleaved layout and on GGUF's: the
/// interleaved mat-vec (1 to 8 tokens on AVX2) keeps the tiles' operation order, and the other
/// paths and the tiles read gathered rows. Outputs with long and ragged chunk counts, several
/// threads, and tokens split the way the scheduler batches them.
#[test]
fn interleaved_layout_gives_bit_identical_results_on_every_path() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng(22);
    for ty in GgmlType::all().filter(|&ty| interleaved::has_interleaved_form(ty)) {
        let shapes: &[(usize, usize)] = if ty.block_size() == 256 {
            &[(8, 256), (40, 512), (16, 1536)]
        } else {
            &[(8, 32), (40, 96), (64, 576), (16, 1536)]
        };
        for &(rows, cols) in shapes {
            let data = random_weights(&mut rng, ty, rows, cols);
            let w = matrix(ty, rows, cols, &data);
            let packed = ArenaWeights::interleaved(&w, |_| {}).unwrap();
            for n_tokens in [1, 2, 3, 4, 5, 8, 9, 20] {
                let x = random_activations(&mut rng, n_tokens * cols);
                for path in KernelPath::available() {
                    let run = |m: &WeightMatrix| output_bits(&pool, m, &x, n_tokens, path);
                    assert_eq!(
                        run(&w),
                        run(&packed.matrix()),
                        "{ty} {rows}×{cols}, {n_tokens} tokens, {path:?}"
                    );
                }
            }
            // And against the exact reference, through the gathered rows.
            let x = random_activations(&mut rng, cols);
            let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
            matmul_reference(&pool, &w, &x, 1, &mut a).unwrap();
            matmul_reference(&pool, &packed.matrix(), &x, 1, &mut b).unwrap();
            assert_eq!(a, b, "{ty}: reference on both layouts");
            let (mut ra, mut rb) = (vec![0f32; cols], vec![0f32; cols]);
            w.dequantize_row(rows - 1, &mut ra).unwrap();
            packed.matrix().dequantize_row(rows - 1, &mut rb).unwrap();
            assert_eq!(ra, rb, "{ty}: embedding lookup on both layouts");
        }
    }
}

/// The attention kernels that read the f16 cache directly give the bits of widening first and
/// running the f32 bodies, on every path (the AVX2 and AVX-512 kernels and their scalar twins), including
/// ragged key counts and value widths that are not multiples of eight. Fewer than eight keys
/// are scored eight columns at a time from within each row of keys (columns `3..3 + n` of
/// rows of `n + 5`: from the first key for `n` = 7, from before it for 3 and 5), or one at a
/// time where a row is narrower than eight (`n` = 1, 2).
#[test]
fn f16_attention_kernels_equal_widening_first() {
    let mut rng = Rng(8);
    for (rows, dim, n) in [
        (3, 64, 64),
        (1, 64, 1),
        (2, 16, 2),
        (3, 64, 3),
        (4, 256, 5),
        (6, 32, 7),
        (5, 48, 19),
        (4, 128, 37),
        (2, 20, 11),
        (9, 256, 64),
        (13, 36, 29),
        // Wide enough for the AVX-512 kernel's runs of 16-key registers, with keys left over.
        (1, 64, 64),
        (1, 24, 100),
        (2, 32, 45),
        (6, 64, 48),
        (7, 40, 77),
    ] {
        let q = random_activations(&mut rng, rows * dim);
        let stride = n + 5;
        let half = |v: Vec<f32>| v.into_iter().map(half::f16::from_f32).collect::<Vec<_>>();
        let kt16 = half(random_activations(&mut rng, dim * stride));
        let values16 = half(random_activations(&mut rng, n * dim));
        let widen = |v: &[half::f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let (kt, values) = (widen(&kt16), widen(&values16));
        let weights = random_activations(&mut rng, n);
        let mut want_scores = vec![0f32; rows * n];
        super::attention::scores_transposed_body(
            &q,
            dim,
            &kt,
            stride,
            3..3 + n,
            0.125,
            &mut want_scores,
        );
        let start = random_activations(&mut rng, dim);
        let mut want_sum = start.clone();
        super::attention::weighted_sum_body(&mut want_sum, &weights, &values);
        for path in KernelPath::available() {
            let mut scores = vec![0f32; rows * n];
            scores_transposed_f16_with_path(
                path,
                &q,
                dim,
                &kt16,
                stride,
                3..3 + n,
                0.125,
                &mut scores,
            );
            assert_eq!(
                bits(&scores),
                bits(&want_scores),
                "{path:?} scores ({rows}, {dim}, {n})"
            );
            let mut sum = start.clone();
            weighted_sum_f16_with_path(path, &mut sum, &weights, &values16);
            assert_eq!(
                bits(&sum),
                bits(&want_sum),
                "{path:?} weighted sum ({dim}, {n})"
            );
        }
    }
}

/// Attention's online softmax step on this CPU's path (the portable body compiled for AVX2, or
/// for AVX-512 where the CPU has it) gives the bits of the body compiled for the baseline:
/// the weights, the running maximum and sum, and the rescaled outputs, over blocks that raise
/// the maximum (what was accumulated is rescaled), lengths that are not multiples of eight or
/// sixteen, and masked (−∞) scores.
#[test]
fn online_softmax_step_equals_the_portable_body() {
    let mut rng = Rng(11);
    for lens in [[64, 64, 64], [7, 33, 64], [1, 16, 17], [64, 5, 40]] {
        let mut fast = (f32::NEG_INFINITY, 0f32, vec![0f32; 24]);
        let mut body = fast.clone();
        for (block, &n) in lens.iter().enumerate() {
            // Later blocks score higher, so the maximum rises and the outputs are rescaled.
            let mut scores: Vec<f32> = random_activations(&mut rng, n)
                .iter()
                .map(|v| v * 4.0 + block as f32 * 3.0)
                .collect();
            for masked in scores.iter_mut().skip(2).step_by(5) {
                *masked = f32::NEG_INFINITY;
            }
            let mut scores_body = scores.clone();
            let (max, sum, oh) = (&mut fast.0, &mut fast.1, &mut fast.2);
            let weights = online_softmax_step(&mut scores, max, sum, oh).to_vec();
            let (max, sum, oh) = (&mut body.0, &mut body.1, &mut body.2);
            let weights_body =
                super::attention::online_softmax_step_body(&mut scores_body, max, sum, oh).to_vec();
            assert_eq!(
                bits(&weights),
                bits(&weights_body),
                "weights of block {block} of {lens:?}"
            );
            // Accumulate something into both outputs, as attention's weighted sum would.
            for oh in [&mut fast.2, &mut body.2] {
                for (k, o) in oh.iter_mut().enumerate() {
                    *o += weights[k % n] * (k as f32 + 1.0);
                }
            }
        }
        assert_eq!(fast.0.to_bits(), body.0.to_bits(), "maximum of {lens:?}");
        assert_eq!(fast.1.to_bits(), body.1.to_bits(), "sum of {lens:?}");
        assert_eq!(bits(&fast.2), bits(&body.2), "outputs of {lens:?}");
    }
}

//! Kernels in plain Rust: the scalar twins every SIMD path is checked against, and the tiled
//! "portable" kernels, written with fixed-width lane arrays so that the compiler vectorizes them
//! for whatever target it builds (NEON on arm64 Macs, SSE2 on baseline x86-64).
//!
//! Both work on the decoded form of [`super::decoded`]: the per-type decoding is scalar code
//! shared by the two paths, and its loops over 16 or 32 bytes vectorize as well.

use super::decoded::{DecodedChunk, QuantizedActivations, CHUNK};

/// The exact integer sums `Σ q·x` of a decoded chunk and a chunk of activations, per 16-element
/// half.
fn half_products(signed: bool, chunk: &DecodedChunk, x: &[i8; CHUNK]) -> [i32; 2] {
    let mut halves = [0i32; 2];
    for (i, (&raw, &x)) in chunk.q.iter().zip(x).enumerate() {
        let w = if signed {
            i32::from(raw as i8)
        } else {
            i32::from(raw)
        };
        halves[i / 16] += w * i32::from(x);
    }
    halves
}

/// Scalar twin: `Σ w·x` for one decoded weight row against one token's quantized activations,
/// the integer sums taken per 16-element half exactly as the decoded form defines them.
pub(crate) fn dot_scalar(
    signed: bool,
    chunks: &[DecodedChunk],
    offsets: &[[f32; 2]],
    xq: &[[i8; CHUNK]],
    xd: &[f32],
    x_half_sums: &[[f32; 2]],
) -> f32 {
    let mut acc = 0f32;
    for c in 0..chunks.len() {
        let halves = half_products(signed, &chunks[c], &xq[c]);
        let scaled = chunks[c].scale[0] * halves[0] as f32 + chunks[c].scale[4] * halves[1] as f32;
        acc +=
            xd[c] * scaled + offsets[c][0] * x_half_sums[c][0] + offsets[c][1] * x_half_sums[c][1];
    }
    acc
}

/// Scalar twin of the AVX-512 path's quantized kernels (`super::avx512`), which sum each block
/// in integers before any float work: for one decoded row against one token, per chunk `c`
/// (and per half `h` where `split`, the types with 16-element sub-blocks)
///
/// ```text
/// acc[h] = fma(isum[c][h] as f32, scale[c][h] · dx[c], acc[h])
/// acc[h] = fma(offset[c][h], x_sum[c][h], acc[h])          (types with offsets, k = 0)
/// ```
///
/// with `isum` the exact integer dot product of the half (or of the whole chunk, `h = 0`, when
/// both halves share a scale and an offset) and `x_sum` the activations' half (or chunk) sum;
/// the result is `acc[0] + acc[1]` (`split`) or `acc[0]`. Where the offset is `−k` scales
/// (`offset_multiple` = `k` > 0) it is folded into the integers instead, `isum − k · Σx[c][h]`
/// with `Σx` the quantized activations' integer sum, and there is no second FMA. The SIMD
/// kernels give these bits exactly.
#[cfg(test)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_block_sums_scalar(
    signed: bool,
    split: bool,
    (with_offsets, offset_multiple): (bool, i32),
    chunks: &[DecodedChunk],
    offsets: &[[f32; 2]],
    xq: &[[i8; CHUNK]],
    xd: &[f32],
    x_half_sums: &[[f32; 2]],
    x_chunk_sums: &[f32],
) -> f32 {
    let float_offsets = with_offsets && offset_multiple == 0;
    let mut acc = [0f32; 2];
    for c in 0..chunks.len() {
        let mut halves = half_products(signed, &chunks[c], &xq[c]);
        if with_offsets && offset_multiple != 0 {
            let (first, second) = xq[c].split_at(CHUNK / 2);
            let q_sum = |q: &[i8]| q.iter().map(|&v| i32::from(v)).sum::<i32>();
            halves[0] -= offset_multiple * q_sum(first);
            halves[1] -= offset_multiple * q_sum(second);
        }
        if split {
            for h in 0..2 {
                let factor = chunks[c].scale[4 * h] * xd[c];
                acc[h] = (halves[h] as f32).mul_add(factor, acc[h]);
                if float_offsets {
                    acc[h] = offsets[c][h].mul_add(x_half_sums[c][h], acc[h]);
                }
            }
        } else {
            let factor = chunks[c].scale[0] * xd[c];
            acc[0] = ((halves[0] + halves[1]) as f32).mul_add(factor, acc[0]);
            if float_offsets {
                acc[0] = offsets[c][0].mul_add(x_chunk_sums[c], acc[0]);
            }
        }
    }
    if split {
        acc[0] + acc[1]
    } else {
        acc[0]
    }
}

/// Portable tile: `RM` decoded rows × `RN` tokens, written as plain reductions that the
/// compiler vectorizes (offsets as a separate f32 product). `w` and `offsets` hold the rows back to back (`nc` chunks each); token `j`'s
/// chunks start at `acts` index `(t0 + j) * nc`.
pub(crate) fn tile_portable<const RM: usize, const RN: usize>(
    signed: bool,
    with_offsets: bool,
    w: &[DecodedChunk],
    offsets: &[[f32; 2]],
    acts: &QuantizedActivations,
    t0: usize,
    out: &mut [[f32; RN]; RM],
) {
    if signed {
        tile_portable_typed::<RM, RN, true>(with_offsets, w, offsets, acts, t0, out)
    } else {
        tile_portable_typed::<RM, RN, false>(with_offsets, w, offsets, acts, t0, out)
    }
}

fn tile_portable_typed<const RM: usize, const RN: usize, const SIGNED: bool>(
    with_offsets: bool,
    w: &[DecodedChunk],
    offsets: &[[f32; 2]],
    acts: &QuantizedActivations,
    t0: usize,
    out: &mut [[f32; RN]; RM],
) {
    let nc = acts.n_chunks;
    // Per output, a loop over the chunks with one integer dot product per 16-element half: a
    // plain reduction over contiguous bytes, the shape auto-vectorizers handle best (x86
    // `pmaddwd`, NEON `smlal` or `sdot`). The tile's decoded rows and activations stay in L1
    // across its outputs. (Chunks outermost, with every output's accumulator live, is slower.)
    for (i, out_row) in out.iter_mut().enumerate() {
        let row = &w[i * nc..(i + 1) * nc];
        for (j, o) in out_row.iter_mut().enumerate() {
            let tokens = (t0 + j) * nc..(t0 + j + 1) * nc;
            let (xq, xd) = (&acts.q[tokens.clone()], &acts.d[tokens.clone()]);
            let mut acc = 0f32;
            for ((chunk, x), &dx) in row.iter().zip(xq).zip(xd) {
                let mut halves = [0i32; 2];
                for (h, sum) in halves.iter_mut().enumerate() {
                    let wh = &chunk.q[16 * h..16 * h + 16];
                    let xh = &x[16 * h..16 * h + 16];
                    for (&wv, &xv) in wh.iter().zip(xh) {
                        let wv = if SIGNED {
                            i32::from(wv as i8)
                        } else {
                            i32::from(wv)
                        };
                        *sum += wv * i32::from(xv);
                    }
                }
                acc += (halves[0] as f32 * chunk.scale[0] + halves[1] as f32 * chunk.scale[4]) * dx;
            }
            if with_offsets {
                let offsets = offsets[i * nc..(i + 1) * nc].as_flattened();
                let sums = acts.half_sums[tokens].as_flattened();
                acc += dot_f32_portable(offsets, sums);
            }
            *o = acc;
        }
    }
}

/// Pairwise sum of eight lanes, in the same order as the AVX2 horizontal sum.
#[inline(always)]
pub(crate) fn sum_lanes(l: &[f32; 8]) -> f32 {
    let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let p = [q[0] + q[2], q[1] + q[3]];
    p[0] + p[1]
}

/// `Σ a·b` over equal-length slices, in eight lanes (vectorizable).
pub(crate) fn dot_f32_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() / 8 * 8);
    let (b8, b_tail) = b.split_at(a8.len().min(b.len()));
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    let mut sum = sum_lanes(&lanes);
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

/// Scalar twin of the float-weight kernels: a plain sequential dot product.
pub(crate) fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |s, (x, y)| s + x * y)
}

/// Portable tile for float weights: `RM` f32 rows (each `cols` long, back to back) × `RN`
/// tokens of `x` starting at token `t0`.
pub(crate) fn tile_f32_portable<const RM: usize, const RN: usize>(
    w: &[f32],
    x: &[f32],
    cols: usize,
    t0: usize,
    out: &mut [[f32; RN]; RM],
) {
    for (i, out_row) in out.iter_mut().enumerate() {
        for (j, o) in out_row.iter_mut().enumerate() {
            let xt = &x[(t0 + j) * cols..(t0 + j + 1) * cols];
            *o = dot_f32_portable(&w[i * cols..(i + 1) * cols], xt);
        }
    }
}

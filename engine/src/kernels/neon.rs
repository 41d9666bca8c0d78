//! arm64 kernels with NEON and the `sdot` byte dot product (the ARMv8.2 "dotprod" extension:
//! every Apple M-series core, Graviton 2 and later, Cortex-A76 and later): the quantized tile
//! that prefill and, on this path, decode run.
//!
//! The tile computes exactly what `portable::tile_portable` computes. Its integer half sums
//! (exact in any order) come from `sdot`, four byte products per 32-bit lane, instead of the
//! widening multiplies the compiler makes of the portable loops (the weights are unsigned
//! bytes there, and without `i8mm` NEON has no unsigned-by-signed dot product; the decoded
//! unsigned quants are at most 63, so they are also valid signed bytes and `sdot` serves both
//! kinds). The floating-point operations per output are the portable tile's, in its order,
//! with four rows in the four lanes of one register, so the two paths give the same bits
//! (tested), and the portable path's scalar twin checks both.
//!
//! `sdot` is written as inline assembly: its intrinsic (`vdotq_s32`) is not stable in Rust.
//!
//! Every function here is `unsafe` because it must only run where [`available`] is true.
#![allow(unsafe_code)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::decoded::{DecodedChunk, QuantizedActivations, CHUNK};
use super::portable::dot_f32_portable;

/// Whether this CPU has NEON's dot product instructions (cached by the standard library).
pub(crate) fn available() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `acc + a·b` by groups of four bytes: lane `k` adds `Σ_{i<4} a[4k+i]·b[4k+i]`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` only reads and writes the three vector registers; the function's target
    // features (and the caller's guarantee) make the instruction available.
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// Lane `r`: `Σ_{i<16} w[r][i]·x[i]`, the integer sum of one 16-element half for four rows.
/// The pairwise additions only regroup exact integer sums.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn half_sums(w: &[int8x16_t; 4], x: int8x16_t) -> int32x4_t {
    let zero = vdupq_n_s32(0);
    let (d0, d1) = (sdot(zero, w[0], x), sdot(zero, w[1], x));
    let (d2, d3) = (sdot(zero, w[2], x), sdot(zero, w[3], x));
    vpaddq_s32(vpaddq_s32(d0, d1), vpaddq_s32(d2, d3))
}

/// `RM` decoded rows × `RN` tokens from `t0`, into `out`: the same contract and the same bits
/// as `portable::tile_portable` (whose `signed` flag it needs not: see the module docs).
///
/// Chunks are the outer loop: each chunk's four rows are loaded once and used for all `RN`
/// tokens, with one accumulator register per token. Rows past `RM` (a tile at the matrix's
/// end) repeat the last row; their lanes are computed and dropped.
///
/// # Safety
/// [`available`] must be true. `w` must hold `RM` rows of `acts.n_chunks` chunks back to back,
/// `offsets` as many with `with_offsets`, and `acts` the tokens `t0..t0 + RN` (checked;
/// failing is a caller's bug and panics).
#[target_feature(enable = "neon,dotprod")]
pub(crate) unsafe fn tile<const RM: usize, const RN: usize>(
    with_offsets: bool,
    w: &[DecodedChunk],
    offsets: &[[f32; 2]],
    acts: &QuantizedActivations,
    t0: usize,
    out: &mut [[f32; RN]; RM],
) {
    const { assert!(RM >= 1 && RM <= 4 && RN >= 1) };
    let nc = acts.n_chunks;
    let tokens_end = (t0 + RN) * nc;
    assert!(w.len() >= RM * nc && acts.q.len() >= tokens_end && acts.d.len() >= tokens_end);
    assert!(!with_offsets || (offsets.len() >= RM * nc && acts.half_sums.len() >= tokens_end));
    let first_chunk = |r: usize| r.min(RM - 1) * nc;
    let mut acc = [vdupq_n_f32(0.0); RN];
    for c in 0..nc {
        let mut w_lo = [vdupq_n_s8(0); 4];
        let mut w_hi = [vdupq_n_s8(0); 4];
        let mut scale_lo = [0f32; 4];
        let mut scale_hi = [0f32; 4];
        for r in 0..4 {
            // SAFETY: `first_chunk(r) + c < RM * nc <= w.len()` (asserted above).
            let chunk = w.get_unchecked(first_chunk(r) + c);
            let q = chunk.q.as_ptr().cast::<i8>();
            // SAFETY: `q` points at the chunk's 32 bytes; `vld1q` needs no alignment.
            (w_lo[r], w_hi[r]) = (vld1q_s8(q), vld1q_s8(q.add(CHUNK / 2)));
            (scale_lo[r], scale_hi[r]) = (chunk.scale[0], chunk.scale[4]);
        }
        // SAFETY: four f32 each.
        let scale_lo = vld1q_f32(scale_lo.as_ptr());
        let scale_hi = vld1q_f32(scale_hi.as_ptr());
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let at = (t0 + j) * nc + c;
            // SAFETY: `at < tokens_end <= acts.q.len(), acts.d.len()` (asserted above).
            let (xq, dx) = (acts.q.get_unchecked(at).as_ptr(), *acts.d.get_unchecked(at));
            // SAFETY: `xq` points at the token chunk's 32 bytes.
            let (x_lo, x_hi) = (vld1q_s8(xq), vld1q_s8(xq.add(CHUNK / 2)));
            let lo = vcvtq_f32_s32(half_sums(&w_lo, x_lo));
            let hi = vcvtq_f32_s32(half_sums(&w_hi, x_hi));
            // The portable tile's `(lo · scale[0] + hi · scale[4]) · dx`, then `acc +=`: no
            // fused multiply-adds, which would round differently.
            let scaled = vaddq_f32(vmulq_f32(lo, scale_lo), vmulq_f32(hi, scale_hi));
            *acc_j = vaddq_f32(*acc_j, vmulq_n_f32(scaled, dx));
        }
    }
    for (j, acc_j) in acc.iter().enumerate() {
        let mut lanes = [0f32; 4];
        // SAFETY: `lanes` is four writable f32.
        vst1q_f32(lanes.as_mut_ptr(), *acc_j);
        let tokens = (t0 + j) * nc..(t0 + j + 1) * nc;
        for (i, out_row) in out.iter_mut().enumerate() {
            let mut value = lanes[i];
            if with_offsets {
                let row_offsets = offsets[i * nc..(i + 1) * nc].as_flattened();
                value +=
                    dot_f32_portable(row_offsets, acts.half_sums[tokens.clone()].as_flattened());
            }
            out_row[j] = value;
        }
    }
}

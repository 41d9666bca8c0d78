//! x86-64 AVX-512 (F, BW, VL and VNNI): detection, and the float tile with two tokens per
//! 512-bit register.
//!
//! The AVX-512 path runs the quantized kernels of `super::lanes` with VNNI's `vpdpbusd` as
//! their byte dot product (the AVX2 path runs the same kernels with `maddubs`; the integer sums
//! are exact either way, so both paths give the same bits), and the AVX2 code for everything
//! else (decoding, quantizing activations) but this float tile and three parts of attention:
//! the scores and the weighted sum of many rows with sixteen keys or columns per 512-bit
//! register (`avx2_attention::scores_transposed_f16_wide`, `weighted_sum_rows_f16_wide`), and
//! the online softmax step compiled with AVX-512 ([`online_softmax_step`]). Each performs the
//! AVX2 kernel's operations per output, so the two paths still give the same bits.
//!
//! Every function here is `unsafe` because it must only run where [`available`] is true.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::avx2;

/// Whether this CPU runs the AVX-512 path: the AVX2 path's features (its decoders and float
/// kernels are shared) plus AVX-512 F, BW, VL and VNNI. Detected once by the standard library.
pub(crate) fn available() -> bool {
    avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Tokens in one [`tile_f32`]: four pairs, sixteen 512-bit accumulators for four rows.
pub(crate) const F32_TILE_TOKENS: usize = 8;

/// [`avx2::tile_f32`] for `RM` rows × [`F32_TILE_TOKENS`] tokens of float weights (rows
/// widened to f32 in `w`), two tokens per 512-bit register: each row's eight weights are
/// loaded once, broadcast to both halves, and meet two tokens' activations in one FMA.
///
/// Same bits as the AVX2 tile: every lane accumulates the same columns in the same order with
/// the same FMA, each half is reduced by [`avx2::sum_lanes`], and the columns past the last
/// eight are added the same way.
///
/// # Safety
/// The CPU must pass [`available`]. `w.len() >= RM * cols`, and `x` holds tokens
/// `t0..t0 + F32_TILE_TOKENS` of `cols` values each (checked).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn tile_f32<const RM: usize>(
    w: &[f32],
    x: &[f32],
    cols: usize,
    t0: usize,
    out: &mut [[f32; F32_TILE_TOKENS]; RM],
) {
    const PAIRS: usize = F32_TILE_TOKENS / 2;
    assert!(w.len() >= RM * cols && x.len() >= (t0 + F32_TILE_TOKENS) * cols);
    let n8 = cols / 8 * 8;
    let mut acc = [[_mm512_setzero_ps(); PAIRS]; RM];
    let xp = x.as_ptr().add(t0 * cols);
    let mut c = 0;
    while c < n8 {
        let mut xv = [_mm512_setzero_ps(); PAIRS];
        for (p, v) in xv.iter_mut().enumerate() {
            // SAFETY: (2p + 1) * cols + c + 8 <= F32_TILE_TOKENS * cols, checked above.
            let lo = _mm256_loadu_ps(xp.add(2 * p * cols + c));
            let hi = _mm256_loadu_ps(xp.add((2 * p + 1) * cols + c));
            *v = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                _mm256_castps_pd(hi),
            ));
        }
        for (i, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: i * cols + c + 8 <= RM * cols <= w.len().
            let row = _mm256_loadu_ps(w.as_ptr().add(i * cols + c));
            let wv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(row)));
            for (acc_rp, &xp2) in acc_row.iter_mut().zip(&xv) {
                *acc_rp = _mm512_fmadd_ps(wv, xp2, *acc_rp);
            }
        }
        c += 8;
    }
    for (i, (out_row, acc_row)) in out.iter_mut().zip(&acc).enumerate() {
        for (p, &both) in acc_row.iter().enumerate() {
            let halves = [
                _mm512_castps512_ps256(both),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(both))),
            ];
            for (h, half) in halves.into_iter().enumerate() {
                let j = 2 * p + h;
                let mut sum = avx2::sum_lanes(half);
                for k in n8..cols {
                    sum += w[i * cols + k] * x[(t0 + j) * cols + k];
                }
                out_row[j] = sum;
            }
        }
    }
}

/// Attention's online softmax step compiled with AVX-512: the portable body, as
/// [`avx2::online_softmax_step`] compiles it for AVX2, so the same operations in the same order
/// (its maximum and sum keep their eight fixed lanes, and nothing is contracted into an FMA)
/// and the same bits; the exponentials, one per weight, take sixteen lanes at a time.
///
/// # Safety
/// The CPU must pass [`available`].
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn online_softmax_step<'s>(
    s: &'s mut [f32],
    max: &mut f32,
    sum: &mut f32,
    oh: &mut [f32],
) -> &'s [f32] {
    super::attention::online_softmax_step_body(s, max, sum, oh)
}

//! x86-64 AVX-512 kernels (F, BW, VL and VNNI): the integer work of the quantized kernels.
//!
//! Everything that is not an integer dot product (decoding blocks, quantizing activations,
//! float weights, attention) runs the AVX2 code, which every AVX-512 CPU also executes. What
//! changes:
//!
//! - **VNNI** (`vpdpbusd`): one instruction for the sums of four `u8 × i8` products per 32-bit
//!   lane, where AVX2 needs `maddubs` then `madd` by ones. Every mat-vec (decode) uses it on
//!   256-bit registers ([`Vnni`] plugged into the AVX2 kernels' bodies), so the eight-rows-per-
//!   register interleaved layout and its order of operations stay as they are.
//! - **512-bit registers** in the mat-mat tile (prefill, where the integer work, not memory,
//!   sets the speed): [`tile`] puts a tile's two tokens in the two halves of one register, so
//!   each row's weight chunk, loaded once and broadcast to both halves, meets both tokens'
//!   activations in one `vpdpbusd`, one conversion and one FMA instead of two of each.
//!
//! **Same bits as the AVX2 path.** Every lane of every register sees the operations AVX2's
//! lanes see, in the same order: the byte dot products are exact integers either way (the
//! module docs of `super::avx2` show `maddubs` never saturates, so both compute the true sums),
//! the conversion to f32 is exact, and the f32 multiplies and FMAs are the same per lane. So the
//! results are bit-identical to the AVX2 path's (a test checks it on every type and shape), and
//! everything proven about that path (batch invariance, the error bounds against the exact
//! reference) carries over.
//!
//! These instructions run only under emulation on the development machines (their hypervisor
//! exposes no AVX-512): `scripts/test-avx512.sh` runs the kernel tests inside Bochs with an
//! AVX-512 CPU model.
//!
//! Every function here is `unsafe` because it must only run where [`available`] is true.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::avx2::{self, ByteDot};
use super::avx2_interleaved;
use super::decoded::{DecodedChunk, QuantizedActivations};

/// Whether this CPU runs the AVX-512 path: the AVX2 path's features (its decoders and float
/// kernels are shared) plus AVX-512 F, BW, VL and VNNI. Detected once by the standard library.
pub(crate) fn available() -> bool {
    avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// AVX-512 VNNI's byte dot product: `vpdpbusd` into a zero accumulator, on 256-bit registers.
pub(crate) struct Vnni;

impl ByteDot for Vnni {
    #[inline(always)]
    unsafe fn dot(unsigned: __m256i, signed: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), unsigned, signed)
    }
}

/// [`avx2::matvec_in_tile_order`] with [`Vnni`].
///
/// # Safety
/// As [`avx2::matvec_in_tile_order`], and the CPU must pass [`available`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn matvec_in_tile_order<const NT: usize>(
    w: &super::WeightMatrix,
    rows: std::ops::Range<usize>,
    acts: &QuantizedActivations,
    first_token: usize,
    store: impl FnMut(usize, usize, f32),
) {
    avx2::matvec_in_tile_order_with::<NT, Vnni>(w, rows, acts, first_token, store)
}

/// [`avx2::matvec_decoded_in_tile_order`] with [`Vnni`].
///
/// # Safety
/// As [`avx2::matvec_in_tile_order`], and the CPU must pass [`available`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn matvec_decoded_in_tile_order<const NT: usize>(
    w: &super::WeightMatrix,
    rows: std::ops::Range<usize>,
    acts: &QuantizedActivations,
    first_token: usize,
    store: impl FnMut(usize, usize, f32),
) {
    avx2::matvec_decoded_in_tile_order_with::<NT, Vnni>(w, rows, acts, first_token, store)
}

/// How this path runs its prefill tiles. All give the same bits; which is faster depends on the
/// CPU: cores with full-width 512-bit units (Intel's server cores) gain from two tokens per
/// register (measured on this project's Xeon VMs: SmolLM2 prefill 625 against 570 tok/s for
/// 256-bit VNNI and ~540 for AVX2), while Zen 4 splits a 512-bit instruction into two 256-bit
/// halves (its prefill was slower on the AVX-512 path than on AVX2), and LLVM's Zen 4 model
/// (`bench/mca.sh`) even rates AVX2's `maddubs` tile above both AVX-512 tiles there. So it is
/// measured, not assumed: [`pair_tile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairTile {
    /// Two-token tiles with both tokens in one 512-bit register ([`tile_token_pair`]); other
    /// widths as [`PairTile::Ymm`].
    Zmm,
    /// AVX2's tile body with 256-bit VNNI.
    Ymm,
    /// AVX2's own tile (`maddubs`): the AVX-512 path not chosen for prefill.
    Avx2,
    /// Rows in lanes (`avx2_interleaved::tile_decoded` with 256-bit VNNI, driven by the
    /// kernels' `run_quantized_in_lanes`): eight decoded rows per register, so a token's factor
    /// `scale · dx` is one multiply for eight rows instead of one per row. On this project's
    /// Zen 4 VMs, whose 512-bit instructions take two 256-bit passes, it is the fastest
    /// (prefill +8–18% over the 256-bit row tile, medians of five alternating runs).
    Lanes,
}

impl PairTile {
    pub fn as_str(self) -> &'static str {
        match self {
            PairTile::Zmm => "avx512-zmm-pair",
            PairTile::Ymm => "avx512-ymm-vnni",
            PairTile::Avx2 => "avx2-maddubs",
            PairTile::Lanes => "avx512-rows-in-lanes",
        }
    }
}

/// The tile this process uses: `$EGPU_AVX512_TILE` (`zmm`, `ymm`, `avx2` or `lanes`) when set, else the
/// fastest on a short timed run of a 4-row × 2-token tile ([`calibrate`]), decided once. Only
/// the speed depends on the choice, never the results.
pub fn pair_tile() -> PairTile {
    static CHOICE: std::sync::OnceLock<PairTile> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(
        || match std::env::var("EGPU_AVX512_TILE").as_deref().map(str::trim) {
            Ok("zmm") => PairTile::Zmm,
            Ok("ymm") => PairTile::Ymm,
            Ok("avx2") => PairTile::Avx2,
            Ok("lanes") => PairTile::Lanes,
            _ if available() => calibrate(),
            _ => PairTile::Ymm,
        },
    )
}

/// Times the four tiles on the same synthetic 4-row × 2-token block (64 chunks of Q4_1-like
/// unsigned quants with offsets, L1-resident like a prefill tile's data; for rows in lanes,
/// those four rows twice as one eight-row group, half as many calls) and returns the fastest.
/// Rounds alternate and each variant keeps its best round, so a burst of other work on the
/// machine slows all rather than deciding alone. About 15 ms.
fn calibrate() -> PairTile {
    if !available() {
        return PairTile::Ymm;
    }
    const NC: usize = 64;
    const RUNS_PER_ROUND: usize = 200;
    let mut seed = 0x2545_f491u32;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    let mut w = vec![DecodedChunk::ZERO; 4 * NC];
    for chunk in &mut w {
        chunk.q.iter_mut().for_each(|q| *q = (next() & 15) as u8);
        chunk.scale = [0.01; 8];
    }
    let offsets = vec![[0.5f32, -0.5]; 4 * NC];
    let mut acts = QuantizedActivations::default();
    acts.reset(2, NC * super::decoded::CHUNK);
    acts.q.iter_mut().flatten().for_each(|x| *x = next() as i8);
    acts.d.iter_mut().for_each(|d| *d = 0.02);
    // The same four rows twice, as one eight-row group in lanes.
    let mut lanes_q = vec![0u8; NC * avx2_interleaved::DECODED_GROUP_BYTES];
    let mut lanes_scales = vec![avx2_interleaved::Lanes8::default(); 2 * NC];
    let mut lanes_offsets = lanes_scales.clone();
    for r in 0..8 {
        let at = (r % 4) * NC..(r % 4 + 1) * NC;
        avx2_interleaved::scatter_decoded_row(
            r,
            &w[at.clone()],
            &offsets[at],
            &mut lanes_q,
            &mut lanes_scales,
            &mut lanes_offsets,
        );
    }
    const VARIANTS: [PairTile; 4] = [
        PairTile::Zmm,
        PairTile::Ymm,
        PairTile::Avx2,
        PairTile::Lanes,
    ];
    let mut best = [std::time::Duration::MAX; 4];
    let mut out = [[0f32; 2]; 4];
    let mut lanes_out = [[0f32; 8]; 2];
    for _ in 0..5 {
        for (variant, best) in VARIANTS.into_iter().zip(&mut best) {
            let start = std::time::Instant::now();
            if variant == PairTile::Lanes {
                // Eight rows a call: the others' work in half the calls.
                for _ in 0..RUNS_PER_ROUND / 2 {
                    // SAFETY: `available()` was checked above; one group of NC chunks with
                    // both halves' scales and offsets, and 2 tokens of activations.
                    unsafe {
                        avx2_interleaved::tile_decoded_vnni(
                            false,
                            true,
                            (&lanes_q, &lanes_scales, &lanes_offsets),
                            &acts,
                            0..2,
                            &mut lanes_out,
                        )
                    };
                    std::hint::black_box(&mut lanes_out);
                }
            } else {
                for _ in 0..RUNS_PER_ROUND {
                    // SAFETY: `available()` was checked above; the shapes match the contract
                    // (4 rows and 2 tokens of NC chunks, offsets for every chunk).
                    unsafe {
                        tile_as::<4, 2, false, true>(variant, &w, &offsets, &acts, 0, &mut out)
                    };
                    std::hint::black_box(&mut out);
                }
            }
            *best = (*best).min(start.elapsed());
        }
    }
    // Ties go to the earlier (wider) variant.
    let fastest = (0..VARIANTS.len())
        .min_by_key(|&i| (best[i], i))
        .unwrap_or(0);
    VARIANTS[fastest]
}

/// The mat-mat tile (see [`avx2::tile`] for the contract), as [`pair_tile`] chose.
///
/// # Safety
/// As [`avx2::tile`], and the CPU must pass [`available`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn tile<
    const RM: usize,
    const RN: usize,
    const SIGNED: bool,
    const OFFSETS: bool,
>(
    w: &[DecodedChunk],
    offsets: &[[f32; 2]],
    acts: &QuantizedActivations,
    t0: usize,
    out: &mut [[f32; RN]; RM],
) {
    tile_as::<RM, RN, SIGNED, OFFSETS>(pair_tile(), w, offsets, acts, t0, out)
}

/// [`tile`] with a chosen two-token variant (the test compares them).
///
/// # Safety
/// As [`tile`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn tile_as<
    const RM: usize,
    const RN: usize,
    const SIGNED: bool,
    const OFFSETS: bool,
>(
    pair: PairTile,
    w: &[DecodedChunk],
    offsets: &[[f32; 2]],
    acts: &QuantizedActivations,
    t0: usize,
    out: &mut [[f32; RN]; RM],
) {
    match pair {
        PairTile::Zmm if RN == 2 => {
            let mut pair = [[0f32; 2]; RM];
            tile_token_pair::<RM, SIGNED, OFFSETS>(w, offsets, acts, t0, &mut pair);
            for (dst, src) in out.iter_mut().zip(&pair) {
                dst.copy_from_slice(src);
            }
        }
        PairTile::Avx2 => {
            avx2::tile_with::<RM, RN, SIGNED, OFFSETS, avx2::Maddubs>(w, offsets, acts, t0, out)
        }
        _ => avx2::tile_with::<RM, RN, SIGNED, OFFSETS, Vnni>(w, offsets, acts, t0, out),
    }
}

/// Eight f32 (32 bytes at `p`) in both halves of a 512-bit register.
#[inline(always)]
unsafe fn broadcast_8_floats(p: *const f32) -> __m512 {
    // SAFETY: the caller's `p` points at 8 readable f32; `loadu` needs no alignment.
    _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))))
}

/// Eight f32 at `low` in the low half and eight at `high` in the high half.
#[inline(always)]
unsafe fn two_8_floats(low: *const f32, high: *const f32) -> __m512 {
    // SAFETY: the caller's pointers each point at 8 readable f32.
    let low = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(low)));
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        low,
        _mm256_castps_pd(_mm256_loadu_ps(high)),
    ))
}

/// The sum of each half's eight lanes, in `avx2::sum_lanes`' order.
#[inline(always)]
unsafe fn sum_halves(v: __m512) -> [f32; 2] {
    let high = _mm512_castpd_ps(_mm512_castpd256_pd512(_mm512_extractf64x4_pd::<1>(
        _mm512_castps_pd(v),
    )));
    [
        avx2::sum_lanes(_mm512_castps512_ps256(v)),
        avx2::sum_lanes(_mm512_castps512_ps256(high)),
    ]
}

/// `RM` decoded rows × tokens `t0` and `t0 + 1`: lanes 0–7 of row `i`'s accumulator are what
/// AVX2's accumulator of (row `i`, token `t0`) holds, lanes 8–15 those of (row `i`, token
/// `t0 + 1`), with the same operations per lane (see the module docs).
///
/// # Safety
/// As [`tile`] with `RN == 2` (the shapes are checked; a failure is a caller's bug and panics).
#[inline(always)]
unsafe fn tile_token_pair<const RM: usize, const SIGNED: bool, const OFFSETS: bool>(
    w: &[DecodedChunk],
    offsets: &[[f32; 2]],
    acts: &QuantizedActivations,
    t0: usize,
    out: &mut [[f32; 2]; RM],
) {
    let nc = acts.n_chunks;
    assert!(
        w.len() >= RM * nc
            && (!OFFSETS || offsets.len() >= RM * nc)
            && acts.q.len() >= (t0 + 2) * nc
            && acts.d.len() == acts.q.len()
            && acts.half_sums.len() == acts.q.len()
    );
    let mut acc = [_mm512_setzero_ps(); RM];
    let wp = w.as_ptr();
    let xq = acts.q.as_ptr().add(t0 * nc);
    let xd = acts.d.as_ptr().add(t0 * nc);
    for c in 0..nc {
        // SAFETY: chunks c and nc + c of the two tokens exist (checked above).
        let x0 = _mm256_loadu_si256(xq.add(c).cast());
        let x = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(x0),
            _mm256_loadu_si256(xq.add(nc + c).cast()),
        );
        let dx = _mm512_mask_blend_ps(
            0xFF00,
            _mm512_set1_ps(*xd.add(c)),
            _mm512_set1_ps(*xd.add(nc + c)),
        );
        for (i, acc_i) in acc.iter_mut().enumerate() {
            // SAFETY: i * nc + c < RM * nc <= w.len(); chunks are 32-byte aligned.
            let chunk = &*wp.add(i * nc + c);
            let q = _mm512_broadcast_i64x4(_mm256_load_si256(chunk.q.as_ptr().cast()));
            let (magnitude, x) = if SIGNED {
                // |q| · (x · sign q), as AVX2's `sign`, which has no 512-bit form: x negated
                // where q < 0. Where q = 0 the magnitude is 0, so x is left as it is.
                let negative = _mm512_movepi8_mask(q);
                let x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
                (_mm512_abs_epi8(q), x)
            } else {
                (q, x)
            };
            let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, x);
            let factor = _mm512_mul_ps(broadcast_8_floats(chunk.scale.as_ptr()), dx);
            *acc_i = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), factor, *acc_i);
        }
    }
    let mut tail = [[0f32; 2]; RM];
    if OFFSETS {
        // Σ_h offset[r][h] · half_sum[t][h] over the 2·nc halves: eight at a time, then the
        // rest in order, as `avx2::tile` adds them.
        let (halves, full) = (2 * nc, 2 * nc / 8 * 8);
        let op = offsets.as_flattened().as_ptr();
        let sp = acts.half_sums.as_flattened().as_ptr().add(2 * t0 * nc);
        let mut k = 0;
        while k < full {
            // SAFETY: halves + k + 8 <= 2 · 2 · nc, the two tokens' half sums checked above.
            let s = two_8_floats(sp.add(k), sp.add(halves + k));
            for (i, acc_i) in acc.iter_mut().enumerate() {
                // SAFETY: i * halves + k + 8 <= RM * 2 * nc, the offsets checked above.
                let o = broadcast_8_floats(op.add(i * halves + k));
                *acc_i = _mm512_fmadd_ps(o, s, *acc_i);
            }
            k += 8;
        }
        for (i, tail_i) in tail.iter_mut().enumerate() {
            for (j, t) in tail_i.iter_mut().enumerate() {
                // SAFETY: as above, for the halves full..halves of row i and token j.
                *t = avx2::offset_tail(op.add(i * halves), sp.add(j * halves), full..halves);
            }
        }
    }
    for ((out_i, acc_i), tail_i) in out.iter_mut().zip(&acc).zip(&tail) {
        let sums = sum_halves(*acc_i);
        for ((o, s), t) in out_i.iter_mut().zip(sums).zip(tail_i) {
            *o = s + t;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// All three tiles give the same bits for every kind of chunk (signed or not, with
    /// offsets or not) and every row count, so [`pair_tile`]'s timing only changes the speed.
    #[test]
    fn both_pair_tiles_give_the_same_bits() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 (F, BW, VL, VNNI)");
            return;
        }
        const NC: usize = 9;
        let mut seed = 0x9e37_79b9u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        // Quants and activations within what the decoders and the quantizer produce (at most 5
        // bits unsigned, ±127 signed, activations ±127), where AVX2's `maddubs` cannot saturate.
        let mut unsigned = vec![DecodedChunk::ZERO; 4 * NC];
        let mut signed = vec![DecodedChunk::ZERO; 4 * NC];
        for (u, s) in unsigned.iter_mut().zip(&mut signed) {
            u.q.iter_mut().for_each(|q| *q = (next() % 32) as u8);
            s.q.iter_mut()
                .for_each(|q| *q = ((next() % 255) as i32 - 127) as i8 as u8);
            let scale = (next() % 1000) as f32 * 1e-4;
            u.scale = [scale; 8];
            s.scale = [scale * 0.5; 8];
        }
        let offsets: Vec<[f32; 2]> = (0..4 * NC)
            .map(|_| {
                [
                    (next() % 100) as f32 * 0.01,
                    -((next() % 100) as f32) * 0.01,
                ]
            })
            .collect();
        let mut acts = QuantizedActivations::default();
        acts.reset(3, NC * super::super::decoded::CHUNK);
        acts.q
            .iter_mut()
            .flatten()
            .for_each(|x| *x = ((next() % 255) as i32 - 127) as i8);
        acts.d
            .iter_mut()
            .for_each(|d| *d = (next() % 1000) as f32 * 1e-3);
        acts.half_sums
            .iter_mut()
            .flatten()
            .for_each(|s| *s = (next() % 2000) as f32 * 0.01 - 10.0);
        macro_rules! compare {
            ($rm:literal, $signed:literal, $offsets:literal) => {
                for t0 in 0..2 {
                    let run = |pair| {
                        let mut out = [[0f32; 2]; $rm];
                        let w = if $signed { &signed } else { &unsigned };
                        // SAFETY: AVX-512 checked above; $rm rows and tokens t0, t0 + 1 of NC
                        // chunks exist, with offsets for every chunk.
                        unsafe {
                            tile_as::<$rm, 2, $signed, $offsets>(
                                pair, w, &offsets, &acts, t0, &mut out,
                            )
                        };
                        out.map(|row| row.map(f32::to_bits))
                    };
                    assert_eq!(
                        run(PairTile::Zmm),
                        run(PairTile::Avx2),
                        "{} rows, signed {}, offsets {}, t0 {t0}",
                        $rm,
                        $signed,
                        $offsets
                    );
                    assert_eq!(
                        run(PairTile::Zmm),
                        run(PairTile::Ymm),
                        "{} rows, signed {}, offsets {}, t0 {t0}",
                        $rm,
                        $signed,
                        $offsets
                    );
                }
            };
        }
        compare!(1, false, true);
        compare!(2, true, false);
        compare!(3, false, false);
        compare!(4, false, true);
        compare!(4, true, false);
        compare!(4, true, true);
    }
}

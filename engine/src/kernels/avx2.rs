//! x86-64 AVX2 (+FMA, F16C) kernels: everything of the x86 paths but the quantized products
//! (which are `super::lanes`', rows in lanes, for AVX2 and AVX-512 alike).
//!
//! - `for_each_chunk` decodes each type's blocks, in registers, into the decoded form of
//!   [`super::decoded`] with a few shuffles and masks per 32 elements; `decode_row` stores that
//!   form (checked equal to `decode_row_scalar`, byte for byte).
//! - Float weights: `widen_row` and `tile_f32`; activations: `quantize_tokens`, bit-identical to
//!   the scalar quantizer.
//! - Attention: `scores_transposed`, `weighted_sum` and `weighted_sum_rows` are the portable bodies of `attention.rs`
//!   compiled with AVX2 enabled, bit-identical to them.
//!
//! Every function here is `unsafe` because it must only run where [`available`] is true.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::decoded::{DecodedChunk, CHUNK};
use crate::quant::{k4_scales_mins, q3_k_scales, GgmlType, IQ4_NL_VALUES};

/// Attention scores with 256-bit registers: the portable body, compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn scores_transposed(
    q: &[f32],
    dim: usize,
    kt: &[f32],
    stride: usize,
    cols: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
) {
    super::attention::scores_transposed_body(q, dim, kt, stride, cols, scale, out);
}

/// Attention's weighted sum with 256-bit registers: the portable body, compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn weighted_sum(y: &mut [f32], w: &[f32], xs: &[f32]) {
    super::attention::weighted_sum_body(y, w, xs);
}

/// Attention's weighted sum of several rows with 256-bit registers: the portable body,
/// compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn weighted_sum_rows(ys: &mut [f32], ws: &[f32], xs: &[f32], dim: usize) {
    super::attention::weighted_sum_rows_body(ys, ws, xs, dim);
}

/// Attention's online softmax step with 256-bit registers: the portable body, compiled for
/// AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn online_softmax_step<'s>(
    s: &'s mut [f32],
    max: &mut f32,
    sum: &mut f32,
    oh: &mut [f32],
) -> &'s [f32] {
    super::attention::online_softmax_step_body(s, max, sum, oh)
}

/// [`super::Vectorized`] work with 256-bit registers: its `run`, inlined here and compiled for
/// AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn run_vectorized<W: super::Vectorized>(work: W) -> W::Output {
    work.run()
}

/// Whether this CPU runs the AVX2 path (detected once by the standard library, then cached).
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Widens the little-endian f16 at `p[0..2]`.
#[inline(always)]
unsafe fn f16_at(p: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([p[0], p[1]]);
    // SAFETY: F16C is enabled in every caller (they are `avx2,fma,f16c` target-feature fns).
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// Loads 16 bytes at `p[at..at + 16]`.
#[inline(always)]
unsafe fn load16(p: &[u8], at: usize) -> __m128i {
    let bytes = &p[at..at + 16];
    // SAFETY: `bytes` is 16 readable bytes; `loadu` has no alignment requirement.
    _mm_loadu_si128(bytes.as_ptr().cast())
}

/// Loads 32 bytes at `p[at..at + 32]`.
#[inline(always)]
unsafe fn load32(p: &[u8], at: usize) -> __m256i {
    let bytes = &p[at..at + 32];
    // SAFETY: `bytes` is 32 readable bytes; `loadu` has no alignment requirement.
    _mm256_loadu_si256(bytes.as_ptr().cast())
}

/// The legacy nibble layout: low nibbles are elements 0..16, high nibbles 16..32.
#[inline(always)]
unsafe fn nibbles(qs: __m128i) -> __m256i {
    let m4 = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(qs, m4);
    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m4);
    _mm256_set_m128i(hi, lo)
}

/// Byte `i` is `0xFF` where bit `i` of `bits` is set.
#[inline(always)]
unsafe fn bits_to_bytes(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        ),
    );
    let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select)
}

/// Byte `i` is `value` where bit `bit` of byte `i` of `v` is set, else 0.
#[inline(always)]
unsafe fn bit_plane(v: __m256i, bit: u32, value: i8) -> __m256i {
    let mask = _mm256_set1_epi8((1u8 << bit) as i8);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(v, mask), mask);
    _mm256_and_si256(set, _mm256_set1_epi8(value))
}

/// `(v >> shift) & mask` on every byte (`shift` ≤ 7: bits shifted in from the neighbouring
/// byte of the 16-bit lane are above `mask`).
#[inline(always)]
unsafe fn shifted_field(v: __m256i, shift: u32, mask: i8) -> __m256i {
    let shifted = _mm256_srl_epi16(v, _mm_cvtsi32_si128(shift as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi8(mask))
}

/// The IQ4 codebook in both 128-bit lanes, for `shuffle_epi8` lookups.
#[inline(always)]
unsafe fn iq4_table() -> __m256i {
    // SAFETY: the table is 16 readable bytes.
    _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_NL_VALUES.as_ptr().cast()))
}

/// Eight lanes: `first` in lanes 0..4 (elements 0..16 of a chunk), `second` in lanes 4..8.
#[inline(always)]
unsafe fn half_scales(first: f32, second: f32) -> __m256 {
    _mm256_set_m128(_mm_set1_ps(second), _mm_set1_ps(first))
}

/// Decodes one weight row chunk by chunk, in registers: calls `emit(c, q, scale, offsets)` for
/// each 32-element chunk `c` of the row in order, with the decoded form of `super::decoded`
/// (`q` as 32 bytes, `scale` as eight lanes). Inlined into each consumer, so the chunks never
/// touch memory unless the consumer stores them.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]); `row` must be whole blocks of `ty`,
/// a type `decoded::is_block_quantized` accepts (others emit nothing).
#[inline(always)]
unsafe fn for_each_chunk(
    ty: GgmlType,
    row: &[u8],
    mut emit: impl FnMut(usize, __m256i, __m256, [f32; 2]),
) {
    let blocks = row.chunks_exact(ty.type_size()).enumerate();
    match ty {
        GgmlType::Q4_0 => {
            for (i, b) in blocks {
                let d = f16_at(b);
                emit(i, nibbles(load16(b, 2)), _mm256_set1_ps(d), [-8.0 * d; 2]);
            }
        }
        GgmlType::Q4_1 => {
            for (i, b) in blocks {
                let (d, m) = (f16_at(b), f16_at(&b[2..]));
                emit(i, nibbles(load16(b, 4)), _mm256_set1_ps(d), [m; 2]);
            }
        }
        GgmlType::Q5_0 => {
            for (i, b) in blocks {
                let d = f16_at(b);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let high = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(16));
                let q = _mm256_or_si256(nibbles(load16(b, 6)), high);
                emit(i, q, _mm256_set1_ps(d), [-16.0 * d; 2]);
            }
        }
        GgmlType::Q5_1 => {
            for (i, b) in blocks {
                let (d, m) = (f16_at(b), f16_at(&b[2..]));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let high = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(16));
                let q = _mm256_or_si256(nibbles(load16(b, 8)), high);
                emit(i, q, _mm256_set1_ps(d), [m; 2]);
            }
        }
        GgmlType::Q8_0 => {
            for (i, b) in blocks {
                emit(i, load32(b, 2), _mm256_set1_ps(f16_at(b)), [0.0; 2]);
            }
        }
        GgmlType::IQ4_NL => {
            let table = iq4_table();
            for (i, b) in blocks {
                let q = _mm256_shuffle_epi8(table, nibbles(load16(b, 2)));
                emit(i, q, _mm256_set1_ps(f16_at(b)), [0.0; 2]);
            }
        }
        GgmlType::Q2_K => {
            for (i, b) in blocks {
                let (d, dmin) = (f16_at(&b[80..]), f16_at(&b[82..]));
                for half in 0..2 {
                    let qs = load32(b, 16 + 32 * half);
                    for k in 0..4 {
                        let c = 4 * half + k;
                        let q = shifted_field(qs, 2 * k as u32, 3);
                        let (s0, s1) = (b[2 * c], b[2 * c + 1]);
                        let scale = half_scales(d * f32::from(s0 & 15), d * f32::from(s1 & 15));
                        let off = [-(dmin * f32::from(s0 >> 4)), -(dmin * f32::from(s1 >> 4))];
                        emit(8 * i + c, q, scale, off);
                    }
                }
            }
        }
        GgmlType::Q3_K => {
            for (i, b) in blocks {
                let d = f16_at(&b[108..]);
                let scales = q3_k_scales(&std::array::from_fn(|k| b[96 + k]));
                let hmask = load32(b, 0);
                for half in 0..2 {
                    let qs = load32(b, 32 + 32 * half);
                    for k in 0..4 {
                        let c = 4 * half + k;
                        let low = shifted_field(qs, 2 * k as u32, 3);
                        let q = _mm256_or_si256(low, bit_plane(hmask, c as u32, 4));
                        let s0 = d * f32::from(scales[2 * c]);
                        let s1 = d * f32::from(scales[2 * c + 1]);
                        emit(8 * i + c, q, half_scales(s0, s1), [-4.0 * s0, -4.0 * s1]);
                    }
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let five = ty == GgmlType::Q5_K;
            let qs_at = if five { 48 } else { 16 };
            let m4 = _mm256_set1_epi8(0x0F);
            for (i, b) in blocks {
                let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
                let (sc, mins) = k4_scales_mins(&std::array::from_fn(|k| b[4 + k]));
                let qh = if five {
                    load32(b, 16)
                } else {
                    _mm256_setzero_si256()
                };
                for k in 0..4 {
                    let v = load32(b, qs_at + 32 * k);
                    let lo = _mm256_and_si256(v, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    for (c, q) in [(2 * k, lo), (2 * k + 1, hi)] {
                        let q = if five {
                            _mm256_or_si256(q, bit_plane(qh, c as u32, 16))
                        } else {
                            q
                        };
                        let scale = _mm256_set1_ps(d * f32::from(sc[c]));
                        emit(8 * i + c, q, scale, [-(dmin * f32::from(mins[c])); 2]);
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for (i, b) in blocks {
                let d = f16_at(&b[208..]);
                for half in 0..2 {
                    let qh = load32(b, 128 + 32 * half);
                    let ql = [load32(b, 64 * half), load32(b, 64 * half + 32)];
                    // Chunk order: k = 0..4 within the half; k takes nibble k / 2 of ql[k % 2].
                    for k in 0..4 {
                        let c = 4 * half + k;
                        let low = shifted_field(ql[k % 2], 4 * (k / 2) as u32, 15);
                        let high = shifted_field(qh, 2 * k as u32, 3);
                        let q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                        let s0 = d * f32::from(b[192 + 2 * c] as i8);
                        let s1 = d * f32::from(b[192 + 2 * c + 1] as i8);
                        emit(8 * i + c, q, half_scales(s0, s1), [-32.0 * s0, -32.0 * s1]);
                    }
                }
            }
        }
        GgmlType::IQ4_XS => {
            let table = iq4_table();
            for (i, b) in blocks {
                let d = f16_at(b);
                let scales_h = u16::from_le_bytes([b[2], b[3]]);
                for c in 0..8 {
                    let low = (b[4 + c / 2] >> (4 * (c % 2))) & 15;
                    let high = ((scales_h >> (2 * c)) & 3) as u8;
                    let s = d * f32::from((low | (high << 4)) as i8 - 32);
                    let q = _mm256_shuffle_epi8(table, nibbles(load16(b, 8 + 16 * c)));
                    emit(8 * i + c, q, _mm256_set1_ps(s), [0.0; 2]);
                }
            }
        }
        _ => {}
    }
}

/// Decodes one weight row into `chunks`/`offsets`, like `decode_row_scalar`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]). `row` must be whole blocks of `ty`
/// and `chunks`/`offsets` hold one entry per 32 elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode_row(
    ty: GgmlType,
    row: &[u8],
    chunks: &mut [DecodedChunk],
    offsets: &mut [[f32; 2]],
) {
    if !super::decoded::is_block_quantized(ty) {
        return super::decoded::decode_row_scalar(ty, row, chunks, offsets);
    }
    for_each_chunk(ty, row, |c, q, scale, off| {
        let chunk = &mut chunks[c];
        // SAFETY: `chunk.q` and `chunk.scale` are 32 writable bytes each, 32-byte aligned by
        // `DecodedChunk`'s `repr`.
        _mm256_store_si256(chunk.q.as_mut_ptr().cast(), q);
        _mm256_store_ps(chunk.scale.as_mut_ptr(), scale);
        offsets[c] = off;
    });
}

/// Horizontal sum of eight lanes, pairing lanes as `portable::sum_lanes` does.
#[inline(always)]
pub(crate) unsafe fn sum_lanes(v: __m256) -> f32 {
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)))
}

/// Float-weight tile: `RM` f32 rows (`cols` each, back to back) × `RN` tokens of `x` from `t0`.
///
/// # Safety
/// The CPU must support AVX2 and FMA. `w.len() >= RM * cols`, `x.len() >= (t0 + RN) * cols`
/// (checked; the check failing is a bug in the caller and panics).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_f32<const RM: usize, const RN: usize>(
    w: &[f32],
    x: &[f32],
    cols: usize,
    t0: usize,
    out: &mut [[f32; RN]; RM],
) {
    assert!(w.len() >= RM * cols && x.len() >= (t0 + RN) * cols);
    let n8 = cols / 8 * 8;
    let mut acc = [[_mm256_setzero_ps(); RN]; RM];
    let xp = x.as_ptr().add(t0 * cols);
    let mut c = 0;
    while c < n8 {
        let mut xv = [_mm256_setzero_ps(); RN];
        for (j, v) in xv.iter_mut().enumerate() {
            // SAFETY: j * cols + c + 8 <= RN * cols, checked above.
            *v = _mm256_loadu_ps(xp.add(j * cols + c));
        }
        for (i, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: i * cols + c + 8 <= RM * cols <= w.len().
            let wv = _mm256_loadu_ps(w.as_ptr().add(i * cols + c));
            for (acc_rt, &xj) in acc_row.iter_mut().zip(&xv) {
                *acc_rt = _mm256_fmadd_ps(wv, xj, *acc_rt);
            }
        }
        c += 8;
    }
    for (i, out_row) in out.iter_mut().enumerate() {
        for (j, o) in out_row.iter_mut().enumerate() {
            let mut sum = sum_lanes(acc[i][j]);
            for k in n8..cols {
                sum += w[i * cols + k] * x[(t0 + j) * cols + k];
            }
            *o = sum;
        }
    }
}

/// Widens a row of F16 or BF16 weights (`src` little-endian 2-byte values) into `dst`.
///
/// # Safety
/// The CPU must support AVX2 and F16C. `src.len() == 2 * dst.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn widen_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let n = dst.len().min(src.len() / 2);
    let n8 = n / 8 * 8;
    let mut i = 0;
    while i < n8 {
        // SAFETY: bytes 2i..2i+16 and floats i..i+8 are in bounds (i + 8 <= n8).
        let raw = _mm_loadu_si128(src.as_ptr().add(2 * i).cast());
        let wide = if ty == GgmlType::BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        } else {
            _mm256_cvtph_ps(raw)
        };
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), wide);
        i += 8;
    }
    for k in n8..n {
        let bits = u16::from_le_bytes([src[2 * k], src[2 * k + 1]]);
        dst[k] = if ty == GgmlType::BF16 {
            f32::from_bits(u32::from(bits) << 16)
        } else {
            f16_at(&src[2 * k..])
        };
    }
}

/// Quantizes activations like `decoded::quantize_tokens_scalar`, with identical results: the
/// same `amax`, the same reciprocal, the same rounding (half away from zero).
///
/// # Safety
/// The CPU must support AVX2. The slices hold the same number of chunks (`x` 32 values each).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_tokens(
    x: &[f32],
    q: &mut [[i8; CHUNK]],
    d: &mut [f32],
    half_sums: &mut [[f32; 2]],
) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let half = _mm256_set1_ps(0.5);
    for (((x, q), d), s) in x
        .chunks_exact(CHUNK)
        .zip(q.iter_mut())
        .zip(d.iter_mut())
        .zip(half_sums.iter_mut())
    {
        // SAFETY: `x` is a 32-float chunk.
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(x.as_ptr().add(8 * k)));
        let abs: [__m256; 4] = std::array::from_fn(|k| _mm256_and_ps(v[k], abs_mask));
        let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        // `max_ps` drops NaNs depending on operand order; like the scalar quantizer, let any NaN
        // make the scale NaN.
        let unordered =
            std::array::from_fn::<__m256, 4, _>(|k| _mm256_cmp_ps(v[k], v[k], _CMP_UNORD_Q));
        let any_nan = _mm256_or_ps(
            _mm256_or_ps(unordered[0], unordered[1]),
            _mm256_or_ps(unordered[2], unordered[3]),
        );
        let amax = if _mm256_movemask_ps(any_nan) != 0 {
            f32::NAN
        } else {
            amax
        };
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        let ints: [__m256i; 4] = std::array::from_fn(|k| {
            let p = _mm256_mul_ps(v[k], inv);
            let sign = _mm256_and_ps(p, sign_mask);
            let r = round_half_away(_mm256_and_ps(p, abs_mask), half);
            let r = _mm256_min_ps(r, _mm256_set1_ps(127.0));
            _mm256_cvttps_epi32(_mm256_or_ps(r, sign))
        });
        // Pack 32 i32 → 32 i8 in element order (packs interleave 128-bit lanes; undo it).
        let w01 = _mm256_packs_epi32(ints[0], ints[1]);
        let w23 = _mm256_packs_epi32(ints[2], ints[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `q` is 32 writable bytes.
        _mm256_storeu_si256(q.as_mut_ptr().cast(), b);
        let sum = |k0: usize| {
            let t = _mm256_add_epi32(ints[k0], ints[k0 + 1]);
            let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            let t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
            _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 1)))
        };
        *d = scale;
        *s = [scale * sum(0) as f32, scale * sum(2) as f32];
    }
}

/// `round(a)` for non-negative `a` below 2^23, ties away from zero, as `f32::round` does.
#[inline(always)]
unsafe fn round_half_away(a: __m256, half: __m256) -> __m256 {
    // trunc(a + 0.5) is right except when a + 0.5 itself rounds up to the next integer (a's
    // fraction just below 0.5, e.g. 0.49999997). Then t − 0.5 > a; t − 0.5 is exact for the
    // integers involved (t − a is not, and would hide the case), so the comparison is exact.
    let t = _mm256_round_ps(
        _mm256_add_ps(a, half),
        _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC,
    );
    let too_big = _mm256_cmp_ps(_mm256_sub_ps(t, half), a, _CMP_GT_OQ);
    _mm256_sub_ps(t, _mm256_and_ps(too_big, _mm256_set1_ps(1.0)))
}

//! The common form every quantized weight type is decoded to, block by block, on its way into an
//! integer dot product, and the scalar decoders that define it.
//!
//! A weight row is cut into chunks of 32 elements (one legacy block, or an eighth of a K-quant
//! super-block). Every supported type writes each chunk as
//!
//! ```text
//! w[i] = scale[i / 16] * q[i] + offset[i / 16]        (i < 32)
//! ```
//!
//! with small integers `q` (unsigned 0..=63 for most types; signed −128..=127 for Q8_0 and the
//! IQ4 codebooks, see [`is_signed`]) and two f32 scales and offsets per chunk, one per half of 16
//! elements (K-quants with 16-element sub-blocks need two; the rest repeat one). The products
//! `scale · q` are exact in f32 (an f16 scale times integers of at most 14 bits), so this form
//! gives the dequantized values of `crate::quant` exactly, up to the one rounding of the sum.
//!
//! Against activations quantized to 8 bits per 32-element chunk (`x[i] ≈ dx · xq[i]`, see
//! [`QuantizedActivations`]) the chunk's contribution to a dot product is
//!
//! ```text
//! dx · Σ_h scale[h] · Σ_{i∈h} q[i]·xq[i]   +   Σ_h offset[h] · (dx · Σ_{i∈h} xq[i])
//! ```
//!
//! where the inner sums are exact integer arithmetic (`maddubs`/`madd` on x86) and the half sums
//! of the activations are computed once per call. So one integer kernel serves every type; only
//! the decoders differ, and each SIMD decoder is checked against the scalar one here.

use crate::quant::blocks::{
    f16_le, BlockIq4Nl, BlockIq4Xs, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K,
    BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0,
};
use crate::quant::{k4_scales_mins, q3_k_scales, GgmlType, IQ4_NL_VALUES};

/// Elements per chunk of the decoded form and of the quantized activations.
pub(crate) const CHUNK: usize = 32;

/// One decoded 32-element chunk (see the module docs). The scale is stored as eight lanes (the
/// first half's scale four times, then the second half's) because that is the shape the integer
/// kernels' eight 32-bit partial sums have: lanes 0..4 cover elements 0..16.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct DecodedChunk {
    /// Unsigned quants, or two's-complement bytes for the [`is_signed`] types.
    pub q: [u8; CHUNK],
    pub scale: [f32; 8],
}

impl DecodedChunk {
    pub const ZERO: DecodedChunk = DecodedChunk {
        q: [0; CHUNK],
        scale: [0.0; 8],
    };

    #[inline(always)]
    pub fn set_scales(&mut self, first: f32, second: f32) {
        self.scale = [first, first, first, first, second, second, second, second];
    }
}

/// Whether `ty`'s decoded quants are signed bytes. The integer kernels multiply unsigned weights
/// by signed activations (`maddubs`), so signed weights take their absolute value and move their
/// sign onto the activation.
pub(crate) fn is_signed(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS)
}

/// Whether `ty`'s decoded chunks have nonzero offsets (everything stored unsigned does).
pub(crate) fn has_offset(ty: GgmlType) -> bool {
    !is_signed(ty)
}

/// For the types whose decoded offset is a whole multiple of the scale, `offset = −k · scale`
/// (Q4_0's `k` = 8, Q5_0's 16, Q3_K's 4, Q6_K's 32; always a power of two, so that the kernels
/// multiply by it with a shift), that `k`; 0 for every other type. The x86 kernels (`lanes`)
/// fold such an offset into the block's integer sum, `Σ q·x − k·Σx`, and do no float work for
/// it: one conversion and one FMA per sum, where a separate offset term took a second FMA
/// (1.03–1.06× the prefill speed of these types on a 2-vCPU Zen 4).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const fn offset_multiple(ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        GgmlType::Q3_K => 4,
        GgmlType::Q6_K => 32,
        _ => 0,
    }
}

/// The bits of `ty`'s unsigned decoded quants (every value below `2^bits`), or 8 for the signed
/// types. AVX2 (`lanes::Maddubs`) adds as many element groups' `maddubs` pairs in 16 bits
/// before widening them as this bound allows: narrow quants need fewer widening multiplies.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const fn quant_bits(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::Q2_K => 2,
        GgmlType::Q3_K => 3,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => 4,
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 5,
        GgmlType::Q6_K => 6,
        _ => 8,
    }
}

/// Whether the two 16-element halves of `ty`'s chunks have their own scales and offsets (the
/// K-quants with 16-element sub-blocks). For every other type both halves share them, and the
/// x86 kernels (`lanes`) sum a whole chunk in integers before scaling it.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn has_half_scales(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q6_K)
}

/// Whether the integer kernels handle `ty`: every block-quantized type that has a dequantizer
/// (the plain float types go through the f32 tiles instead).
pub(crate) fn is_block_quantized(ty: GgmlType) -> bool {
    crate::quant::can_dequantize(ty) && ty.is_quantized()
}

/// Decodes the blocks of one weight row (`row.len()` a whole number of `ty` blocks) into
/// `chunks` and `offsets`, one entry per 32 elements. The scalar definition of the decoded form.
pub(crate) fn decode_row_scalar(
    ty: GgmlType,
    row: &[u8],
    chunks: &mut [DecodedChunk],
    offsets: &mut [[f32; 2]],
) {
    // One loop per type, so that the type dispatch in `decode_block_scalar` folds away.
    macro_rules! per_type {
        ($($t:ident),*) => {
            match ty {
                $(GgmlType::$t => decode_blocks(GgmlType::$t, row, chunks, offsets),)*
                _ => decode_blocks(ty, row, chunks, offsets),
            }
        };
    }
    per_type!(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS);
}

#[inline(always)]
fn decode_blocks(ty: GgmlType, row: &[u8], chunks: &mut [DecodedChunk], offsets: &mut [[f32; 2]]) {
    let per_block = ty.block_size() / CHUNK;
    let blocks = row.chunks_exact(ty.type_size());
    for ((block, chunks), offsets) in blocks
        .zip(chunks.chunks_exact_mut(per_block))
        .zip(offsets.chunks_exact_mut(per_block))
    {
        decode_block_scalar(ty, block, chunks, offsets);
    }
}

/// Copies a block's bytes into the fixed-size array its `from_bytes` takes.
#[inline(always)]
fn fixed<const N: usize>(block: &[u8]) -> [u8; N] {
    // Callers pass whole blocks of N bytes; a short slice (impossible) would decode as zeros.
    block
        .get(..N)
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; N])
}

/// Decodes one block: 1 chunk for 32-element types, 8 for K-quants and IQ4_XS.
#[inline(always)]
pub(crate) fn decode_block_scalar(
    ty: GgmlType,
    block: &[u8],
    chunks: &mut [DecodedChunk],
    offsets: &mut [[f32; 2]],
) {
    match ty {
        GgmlType::Q4_0 => {
            let b = BlockQ4_0::from_bytes(&fixed(block));
            let d = f16_le(b.d);
            nibbles(&b.qs, &mut chunks[0].q);
            chunks[0].set_scales(d, d);
            offsets[0] = [-8.0 * d; 2];
        }
        GgmlType::Q4_1 => {
            let b = BlockQ4_1::from_bytes(&fixed(block));
            let (d, m) = (f16_le(b.d), f16_le(b.m));
            nibbles(&b.qs, &mut chunks[0].q);
            chunks[0].set_scales(d, d);
            offsets[0] = [m; 2];
        }
        GgmlType::Q5_0 => {
            let b = BlockQ5_0::from_bytes(&fixed(block));
            let d = f16_le(b.d);
            nibbles(&b.qs, &mut chunks[0].q);
            fifth_bits(u32::from_le_bytes(b.qh), &mut chunks[0].q);
            chunks[0].set_scales(d, d);
            offsets[0] = [-16.0 * d; 2];
        }
        GgmlType::Q5_1 => {
            let b = BlockQ5_1::from_bytes(&fixed(block));
            let (d, m) = (f16_le(b.d), f16_le(b.m));
            nibbles(&b.qs, &mut chunks[0].q);
            fifth_bits(u32::from_le_bytes(b.qh), &mut chunks[0].q);
            chunks[0].set_scales(d, d);
            offsets[0] = [m; 2];
        }
        GgmlType::Q8_0 => {
            let b = BlockQ8_0::from_bytes(&fixed(block));
            let d = f16_le(b.d);
            chunks[0].q = b.qs;
            chunks[0].set_scales(d, d);
            offsets[0] = [0.0; 2];
        }
        GgmlType::IQ4_NL => {
            let b = BlockIq4Nl::from_bytes(&fixed(block));
            let d = f16_le(b.d);
            nibbles(&b.qs, &mut chunks[0].q);
            for q in chunks[0].q.iter_mut() {
                *q = IQ4_NL_VALUES[usize::from(*q)] as u8;
            }
            chunks[0].set_scales(d, d);
            offsets[0] = [0.0; 2];
        }
        GgmlType::Q2_K => {
            let b = BlockQ2K::from_bytes(&fixed(block));
            let (d, dmin) = (f16_le(b.d), f16_le(b.dmin));
            for (c, (chunk, offset)) in chunks.iter_mut().zip(offsets.iter_mut()).enumerate() {
                // Chunk c is sub-blocks 2c and 2c+1: bits 2(c%4).. of qs[32(c/4)..][..32].
                let (half, shift) = (c / 4, 2 * (c % 4));
                for (q, &byte) in chunk.q.iter_mut().zip(&b.qs[32 * half..32 * half + 32]) {
                    *q = (byte >> shift) & 3;
                }
                let (s0, s1) = (b.scales[2 * c], b.scales[2 * c + 1]);
                chunk.set_scales(d * f32::from(s0 & 15), d * f32::from(s1 & 15));
                *offset = [-(dmin * f32::from(s0 >> 4)), -(dmin * f32::from(s1 >> 4))];
            }
        }
        GgmlType::Q3_K => {
            let b = BlockQ3K::from_bytes(&fixed(block));
            let d = f16_le(b.d);
            let scales = q3_k_scales(&b.scales);
            for (c, (chunk, offset)) in chunks.iter_mut().zip(offsets.iter_mut()).enumerate() {
                // Low bits as in Q2_K; the third bit is bit c of hmask[0..32]. The stored value
                // is (low | high << 2) - 4, so q = low | high << 2 with an offset of -4 scales.
                let (half, shift) = (c / 4, 2 * (c % 4));
                let low = &b.qs[32 * half..32 * half + 32];
                for ((q, &byte), &mask) in chunk.q.iter_mut().zip(low).zip(&b.hmask) {
                    *q = ((byte >> shift) & 3) | (((mask >> c) & 1) << 2);
                }
                let s0 = d * f32::from(scales[2 * c]);
                let s1 = d * f32::from(scales[2 * c + 1]);
                chunk.set_scales(s0, s1);
                *offset = [-4.0 * s0, -4.0 * s1];
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (d, dmin, scales, qs, qh) = if ty == GgmlType::Q4_K {
                let b = BlockQ4K::from_bytes(&fixed(block));
                (b.d, b.dmin, b.scales, b.qs, None)
            } else {
                let b = BlockQ5K::from_bytes(&fixed(block));
                (b.d, b.dmin, b.scales, b.qs, Some(b.qh))
            };
            let (d, dmin) = (f16_le(d), f16_le(dmin));
            let (sc, mins) = k4_scales_mins(&scales);
            for (c, (chunk, offset)) in chunks.iter_mut().zip(offsets.iter_mut()).enumerate() {
                // Chunk 2k is the low nibbles of qs[32k..32k+32], chunk 2k+1 the high ones; Q5_K's
                // fifth bit of chunk c, element l is bit c of qh[l].
                let shift = 4 * (c % 2);
                for (l, (q, &byte)) in chunk.q.iter_mut().zip(&qs[32 * (c / 2)..]).enumerate() {
                    let high = qh.map_or(0, |qh| ((qh[l] >> c) & 1) << 4);
                    *q = ((byte >> shift) & 15) | high;
                }
                let s = d * f32::from(sc[c]);
                chunk.set_scales(s, s);
                *offset = [-(dmin * f32::from(mins[c])); 2];
            }
        }
        GgmlType::Q6_K => {
            let b = BlockQ6K::from_bytes(&fixed(block));
            let d = f16_le(b.d);
            for (c, (chunk, offset)) in chunks.iter_mut().zip(offsets.iter_mut()).enumerate() {
                // Chunk c lies in half c/4: nibble (c%4)/2 of ql[64(c/4) + 32(c%2)..][..32] and
                // bits 2(c%4).. of qh[32(c/4)..][..32]. The stored value is q - 32.
                let (half, k) = (c / 4, c % 4);
                let ql = &b.ql[64 * half + 32 * (k % 2)..][..32];
                let qh = &b.qh[32 * half..32 * half + 32];
                for ((q, &low), &high) in chunk.q.iter_mut().zip(ql).zip(qh) {
                    *q = ((low >> (4 * (k / 2))) & 15) | (((high >> (2 * k)) & 3) << 4);
                }
                let s0 = d * f32::from(b.scales[2 * c] as i8);
                let s1 = d * f32::from(b.scales[2 * c + 1] as i8);
                chunk.set_scales(s0, s1);
                *offset = [-32.0 * s0, -32.0 * s1];
            }
        }
        GgmlType::IQ4_XS => {
            let b = BlockIq4Xs::from_bytes(&fixed(block));
            let d = f16_le(b.d);
            let scales_h = u16::from_le_bytes(b.scales_h);
            for (c, (chunk, offset)) in chunks.iter_mut().zip(offsets.iter_mut()).enumerate() {
                let low = (b.scales_l[c / 2] >> (4 * (c % 2))) & 15;
                let high = ((scales_h >> (2 * c)) & 3) as u8;
                let s = d * f32::from((low | (high << 4)) as i8 - 32);
                let qs: &[u8; 16] = &fixed(&b.qs[16 * c..]);
                nibbles(qs, &mut chunk.q);
                for q in chunk.q.iter_mut() {
                    *q = IQ4_NL_VALUES[usize::from(*q)] as u8;
                }
                chunk.set_scales(s, s);
                *offset = [0.0; 2];
            }
        }
        // `is_block_quantized` gates every caller; an unknown type decodes to zeros.
        _ => {
            chunks.fill(DecodedChunk::ZERO);
            offsets.fill([0.0; 2]);
        }
    }
}

/// The legacy nibble layout: byte j holds element j (low nibble) and element j + 16 (high).
#[inline(always)]
fn nibbles(qs: &[u8; 16], q: &mut [u8; CHUNK]) {
    let (first, second) = q.split_at_mut(16);
    for ((&byte, lo), hi) in qs.iter().zip(first).zip(second) {
        *lo = byte & 15;
        *hi = byte >> 4;
    }
}

/// Adds Q5_0/Q5_1's fifth bits: bit j of `qh` belongs to element j.
#[inline(always)]
fn fifth_bits(qh: u32, q: &mut [u8; CHUNK]) {
    for (j, q) in q.iter_mut().enumerate() {
        *q |= (((qh >> j) & 1) as u8) << 4;
    }
}

/// Activations quantized to 8 bits per 32-element chunk: `x[i] ≈ d · q[i]` with
/// `d = max|x| / 127` and `q = round(x / d)` in −127..=127 (never −128, so that negating a
/// quant for a signed weight stays in range). A chunk holding a NaN or an infinity gets a NaN
/// or infinite `d`, so the outputs it touches are NaN, as in an exact product.
///
/// The scale is f32 rather than ggml's f16: it costs nothing here and removes one error term.
/// The rounding error per element is at most `d / 2`, which is what the tests' bounds rest on.
#[derive(Debug, Default)]
pub(crate) struct QuantizedActivations {
    /// Chunks per token (`cols / 32`).
    pub n_chunks: usize,
    /// Token t's chunk c is at `t * n_chunks + c`, in all three vectors.
    pub q: Vec<[i8; CHUNK]>,
    pub d: Vec<f32>,
    /// `d · Σ q` over each 16-element half, for the weight offsets.
    pub half_sums: Vec<[f32; 2]>,
    /// The two half sums added, for types whose offset is the same over a whole chunk.
    pub chunk_sums: Vec<f32>,
    /// `−128 · Σ q` over each chunk, in integers: the AVX-512 kernels multiply signed weights
    /// `w` (and, for offsets of `−k` scales (`offset_multiple`), `q − k`) as the unsigned bytes
    /// `w + 128` and start their sums from this; AVX2 starts from it shifted right, `−k · Σ q`.
    pub neg128_chunk_q_sums: Vec<i32>,
    /// `−128 · Σ q` over each 16-element half, for the types with a scale per half.
    pub neg128_half_q_sums: Vec<[i32; 2]>,
}

impl QuantizedActivations {
    /// Resizes for `n_tokens` tokens of `cols` values (a multiple of 32), keeping the buffers.
    pub fn reset(&mut self, n_tokens: usize, cols: usize) {
        self.n_chunks = cols / CHUNK;
        let n = n_tokens * self.n_chunks;
        self.q.resize(n, [0; CHUNK]);
        self.d.resize(n, 0.0);
        self.half_sums.resize(n, [0.0; 2]);
        self.chunk_sums.resize(n, 0.0);
        self.neg128_chunk_q_sums.resize(n, 0);
        self.neg128_half_q_sums.resize(n, [0; 2]);
    }

    /// Fills `chunk_sums` from `half_sums`, and `neg128_half_q_sums` and
    /// `neg128_chunk_q_sums` from `q`.
    pub fn sum_halves(&mut self) {
        sum_halves(
            &self.q,
            &self.half_sums,
            (
                &mut self.chunk_sums,
                &mut self.neg128_chunk_q_sums,
                &mut self.neg128_half_q_sums,
            ),
        );
    }
}

/// [`QuantizedActivations::sum_halves`] over matching ranges of chunks of its buffers (`q` and
/// `half_sums` in; chunk sums, `−128 · Σ q` per chunk and per half out), so that the threads
/// quantizing a prompt's tokens can sum their own.
pub(crate) fn sum_halves(
    q: &[[i8; CHUNK]],
    half_sums: &[[f32; 2]],
    (chunk_sums, neg128_chunk, neg128_half): (&mut [f32], &mut [i32], &mut [[i32; 2]]),
) {
    for (sum, halves) in chunk_sums.iter_mut().zip(half_sums) {
        *sum = halves[0] + halves[1];
    }
    for ((sum, half_sums), q) in neg128_chunk.iter_mut().zip(neg128_half).zip(q) {
        let (first, second) = q.split_at(CHUNK / 2);
        let neg128_sum = |q: &[i8]| -128 * q.iter().map(|&v| i32::from(v)).sum::<i32>();
        *half_sums = [neg128_sum(first), neg128_sum(second)];
        *sum = half_sums[0] + half_sums[1];
    }
}

/// Quantizes one 32-value chunk (the scalar definition; SIMD versions must match it exactly).
#[inline(always)]
pub(crate) fn quantize_chunk_scalar(x: &[f32], q: &mut [i8; CHUNK]) -> (f32, [f32; 2]) {
    // A NaN anywhere makes the scale NaN (`f32::max` would skip it), so that NaN activations
    // give NaN outputs as an exact product would, instead of being quietly zeroed.
    let amax = x.iter().fold(0f32, |m, v| {
        let a = v.abs();
        if a > m || a.is_nan() {
            a
        } else {
            m
        }
    });
    let d = amax / 127.0;
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut sums = [0i32; 2];
    for (i, (q, &v)) in q.iter_mut().zip(x).enumerate() {
        // Round half away from zero like C's roundf; the clamp only guards against the product
        // landing a hair above 127 after rounding of `inv`.
        let r = (v * inv).round().clamp(-127.0, 127.0) as i8;
        *q = r;
        sums[i / 16] += i32::from(r);
    }
    (d, [d * sums[0] as f32, d * sums[1] as f32])
}

/// Quantizes tokens `tokens` of `x` (rows of `acts.n_chunks * 32` values) into `acts`' buffers
/// `q`, `d`, `half_sums`, which hold exactly those tokens' chunks.
pub(crate) fn quantize_tokens_scalar(
    x: &[f32],
    q: &mut [[i8; CHUNK]],
    d: &mut [f32],
    half_sums: &mut [[f32; 2]],
) {
    for (((x, q), d), s) in x
        .chunks_exact(CHUNK)
        .zip(q.iter_mut())
        .zip(d.iter_mut())
        .zip(half_sums.iter_mut())
    {
        let (scale, sums) = quantize_chunk_scalar(x, q);
        *d = scale;
        *s = sums;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::quant::dequantize_to_f32;

    /// A deterministic xorshift generator, so tests need no dependency.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Decoding then evaluating `scale·q + offset` reproduces the dequantizer exactly: the
    /// decoded form is a rearrangement of the blocks, not an approximation.
    #[test]
    fn decoded_form_reproduces_dequantization() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for ty in GgmlType::all().filter(|&t| is_block_quantized(t)) {
            let n_blocks = 4;
            let mut data: Vec<u8> = (0..n_blocks * ty.type_size())
                .map(|_| rng.next_u64() as u8)
                .collect();
            // Keep f16 scales finite and modest: random bits would give NaNs and infinities.
            sanitize_f16_scales(ty, &mut data);
            let n = n_blocks * ty.block_size();
            let mut want = vec![0f32; n];
            dequantize_to_f32(ty, &data, &mut want).unwrap();
            let mut chunks = vec![DecodedChunk::ZERO; n / CHUNK];
            let mut offsets = vec![[0f32; 2]; n / CHUNK];
            decode_row_scalar(ty, &data, &mut chunks, &mut offsets);
            for (i, &w) in want.iter().enumerate() {
                let (c, e) = (i / CHUNK, i % CHUNK);
                let q = if is_signed(ty) {
                    f32::from(chunks[c].q[e] as i8)
                } else {
                    f32::from(chunks[c].q[e])
                };
                let got = chunks[c].scale[e / 4] * q + offsets[c][e / 16];
                assert_eq!(got, w, "{ty} element {i}");
            }
        }
    }

    /// Where `offset_multiple` names a `k`, every decoded offset is exactly `−k` times its
    /// half's scale (what the x86 kernels' integer offsets rely on), and `k` is a power of two
    /// no larger than 128 (they multiply by shifting `−128 · Σx`).
    #[test]
    fn offset_multiples_are_the_decoded_offsets() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let mut with_multiple = 0;
        for ty in GgmlType::all().filter(|&t| is_block_quantized(t)) {
            let k = offset_multiple(ty);
            if k == 0 {
                continue;
            }
            with_multiple += 1;
            assert!(
                k > 0 && k <= 128 && (k as u32).is_power_of_two(),
                "{ty}: {k}"
            );
            assert!(has_offset(ty) && !is_signed(ty), "{ty}");
            let n_blocks = 4;
            let mut data: Vec<u8> = (0..n_blocks * ty.type_size())
                .map(|_| rng.next_u64() as u8)
                .collect();
            sanitize_f16_scales(ty, &mut data);
            let n = n_blocks * ty.block_size() / CHUNK;
            let (mut chunks, mut offsets) = (vec![DecodedChunk::ZERO; n], vec![[0f32; 2]; n]);
            decode_row_scalar(ty, &data, &mut chunks, &mut offsets);
            for (chunk, offset) in chunks.iter().zip(&offsets) {
                for (h, &offset) in offset.iter().enumerate() {
                    assert_eq!(offset, -(k as f32) * chunk.scale[4 * h], "{ty}");
                }
            }
        }
        assert_eq!(with_multiple, 4, "Q4_0, Q5_0, Q3_K and Q6_K");
    }

    /// Overwrites the f16 scale fields of random blocks with values in ±[2^-10, 2^-4).
    pub(crate) fn sanitize_f16_scales(ty: GgmlType, data: &mut [u8]) {
        let fields: &[usize] = match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
            GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            GgmlType::IQ4_XS => &[0],
            _ => &[],
        };
        for block in data.chunks_exact_mut(ty.type_size()) {
            for &at in fields {
                // Exponent field 5..11 (2^-10..2^-4), any mantissa, any sign.
                let bits = u16::from_le_bytes([block[at], block[at + 1]]);
                let exponent = 5 + (bits >> 10) % 7;
                let fixed = (bits & 0x83FF) | (exponent << 10);
                block[at..at + 2].copy_from_slice(&fixed.to_le_bytes());
            }
        }
    }

    #[test]
    fn activation_quantization_is_within_half_a_step() {
        let mut rng = Rng(7);
        let x: Vec<f32> = (0..CHUNK * 3)
            .map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let mut q = vec![[0i8; CHUNK]; 3];
        let mut d = vec![0f32; 3];
        let mut s = vec![[0f32; 2]; 3];
        quantize_tokens_scalar(&x, &mut q, &mut d, &mut s);
        for (i, &v) in x.iter().enumerate() {
            let (c, e) = (i / CHUNK, i % CHUNK);
            assert!(
                (v - d[c] * f32::from(q[c][e])).abs() <= d[c] * 0.5001,
                "{i}"
            );
            assert!(q[c][e] != -128);
        }
        let zeros = [0f32; CHUNK];
        let mut qz = [1i8; CHUNK];
        assert_eq!(quantize_chunk_scalar(&zeros, &mut qz), (0.0, [0.0, 0.0]));
        assert_eq!(qz, [0; CHUNK]);
    }
}

//! Dequantization of GGML tensor data to f32 and f16.
//!
//! The f32 results are bit-for-bit those of gguf-py's `gguf.quants.dequantize` (the fixtures in
//! `engine/tests/fixtures/dequant` check every supported type). Each kernel follows gguf-py's
//! operation order: it first forms the per-block or per-sub-block factors the way gguf-py does
//! (for example `d * sc` as one product and `dmin * m` as another, both in f32) and then applies
//! them to each quant as a separate multiply and add/subtract. Rust never fuses `a * b + c` into
//! an FMA on its own, so the operations written here are the roundings performed.
//!
//! In these formats the products are in fact exact: an f16 scale has at most 11 significant bits
//! and the integer factors multiplied into it at most 12 more (Q6_K's 8-bit scale times a 6-bit
//! quant), within f32's 24. So the only rounding is the final add or subtract of an offset.
//! Following gguf-py's order anyway keeps exactness from resting on that argument alone.

use half::f16;

use super::blocks::{
    f16_le, BlockIq4Nl, BlockIq4Xs, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K,
    BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, QK32, QK_K,
};
use super::GgmlType;

/// Why a tensor could not be dequantized.
#[derive(Debug, thiserror::Error)]
pub enum DequantError {
    /// egpu has no dequantizer for this type (see [`can_dequantize`]).
    #[error("unsupported tensor type {0}")]
    Unsupported(GgmlType),
    /// The input bytes and the output length disagree with the type's block geometry: the output
    /// is not a whole number of blocks, or the input is not exactly that many blocks long.
    #[error(
        "tensor type {ty}: {bytes} bytes of blocks do not dequantize to {elements} elements \
         ({block_size} elements per {type_size}-byte block)",
        block_size = ty.block_size(),
        type_size = ty.type_size()
    )]
    Length {
        /// The tensor type being dequantized.
        ty: GgmlType,
        /// Length of the input in bytes.
        bytes: usize,
        /// Length of the output in elements.
        elements: usize,
    },
}

/// Whether [`dequantize_to_f32`] and [`dequantize_to_f16`] accept tensors of type `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::IQ4_NL
            | GgmlType::IQ4_XS
    )
}

/// Dequantizes `out.len()` elements of type `ty` from their GGML encoding in `data` (as stored in
/// a GGUF file: blocks back to back, little-endian, no alignment needed).
///
/// `out.len()` must be a whole number of blocks and `data` exactly that many blocks long. The
/// results equal gguf-py's `gguf.quants.dequantize` bit for bit.
pub fn dequantize_to_f32(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    check_supported_and_lengths(ty, data.len(), out.len())?;
    match ty {
        GgmlType::F32 => for_each_block::<4, 1>(data, out, |b, y| y[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => for_each_block::<2, 1>(data, out, |b, y| y[0] = f16_le(*b)),
        // A bf16 is the top half of an f32, so widening is a shift.
        GgmlType::BF16 => for_each_block::<2, 1>(data, out, |b, y| {
            y[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16)
        }),
        GgmlType::Q4_0 => for_each_block(data, out, |b, y| q4_0(&BlockQ4_0::from_bytes(b), y)),
        GgmlType::Q4_1 => for_each_block(data, out, |b, y| q4_1(&BlockQ4_1::from_bytes(b), y)),
        GgmlType::Q5_0 => for_each_block(data, out, |b, y| q5_0(&BlockQ5_0::from_bytes(b), y)),
        GgmlType::Q5_1 => for_each_block(data, out, |b, y| q5_1(&BlockQ5_1::from_bytes(b), y)),
        GgmlType::Q8_0 => for_each_block(data, out, |b, y| q8_0(&BlockQ8_0::from_bytes(b), y)),
        GgmlType::Q2_K => for_each_block(data, out, |b, y| q2_k(&BlockQ2K::from_bytes(b), y)),
        GgmlType::Q3_K => for_each_block(data, out, |b, y| q3_k(&BlockQ3K::from_bytes(b), y)),
        GgmlType::Q4_K => for_each_block(data, out, |b, y| q4_k(&BlockQ4K::from_bytes(b), y)),
        GgmlType::Q5_K => for_each_block(data, out, |b, y| q5_k(&BlockQ5K::from_bytes(b), y)),
        GgmlType::Q6_K => for_each_block(data, out, |b, y| q6_k(&BlockQ6K::from_bytes(b), y)),
        GgmlType::IQ4_NL => for_each_block(data, out, |b, y| iq4_nl(&BlockIq4Nl::from_bytes(b), y)),
        GgmlType::IQ4_XS => for_each_block(data, out, |b, y| iq4_xs(&BlockIq4Xs::from_bytes(b), y)),
        _ => return Err(DequantError::Unsupported(ty)),
    }
    Ok(())
}

/// Like [`dequantize_to_f32`], then rounds each value to the nearest f16 (ties to even; values
/// beyond f16's range become infinities).
///
/// The f32 values come from [`dequantize_to_f32`] itself, a few blocks at a time through a stack
/// buffer, so the two outputs can never disagree.
pub fn dequantize_to_f16(ty: GgmlType, data: &[u8], out: &mut [f16]) -> Result<(), DequantError> {
    check_supported_and_lengths(ty, data.len(), out.len())?;
    // Every supported block size (1, 32, 256) divides the buffer, so chunks hold whole blocks.
    const CHUNK_ELEMENTS: usize = QK_K;
    let chunk_bytes = CHUNK_ELEMENTS / ty.block_size() * ty.type_size();
    let mut buffer = [0f32; CHUNK_ELEMENTS];
    for (src, dst) in data.chunks(chunk_bytes).zip(out.chunks_mut(CHUNK_ELEMENTS)) {
        let wide = &mut buffer[..dst.len()];
        dequantize_to_f32(ty, src, wide)?;
        for (h, &f) in dst.iter_mut().zip(wide.iter()) {
            *h = f16::from_f32(f);
        }
    }
    Ok(())
}

/// Checks that `ty` has a dequantizer, then that `bytes` of input hold exactly the blocks of
/// `elements` outputs of that type.
fn check_supported_and_lengths(
    ty: GgmlType,
    bytes: usize,
    elements: usize,
) -> Result<(), DequantError> {
    if !can_dequantize(ty) {
        return Err(DequantError::Unsupported(ty));
    }
    let expected_bytes = elements
        .is_multiple_of(ty.block_size())
        .then(|| (elements / ty.block_size()).checked_mul(ty.type_size()))
        .flatten();
    if expected_bytes == Some(bytes) {
        Ok(())
    } else {
        Err(DequantError::Length {
            ty,
            bytes,
            elements,
        })
    }
}

/// Runs `kernel` on each `BYTES`-byte block of `data` and its `ELEMENTS` outputs. The caller has
/// checked that the two slices hold the same number of whole blocks.
#[inline(always)]
fn for_each_block<const BYTES: usize, const ELEMENTS: usize>(
    data: &[u8],
    out: &mut [f32],
    mut kernel: impl FnMut(&[u8; BYTES], &mut [f32; ELEMENTS]),
) {
    for (src, dst) in data.chunks_exact(BYTES).zip(out.chunks_exact_mut(ELEMENTS)) {
        // `chunks_exact` yields exactly the requested lengths, so both conversions succeed.
        if let (Ok(src), Ok(dst)) = (
            <&[u8; BYTES]>::try_from(src),
            <&mut [f32; ELEMENTS]>::try_from(dst),
        ) {
            kernel(src, dst);
        }
    }
}

/// Low nibble of `byte`.
#[inline(always)]
fn lo4(byte: u8) -> u8 {
    byte & 0x0F
}

/// High nibble of `byte`.
#[inline(always)]
fn hi4(byte: u8) -> u8 {
    byte >> 4
}

// Legacy 32-element blocks. Byte `j` of `qs` holds element `j` in its low nibble and element
// `j + 16` in its high nibble.

fn q4_0(block: &BlockQ4_0, y: &mut [f32; QK32]) {
    let d = f16_le(block.d);
    let (first, second) = y.split_at_mut(QK32 / 2);
    for ((&q, lo), hi) in block.qs.iter().zip(first).zip(second) {
        *lo = d * f32::from(lo4(q) as i8 - 8);
        *hi = d * f32::from(hi4(q) as i8 - 8);
    }
}

fn q4_1(block: &BlockQ4_1, y: &mut [f32; QK32]) {
    let d = f16_le(block.d);
    let m = f16_le(block.m);
    let (first, second) = y.split_at_mut(QK32 / 2);
    for ((&q, lo), hi) in block.qs.iter().zip(first).zip(second) {
        *lo = d * f32::from(lo4(q)) + m;
        *hi = d * f32::from(hi4(q)) + m;
    }
}

/// The 5-bit quant of element `j`: the nibble `low` plus bit `j` of the block's `qh` word.
#[inline(always)]
fn five_bit(low: u8, qh: u32, j: usize) -> u8 {
    low | ((((qh >> j) & 1) as u8) << 4)
}

fn q5_0(block: &BlockQ5_0, y: &mut [f32; QK32]) {
    let d = f16_le(block.d);
    let qh = u32::from_le_bytes(block.qh);
    let (first, second) = y.split_at_mut(QK32 / 2);
    for (j, ((&q, lo), hi)) in block.qs.iter().zip(first).zip(second).enumerate() {
        *lo = d * f32::from(five_bit(lo4(q), qh, j) as i8 - 16);
        *hi = d * f32::from(five_bit(hi4(q), qh, j + 16) as i8 - 16);
    }
}

fn q5_1(block: &BlockQ5_1, y: &mut [f32; QK32]) {
    let d = f16_le(block.d);
    let m = f16_le(block.m);
    let qh = u32::from_le_bytes(block.qh);
    let (first, second) = y.split_at_mut(QK32 / 2);
    for (j, ((&q, lo), hi)) in block.qs.iter().zip(first).zip(second).enumerate() {
        *lo = d * f32::from(five_bit(lo4(q), qh, j)) + m;
        *hi = d * f32::from(five_bit(hi4(q), qh, j + 16)) + m;
    }
}

fn q8_0(block: &BlockQ8_0, y: &mut [f32; QK32]) {
    let d = f16_le(block.d);
    for (&q, out) in block.qs.iter().zip(y.iter_mut()) {
        *out = d * f32::from(q as i8);
    }
}

// K-quants. Their 2-bit planes (Q2_K, Q3_K, Q6_K's high bits) share a layout: the block is two
// halves of 128 elements, and within half `h`, element `32 * s + l` sits in bits `2s..2s+2` of
// byte `32 * h + l`.

fn q2_k(block: &BlockQ2K, y: &mut [f32; QK_K]) {
    let d = f16_le(block.d);
    let dmin = f16_le(block.dmin);
    for (sub, (out, &packed)) in y.chunks_exact_mut(16).zip(&block.scales).enumerate() {
        // gguf-py rounds `d * scale` and `dmin * min` once per sub-block, then `dl * q - ml`.
        let dl = d * f32::from(lo4(packed));
        let ml = dmin * f32::from(hi4(packed));
        let (half, shift, l0) = (sub / 8, 2 * ((sub % 8) / 2), 16 * (sub % 2));
        let bytes = &block.qs[32 * half + l0..32 * half + l0 + 16];
        for (o, &byte) in out.iter_mut().zip(bytes) {
            *o = dl * f32::from((byte >> shift) & 3) - ml;
        }
    }
}

/// Unpacks Q3_K's sixteen 6-bit scales. Bytes 0..8 hold the low nibbles (scales 0..8 in the low
/// halves, 8..16 in the high halves); bytes 8..12 hold the top two bits, scale `4 * s + j` in
/// bits `2s..2s+2` of byte `8 + j`. The stored value is offset by 32.
#[inline(always)]
pub(crate) fn q3_k_scales(packed: &[u8; 12]) -> [i8; 16] {
    std::array::from_fn(|i| {
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        (low | (high << 4)) as i8 - 32
    })
}

fn q3_k(block: &BlockQ3K, y: &mut [f32; QK_K]) {
    let d = f16_le(block.d);
    let scales = q3_k_scales(&block.scales);
    for (sub, out) in y.chunks_exact_mut(16).enumerate() {
        let dl = d * f32::from(scales[sub]);
        let (half, shift, l0) = (sub / 8, 2 * ((sub % 8) / 2), 16 * (sub % 2));
        // The high bit of element `32 * b + l` is bit `b` of hmask[l]; a clear bit subtracts 4.
        let plane = sub / 2;
        let low_bytes = &block.qs[32 * half + l0..32 * half + l0 + 16];
        let mask_bytes = &block.hmask[l0..l0 + 16];
        for ((o, &low), &mask) in out.iter_mut().zip(low_bytes).zip(mask_bytes) {
            let offset = if (mask >> plane) & 1 == 0 { 4 } else { 0 };
            let q = ((low >> shift) & 3) as i8 - offset;
            *o = dl * f32::from(q);
        }
    }
}

/// Unpacks the eight 6-bit scales and eight 6-bit mins shared by Q4_K and Q5_K
/// (`get_scale_min_k4` in ggml). Bytes 0..4 and 4..8 hold scales and mins 0..4 in their low six
/// bits; scales and mins 4..8 take their low nibbles from bytes 8..12 and their top two bits
/// from the spare top bits of bytes 0..4 and 4..8.
#[inline(always)]
pub(crate) fn k4_scales_mins(packed: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let scales = std::array::from_fn(|j| {
        if j < 4 {
            packed[j] & 0x3F
        } else {
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 2) & 0x30)
        }
    });
    let mins = std::array::from_fn(|j| {
        if j < 4 {
            packed[j + 4] & 0x3F
        } else {
            (packed[j + 4] >> 4) | ((packed[j] >> 2) & 0x30)
        }
    });
    (scales, mins)
}

fn q4_k(block: &BlockQ4K, y: &mut [f32; QK_K]) {
    let d = f16_le(block.d);
    let dmin = f16_le(block.dmin);
    let (scales, mins) = k4_scales_mins(&block.scales);
    // Sub-block `2c` is the low nibbles of qs[32c..32c+32], sub-block `2c + 1` the high nibbles.
    for (sub, out) in y.chunks_exact_mut(32).enumerate() {
        let dl = d * f32::from(scales[sub]);
        let ml = dmin * f32::from(mins[sub]);
        let shift = 4 * (sub % 2);
        let bytes = &block.qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        for (o, &byte) in out.iter_mut().zip(bytes) {
            *o = dl * f32::from((byte >> shift) & 0x0F) - ml;
        }
    }
}

fn q5_k(block: &BlockQ5K, y: &mut [f32; QK_K]) {
    let d = f16_le(block.d);
    let dmin = f16_le(block.dmin);
    let (scales, mins) = k4_scales_mins(&block.scales);
    // Low bits as in Q4_K; the fifth bit of sub-block `s`, element `l` is bit `s` of qh[l].
    for (sub, out) in y.chunks_exact_mut(32).enumerate() {
        let dl = d * f32::from(scales[sub]);
        let ml = dmin * f32::from(mins[sub]);
        let shift = 4 * (sub % 2);
        let bytes = &block.qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        for ((o, &byte), &high) in out.iter_mut().zip(bytes).zip(&block.qh) {
            let q = ((byte >> shift) & 0x0F) | (((high >> sub) & 1) << 4);
            *o = dl * f32::from(q) - ml;
        }
    }
}

fn q6_k(block: &BlockQ6K, y: &mut [f32; QK_K]) {
    let d = f16_le(block.d);
    // Within half `h`, element `64 * k + m` takes its low nibble from nibble `k` of
    // ql[64h + m] and its top two bits from the shared 2-bit plane layout of qh.
    for (sub, out) in y.chunks_exact_mut(16).enumerate() {
        let dl = d * f32::from(block.scales[sub] as i8);
        let half = sub / 8;
        let within = 16 * (sub % 8);
        let (nibble, m0) = (within / 64, within % 64);
        let (plane, l0) = (within / 32, within % 32);
        let low_bytes = &block.ql[64 * half + m0..64 * half + m0 + 16];
        let high_bytes = &block.qh[32 * half + l0..32 * half + l0 + 16];
        for ((o, &low), &high) in out.iter_mut().zip(low_bytes).zip(high_bytes) {
            let q = ((low >> (4 * nibble)) & 0x0F) | (((high >> (2 * plane)) & 3) << 4);
            *o = dl * f32::from(q as i8 - 32);
        }
    }
}

/// The non-linear 4-bit codebook of IQ4_NL and IQ4_XS (`kvalues_iq4nl` in ggml).
pub(crate) const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

#[inline(always)]
fn iq4_value(index: u8) -> f32 {
    f32::from(IQ4_NL_VALUES[usize::from(index & 0x0F)])
}

fn iq4_nl(block: &BlockIq4Nl, y: &mut [f32; QK32]) {
    let d = f16_le(block.d);
    let (first, second) = y.split_at_mut(QK32 / 2);
    for ((&q, lo), hi) in block.qs.iter().zip(first).zip(second) {
        *lo = d * iq4_value(lo4(q));
        *hi = d * iq4_value(hi4(q));
    }
}

fn iq4_xs(block: &BlockIq4Xs, y: &mut [f32; QK_K]) {
    let d = f16_le(block.d);
    let scales_h = u16::from_le_bytes(block.scales_h);
    // Sub-block `s` (32 elements) has a 6-bit scale, offset by 32: low nibble from scales_l,
    // top two bits from scales_h; its indices are qs[16s..16s+16], low nibbles first.
    for (sub, out) in y.chunks_exact_mut(32).enumerate() {
        let low = (block.scales_l[sub / 2] >> (4 * (sub % 2))) & 0x0F;
        let high = ((scales_h >> (2 * sub)) & 3) as u8;
        let dl = d * f32::from((low | (high << 4)) as i8 - 32);
        let bytes = &block.qs[16 * sub..16 * sub + 16];
        let (first, second) = out.split_at_mut(16);
        for ((&q, lo), hi) in bytes.iter().zip(first).zip(second) {
            *lo = dl * iq4_value(lo4(q));
            *hi = dl * iq4_value(hi4(q));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_must_be_whole_matching_blocks() {
        let mut out = [0f32; 64];
        // Two Q4_0 blocks need 36 bytes.
        assert!(dequantize_to_f32(GgmlType::Q4_0, &[0; 36], &mut out).is_ok());
        for bytes in [0, 35, 37, 54] {
            let err = dequantize_to_f32(GgmlType::Q4_0, &vec![0; bytes], &mut out).unwrap_err();
            assert!(
                matches!(err, DequantError::Length { ty: GgmlType::Q4_0, bytes: b, elements: 64 } if b == bytes),
                "{err:?}"
            );
        }
        // 40 elements are not a whole number of 32-element blocks, whatever the input.
        let err = dequantize_to_f32(GgmlType::Q4_0, &[0; 18], &mut out[..40]).unwrap_err();
        assert!(matches!(err, DequantError::Length { elements: 40, .. }));
    }

    #[test]
    fn every_supported_type_has_a_kernel() {
        for ty in GgmlType::all().filter(|&ty| can_dequantize(ty)) {
            let elements = ty.block_size() * 3;
            let data = vec![0u8; ty.type_size() * 3];
            let mut wide = vec![f32::NAN; elements];
            dequantize_to_f32(ty, &data, &mut wide).unwrap();
            // All-zero blocks have zero scales, so every element is a zero.
            assert!(wide.iter().all(|&x| x == 0.0), "{ty}");
        }
        let supported = GgmlType::all().filter(|&ty| can_dequantize(ty)).count();
        assert_eq!(supported, 15);
    }

    #[test]
    fn unsupported_types_are_refused() {
        let mut out = [0f32; 256];
        let mut half_out = [f16::ZERO; 256];
        for ty in GgmlType::all().filter(|&ty| !can_dequantize(ty)) {
            // Correctly sized input, so the type alone is what gets refused.
            let data = vec![0u8; ty.bytes_for(256).unwrap() as usize];
            let err = dequantize_to_f32(ty, &data, &mut out).unwrap_err();
            assert!(
                matches!(err, DequantError::Unsupported(t) if t == ty),
                "{ty}: {err:?}"
            );
            let err = dequantize_to_f16(ty, &data, &mut half_out).unwrap_err();
            assert!(
                matches!(err, DequantError::Unsupported(t) if t == ty),
                "{ty}: {err:?}"
            );
        }
    }

    #[test]
    fn empty_tensors_are_fine() {
        assert!(dequantize_to_f32(GgmlType::Q6_K, &[], &mut []).is_ok());
        assert!(dequantize_to_f16(GgmlType::Q6_K, &[], &mut []).is_ok());
    }
}

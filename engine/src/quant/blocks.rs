//! On-disk layouts of the GGML quantization blocks egpu dequantizes.
//!
//! Each struct mirrors one `block_*` typedef in ggml's `ggml/src/ggml-common.h`, field for field
//! and in the same order. Every field is a byte array, so the structs have alignment 1 and no
//! padding, and `size_of` equals the block's size in a GGUF file (checked at compile time below).
//! Multi-byte fields stay as little-endian bytes; the accessors decode them.
//!
//! Blocks are copied out of the tensor bytes with [`from_bytes`](BlockQ4K::from_bytes) rather than
//! reinterpreted in place: a tensor's blocks are 18, 22, 110… bytes long, so most of them sit at
//! unaligned addresses, and copying keeps this module free of `unsafe`.

use std::mem::size_of;

/// Copies the `N` bytes at offset `AT` out of a `B`-byte block. The bounds are checked when the
/// function is instantiated, so a layout typo is a compile error, never a runtime panic.
#[inline(always)]
fn field<const AT: usize, const N: usize, const B: usize>(block: &[u8; B]) -> [u8; N] {
    const { assert!(AT + N <= B, "block field runs past the end of the block") };
    std::array::from_fn(|i| block[AT + i])
}

/// An IEEE half's bits as the f32 of the same value (exact: every half is an f32). NaNs keep
/// their sign and payload, moved across unchanged as numpy (and so gguf-py) does, where
/// hardware conversion would set the quiet bit.
///
/// Plain integer arithmetic and selects, inlined, so that loops over f16 data (decoding
/// weight blocks, the portable attention over an f16 KV cache) can vectorize. `half`'s
/// conversion is a call behind run-time feature detection on x86 and one inline-assembly
/// `fcvt` per value on arm64, and no loop around either can.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(bits: u16) -> f32 {
    let h = u32::from(bits);
    let sign = (h & 0x8000) << 16;
    let magnitude = h & 0x7fff;
    // Normal: the exponent rebased from 15 to 127, the mantissa widened from 10 to 23 bits.
    let normal = (magnitude << 13) + ((127 - 15) << 23);
    // Zero and subnormal: mantissa × 2⁻²⁴, both factors exact in f32.
    let subnormal = (magnitude as f32 * (1.0 / 16_777_216.0)).to_bits();
    // Infinity and NaN: all exponent bits set, the payload moved across.
    let special = 0x7f80_0000 | ((magnitude & 0x03ff) << 13);
    let magnitude = if magnitude < 0x0400 {
        subnormal
    } else if magnitude >= 0x7c00 {
        special
    } else {
        normal
    };
    f32::from_bits(sign | magnitude)
}

/// Decodes a little-endian IEEE half (`ggml_half`) to f32; the conversion is exact, and NaN
/// payloads move across unchanged as in gguf-py (see [`f16_bits_to_f32`]).
#[inline(always)]
pub(crate) fn f16_le(bytes: [u8; 2]) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes(bytes))
}

/// Number of elements in a K-quant super-block (`QK_K`).
pub(crate) const QK_K: usize = 256;
/// Number of elements in a legacy or IQ4_NL block (`QK4_0`, `QK8_0`, `QK4_NL`, …).
pub(crate) const QK32: usize = 32;

/// `block_q4_0`: 32 4-bit quants sharing one scale; `x = d * (q - 8)`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ4_0 {
    /// Scale (`ggml_half d`).
    pub d: [u8; 2],
    /// Nibbles: byte `j` holds element `j` (low) and element `j + 16` (high).
    pub qs: [u8; QK32 / 2],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// `block_q4_1`: 32 4-bit quants with a scale and an offset; `x = d * q + m`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ4_1 {
    /// Scale (`ggml_half d`).
    pub d: [u8; 2],
    /// Offset (`ggml_half m`).
    pub m: [u8; 2],
    /// Nibbles, arranged as in [`BlockQ4_0`].
    pub qs: [u8; QK32 / 2],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 20);

/// `block_q5_0`: 32 5-bit quants sharing one scale; `x = d * (q - 16)`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ5_0 {
    /// Scale (`ggml_half d`).
    pub d: [u8; 2],
    /// Fifth bits: bit `j` of this little-endian u32 belongs to element `j`.
    pub qh: [u8; 4],
    /// Low four bits, arranged as in [`BlockQ4_0`].
    pub qs: [u8; QK32 / 2],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);

/// `block_q5_1`: 32 5-bit quants with a scale and an offset; `x = d * q + m`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ5_1 {
    /// Scale (`ggml_half d`).
    pub d: [u8; 2],
    /// Offset (`ggml_half m`).
    pub m: [u8; 2],
    /// Fifth bits, as in [`BlockQ5_0`].
    pub qh: [u8; 4],
    /// Low four bits, arranged as in [`BlockQ4_0`].
    pub qs: [u8; QK32 / 2],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24);

/// `block_q8_0`: 32 signed 8-bit quants sharing one scale; `x = d * q`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ8_0 {
    /// Scale (`ggml_half d`).
    pub d: [u8; 2],
    /// Quants as `int8_t`.
    pub qs: [u8; QK32],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);

/// `block_q2_K`: 256 2-bit quants in 16 sub-blocks of 16, each with a 4-bit scale and 4-bit min.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ2K {
    /// Per sub-block: scale in the low nibble, min in the high nibble.
    pub scales: [u8; QK_K / 16],
    /// Quants, four per byte (see `dequantize_q2_k` for the order).
    pub qs: [u8; QK_K / 4],
    /// Super-block scale for the sub-block scales (`ggml_half d`).
    pub d: [u8; 2],
    /// Super-block scale for the sub-block mins (`ggml_half dmin`).
    pub dmin: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ2K>() == 84);

/// `block_q3_K`: 256 3-bit quants in 16 sub-blocks of 16, each with a 6-bit signed scale.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ3K {
    /// High (third) bits; bit `b` of byte `l` belongs to element `32 * b + l`.
    pub hmask: [u8; QK_K / 8],
    /// Low two bits, four per byte.
    pub qs: [u8; QK_K / 4],
    /// Sixteen 6-bit scales packed into 12 bytes.
    pub scales: [u8; 12],
    /// Super-block scale (`ggml_half d`).
    pub d: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ3K>() == 110);

/// `block_q4_K`: 256 4-bit quants in 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ4K {
    /// Super-block scale for the sub-block scales (`ggml_half d`).
    pub d: [u8; 2],
    /// Super-block scale for the sub-block mins (`ggml_half dmin`).
    pub dmin: [u8; 2],
    /// Eight 6-bit scales and eight 6-bit mins packed into `K_SCALE_SIZE` = 12 bytes.
    pub scales: [u8; 12],
    /// Quants, two per byte.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// `block_q5_K`: like `block_q4_K` with a fifth bit per quant.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ5K {
    /// Super-block scale for the sub-block scales (`ggml_half d`).
    pub d: [u8; 2],
    /// Super-block scale for the sub-block mins (`ggml_half dmin`).
    pub dmin: [u8; 2],
    /// Packed as in [`BlockQ4K`].
    pub scales: [u8; 12],
    /// Fifth bits; bit `j` of byte `l` belongs to element `32 * j + l`.
    pub qh: [u8; QK_K / 8],
    /// Low four bits, two per byte.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176);

/// `block_q6_K`: 256 6-bit quants in 16 sub-blocks of 16, each with a signed 8-bit scale.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ6K {
    /// Low four bits, two per byte.
    pub ql: [u8; QK_K / 2],
    /// High two bits, four per byte.
    pub qh: [u8; QK_K / 4],
    /// Sub-block scales as `int8_t`.
    pub scales: [u8; QK_K / 16],
    /// Super-block scale (`ggml_half d`).
    pub d: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

/// `block_iq4_nl`: 32 4-bit indices into a fixed non-linear table, sharing one scale.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockIq4Nl {
    /// Scale (`ggml_half d`).
    pub d: [u8; 2],
    /// Table indices, arranged as in [`BlockQ4_0`].
    pub qs: [u8; QK32 / 2],
}
const _: () = assert!(size_of::<BlockIq4Nl>() == 18);

/// `block_iq4_xs`: 256 IQ4_NL-style indices in 8 sub-blocks of 32, each with a 6-bit scale.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockIq4Xs {
    /// Super-block scale (`ggml_half d`).
    pub d: [u8; 2],
    /// High two bits of the eight sub-block scales, as a little-endian u16.
    pub scales_h: [u8; 2],
    /// Low four bits of the eight sub-block scales, two per byte.
    pub scales_l: [u8; QK_K / 64],
    /// Table indices, two per byte.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockIq4Xs>() == 136);

impl BlockQ4_0 {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: field::<0, 2, { Self::BYTES }>(b),
            qs: field::<2, 16, { Self::BYTES }>(b),
        }
    }
}

impl BlockQ4_1 {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: field::<0, 2, { Self::BYTES }>(b),
            m: field::<2, 2, { Self::BYTES }>(b),
            qs: field::<4, 16, { Self::BYTES }>(b),
        }
    }
}

impl BlockQ5_0 {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: field::<0, 2, { Self::BYTES }>(b),
            qh: field::<2, 4, { Self::BYTES }>(b),
            qs: field::<6, 16, { Self::BYTES }>(b),
        }
    }
}

impl BlockQ5_1 {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: field::<0, 2, { Self::BYTES }>(b),
            m: field::<2, 2, { Self::BYTES }>(b),
            qh: field::<4, 4, { Self::BYTES }>(b),
            qs: field::<8, 16, { Self::BYTES }>(b),
        }
    }
}

impl BlockQ8_0 {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: field::<0, 2, { Self::BYTES }>(b),
            qs: field::<2, 32, { Self::BYTES }>(b),
        }
    }
}

impl BlockQ2K {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            scales: field::<0, 16, { Self::BYTES }>(b),
            qs: field::<16, 64, { Self::BYTES }>(b),
            d: field::<80, 2, { Self::BYTES }>(b),
            dmin: field::<82, 2, { Self::BYTES }>(b),
        }
    }
}

impl BlockQ3K {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            hmask: field::<0, 32, { Self::BYTES }>(b),
            qs: field::<32, 64, { Self::BYTES }>(b),
            scales: field::<96, 12, { Self::BYTES }>(b),
            d: field::<108, 2, { Self::BYTES }>(b),
        }
    }
}

impl BlockQ4K {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: field::<0, 2, { Self::BYTES }>(b),
            dmin: field::<2, 2, { Self::BYTES }>(b),
            scales: field::<4, 12, { Self::BYTES }>(b),
            qs: field::<16, 128, { Self::BYTES }>(b),
        }
    }
}

impl BlockQ5K {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: field::<0, 2, { Self::BYTES }>(b),
            dmin: field::<2, 2, { Self::BYTES }>(b),
            scales: field::<4, 12, { Self::BYTES }>(b),
            qh: field::<16, 32, { Self::BYTES }>(b),
            qs: field::<48, 128, { Self::BYTES }>(b),
        }
    }
}

impl BlockQ6K {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            ql: field::<0, 128, { Self::BYTES }>(b),
            qh: field::<128, 64, { Self::BYTES }>(b),
            scales: field::<192, 16, { Self::BYTES }>(b),
            d: field::<208, 2, { Self::BYTES }>(b),
        }
    }
}

impl BlockIq4Nl {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: field::<0, 2, { Self::BYTES }>(b),
            qs: field::<2, 16, { Self::BYTES }>(b),
        }
    }
}

impl BlockIq4Xs {
    /// Bytes per block.
    pub const BYTES: usize = size_of::<Self>();

    /// Copies a block out of its on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: field::<0, 2, { Self::BYTES }>(b),
            scales_h: field::<2, 2, { Self::BYTES }>(b),
            scales_l: field::<4, 4, { Self::BYTES }>(b),
            qs: field::<8, 128, { Self::BYTES }>(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::GgmlType;
    use half::f16;
    use std::mem::{align_of, offset_of};

    /// Every one of the 65536 halves: the bits of `half`'s conversion, except that a NaN keeps
    /// its payload unquieted (the hardware conversion `half` may use sets the quiet bit).
    #[test]
    fn f16_bits_to_f32_is_exact_for_every_half() {
        for bits in 0..=u16::MAX {
            let got = f16_bits_to_f32(bits);
            let want = f16::from_bits(bits).to_f32();
            if want.is_nan() {
                let sign = u32::from(bits & 0x8000) << 16;
                let payload = u32::from(bits & 0x03ff) << 13;
                assert_eq!(got.to_bits(), sign | 0x7f80_0000 | payload, "{bits:#06x}");
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    /// The hand-written offsets in `from_bytes` must match where `repr(C)` puts each field, and
    /// every block must be exactly the size `GgmlType`'s table gives its type.
    #[test]
    fn layouts_match_the_type_table_and_field_offsets() {
        let sizes = [
            (GgmlType::Q4_0, BlockQ4_0::BYTES, align_of::<BlockQ4_0>()),
            (GgmlType::Q4_1, BlockQ4_1::BYTES, align_of::<BlockQ4_1>()),
            (GgmlType::Q5_0, BlockQ5_0::BYTES, align_of::<BlockQ5_0>()),
            (GgmlType::Q5_1, BlockQ5_1::BYTES, align_of::<BlockQ5_1>()),
            (GgmlType::Q8_0, BlockQ8_0::BYTES, align_of::<BlockQ8_0>()),
            (GgmlType::Q2_K, BlockQ2K::BYTES, align_of::<BlockQ2K>()),
            (GgmlType::Q3_K, BlockQ3K::BYTES, align_of::<BlockQ3K>()),
            (GgmlType::Q4_K, BlockQ4K::BYTES, align_of::<BlockQ4K>()),
            (GgmlType::Q5_K, BlockQ5K::BYTES, align_of::<BlockQ5K>()),
            (GgmlType::Q6_K, BlockQ6K::BYTES, align_of::<BlockQ6K>()),
            (
                GgmlType::IQ4_NL,
                BlockIq4Nl::BYTES,
                align_of::<BlockIq4Nl>(),
            ),
            (
                GgmlType::IQ4_XS,
                BlockIq4Xs::BYTES,
                align_of::<BlockIq4Xs>(),
            ),
        ];
        for (ty, bytes, align) in sizes {
            assert_eq!(bytes, ty.type_size(), "{ty}");
            assert_eq!(align, 1, "{ty} must be readable at any address");
        }

        assert_eq!(offset_of!(BlockQ4_1, qs), 4);
        assert_eq!(offset_of!(BlockQ5_0, qs), 6);
        assert_eq!(offset_of!(BlockQ5_1, qh), 4);
        assert_eq!(offset_of!(BlockQ5_1, qs), 8);
        assert_eq!(offset_of!(BlockQ2K, qs), 16);
        assert_eq!(offset_of!(BlockQ2K, d), 80);
        assert_eq!(offset_of!(BlockQ2K, dmin), 82);
        assert_eq!(offset_of!(BlockQ3K, qs), 32);
        assert_eq!(offset_of!(BlockQ3K, scales), 96);
        assert_eq!(offset_of!(BlockQ3K, d), 108);
        assert_eq!(offset_of!(BlockQ4K, scales), 4);
        assert_eq!(offset_of!(BlockQ4K, qs), 16);
        assert_eq!(offset_of!(BlockQ5K, qh), 16);
        assert_eq!(offset_of!(BlockQ5K, qs), 48);
        assert_eq!(offset_of!(BlockQ6K, qh), 128);
        assert_eq!(offset_of!(BlockQ6K, scales), 192);
        assert_eq!(offset_of!(BlockQ6K, d), 208);
        assert_eq!(offset_of!(BlockIq4Xs, scales_l), 4);
        assert_eq!(offset_of!(BlockIq4Xs, qs), 8);
    }

    /// Every f16 widens exactly; NaNs keep their sign and payload bits unchanged (no quiet bit
    /// added), which is what numpy does and so what the reference values contain.
    #[test]
    fn f16_widening_is_exact_and_keeps_nan_payloads() {
        for bits in 0..=u16::MAX {
            let wide = f16_le(bits.to_le_bytes());
            let narrow = f16::from_bits(bits);
            if narrow.is_nan() {
                let w = wide.to_bits();
                assert!(wide.is_nan(), "{bits:#06x}");
                assert_eq!(w >> 31, u32::from(bits >> 15), "{bits:#06x} sign");
                assert_eq!(
                    w & 0x007F_FFFF,
                    u32::from(bits & 0x03FF) << 13,
                    "{bits:#06x} payload"
                );
            } else {
                assert_eq!(
                    f16::from_f32(wide).to_bits(),
                    bits,
                    "{bits:#06x} round trip"
                );
                assert_eq!(wide, narrow.to_f64() as f32, "{bits:#06x} value");
            }
        }
    }

    /// `from_bytes` must put every input byte in the field that owns it: numbering the bytes
    /// and reading them back field by field in declaration order must give 0, 1, 2, …
    #[test]
    fn from_bytes_keeps_byte_order() {
        fn numbered<const N: usize>() -> [u8; N] {
            std::array::from_fn(|i| i as u8)
        }
        let b = BlockQ6K::from_bytes(&numbered());
        let flat: Vec<u8> = [&b.ql[..], &b.qh, &b.scales, &b.d].concat();
        assert_eq!(flat, numbered::<210>().to_vec());

        let b = BlockQ5K::from_bytes(&numbered());
        let flat: Vec<u8> = [&b.d[..], &b.dmin, &b.scales, &b.qh, &b.qs].concat();
        assert_eq!(flat, numbered::<176>().to_vec());

        let b = BlockQ3K::from_bytes(&numbered());
        let flat: Vec<u8> = [&b.hmask[..], &b.qs, &b.scales, &b.d].concat();
        assert_eq!(flat, numbered::<110>().to_vec());

        let b = BlockQ2K::from_bytes(&numbered());
        let flat: Vec<u8> = [&b.scales[..], &b.qs, &b.d, &b.dmin].concat();
        assert_eq!(flat, numbered::<84>().to_vec());

        let b = BlockIq4Xs::from_bytes(&numbered());
        let flat: Vec<u8> = [&b.d[..], &b.scales_h, &b.scales_l, &b.qs].concat();
        assert_eq!(flat, numbered::<136>().to_vec());

        let b = BlockQ5_1::from_bytes(&numbered());
        let flat: Vec<u8> = [&b.d[..], &b.m, &b.qh, &b.qs].concat();
        assert_eq!(flat, numbered::<24>().to_vec());
    }
}

//! Scalar arithmetic the kernels and the per-row operations share.

/// `eˣ` to within 2 ulp over the whole f32 range (inputs are clamped to [−87.3, 88.3], so
/// the result is never 0 or ∞). Written with plain arithmetic and bit casts so that loops
/// calling it vectorize, unlike `f32::exp`; softmax and the gated activations call it millions
/// of times per prompt.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact for |n| ≤ 2⁸.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Written as selects (not `clamp`, whose NaN rule blocks vectorization): min/max.
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.3 { 88.3 } else { x };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The low mantissa bits of `shifted` hold the integer n itself: no float-to-int conversion.
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor series of eʳ to r⁶ for |r| ≤ ln2/2: truncation error < 1.3e-7 relative.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    p * scale
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
pub fn f16_to_f32(bits: u16) -> f32 {
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

/// `y[i] += a · x[i]`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    /// Every one of the 65536 halves: the bits of `half`'s conversion, except that a NaN keeps
    /// its payload unquieted (the hardware conversion `half` may use sets the quiet bit).
    #[test]
    fn f16_to_f32_is_exact_for_every_half() {
        for bits in 0..=u16::MAX {
            let got = super::f16_to_f32(bits);
            let want = half::f16::from_bits(bits).to_f32();
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
}

//! f32 to Q8_0, as ggml's reference quantizer (`quantize_row_q8_0_ref`) and gguf-py do it: per
//! block of 32, `d = max|x| / 127` stored as f16, `q = round(x / d)` with halves rounded away from
//! zero, and all-zero quants when the block is all zero.

use half::f16;

use super::types::GgmlType;

/// Quantizes `x` (a multiple of 32 values) to Q8_0 blocks; `None` if its length is not.
pub fn quantize_q8_0(x: &[f32]) -> Option<Vec<u8>> {
    let block = GgmlType::Q8_0.block_size();
    if !x.len().is_multiple_of(block) {
        return None;
    }
    let mut out = Vec::with_capacity(x.len() / block * GgmlType::Q8_0.type_size());
    for chunk in x.chunks_exact(block) {
        let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(chunk.iter().map(|v| ((v * inverse).round() as i8) as u8));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_to_f32;

    #[test]
    fn round_trip_error_is_at_most_half_a_step() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let q = quantize_q8_0(&x).unwrap();
        assert_eq!(q.len(), 3 * 34);
        let mut y = vec![0.0; 96];
        dequantize_to_f32(GgmlType::Q8_0, &q, &mut y).unwrap();
        for (block, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let d = f16::from_le_bytes([q[block * 34], q[block * 34 + 1]]).to_f32();
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!((d - amax / 127.0).abs() <= amax / 127.0 * 1e-3);
            for (a, b) in xs.iter().zip(ys) {
                assert!((a - b).abs() <= d * 0.5 + amax * 1e-3, "{a} vs {b}");
            }
        }
        assert!(quantize_q8_0(&x[..31]).is_none());
        assert!(quantize_q8_0(&[0.0; 32]).unwrap()[2..]
            .iter()
            .all(|&b| b == 0));
    }
}

//! GGML tensor types and the dequantization of their blocks.

pub(crate) mod blocks;
mod dequant;
mod types;

mod quantize;
pub(crate) use blocks::f16_bits_to_f32;
pub use dequant::{can_dequantize, dequantize_to_f16, dequantize_to_f32, DequantError};
pub(crate) use dequant::{k4_scales_mins, q3_k_scales, IQ4_NL_VALUES};
pub use quantize::quantize_q8_0;
pub use types::GgmlType;

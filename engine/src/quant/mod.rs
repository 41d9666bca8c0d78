//! GGML tensor types and the dequantization of their blocks.

mod blocks;
mod dequant;
mod types;

pub use dequant::{can_dequantize, dequantize_to_f16, dequantize_to_f32, DequantError};
pub use types::GgmlType;

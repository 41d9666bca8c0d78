//! GGML tensor types and the dequantization of their blocks.

mod types;

pub use types::GgmlType;

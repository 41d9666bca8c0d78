use std::path::PathBuf;

use crate::quant::GgmlType;

/// Everything that can be wrong with a GGUF file. Parse errors name the byte offset at which the
/// problem was found, so a user can look at the file with a hex dump.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("not a GGUF file: magic bytes are {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: Vec<u8> },

    #[error("unsupported GGUF version {version} (egpu reads versions 2 and 3){hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },

    #[error("file truncated at offset {offset}: {what} needs {needed} bytes, {available} remain")]
    Truncated {
        offset: u64,
        what: &'static str,
        needed: u64,
        available: u64,
    },

    #[error("{what} count {count} at offset {offset} exceeds the limit of {max}")]
    CountTooLarge {
        offset: u64,
        what: &'static str,
        count: u64,
        max: u64,
    },

    #[error("string of {len} bytes at offset {offset} exceeds the limit of {max}")]
    StringTooLong { offset: u64, len: u64, max: u64 },

    #[error("string at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: u64 },

    #[error("unknown metadata value type {type_id} at offset {offset}")]
    UnknownValueType { offset: u64, type_id: u32 },

    #[error("metadata arrays nested deeper than {max} at offset {offset}")]
    ArrayTooDeep { offset: u64, max: usize },

    #[error("duplicate metadata key {key:?} at offset {offset}")]
    DuplicateKey { offset: u64, key: String },

    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    MetadataType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },

    #[error("general.alignment {value} is invalid: it must be a power of two between 1 and {max}")]
    BadAlignment { value: u64, max: u64 },

    #[error("tensor {tensor:?} at offset {offset}: {n_dims} dimensions, at most {max} allowed")]
    TooManyDims {
        offset: u64,
        tensor: String,
        n_dims: u32,
        max: u32,
    },

    #[error(
        "tensor {tensor:?} at offset {offset}: dimension {index} is {value}, expected 1..={max}"
    )]
    BadDim {
        offset: u64,
        tensor: String,
        index: usize,
        value: u64,
        max: u64,
    },

    #[error("tensor {tensor:?} at offset {offset}: element count overflows")]
    SizeOverflow { offset: u64, tensor: String },

    #[error("tensor {tensor:?} at offset {offset}: unknown ggml type id {type_id}")]
    UnknownTensorType {
        offset: u64,
        tensor: String,
        type_id: u32,
    },

    #[error(
        "tensor {tensor:?}: first dimension {row} is not a multiple of {ty}'s block size {block}"
    )]
    NotBlockMultiple {
        tensor: String,
        ty: GgmlType,
        row: u64,
        block: usize,
    },

    #[error("duplicate tensor name {tensor:?} at offset {offset}")]
    DuplicateTensor { offset: u64, tensor: String },

    #[error("tensor {tensor:?}: data offset {data_offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        tensor: String,
        data_offset: u64,
        alignment: u64,
    },

    #[error("tensor {tensor:?}: data [{start}, {end}) lies outside the file ({file_len} bytes)")]
    TensorOutOfBounds {
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },

    #[error("tensors {first:?} and {second:?} overlap at file offset {offset}")]
    TensorOverlap {
        first: String,
        second: String,
        offset: u64,
    },

    #[error("split model: {0}")]
    Split(String),

    #[error("no tensor named {0:?}")]
    NoSuchTensor(String),

    #[error("unsupported tensor type {ty} in tensor {tensor:?}")]
    UnsupportedTensorType { tensor: String, ty: GgmlType },
}

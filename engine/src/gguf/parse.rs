//! The GGUF header parser: a bounds-checked cursor over untrusted bytes.
//!
//! Every read checks the bytes that remain first, every count is capped and also bounded by the
//! bytes that remain (each element needs at least one byte), so nothing is allocated or looped
//! over in proportion to a number the file merely claims. Work is linear in the file's size.

use std::collections::HashMap;

use super::error::GgufError;
use super::metadata::{MetaArray, MetaValue, Metadata, ValueType};
use super::TensorInfo;
use crate::quant::GgmlType;

/// "GGUF" read as a little-endian u32.
const MAGIC: &[u8; 4] = b"GGUF";
/// Longest string accepted (chat templates run to tens of KB; 16 MiB is far beyond any real key).
pub const MAX_STRING_LEN: u64 = 16 << 20;
/// Most elements in one metadata array (the largest vocabularies are ~262k, merges ~500k).
pub const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Deepest nesting of arrays within arrays.
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Most metadata entries.
pub const MAX_KV_COUNT: u64 = 1 << 16;
/// Most tensors (MoE models reach a few thousand).
pub const MAX_TENSOR_COUNT: u64 = 1 << 20;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// Largest single dimension and element count (ggml indexes with `int64_t`).
pub const MAX_DIM: u64 = i64::MAX as u64;
/// Largest `general.alignment` accepted.
pub const MAX_ALIGNMENT: u64 = 1 << 16;
/// Alignment when the file does not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The parsed header of one GGUF file: everything before the tensor data.
#[derive(Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset where tensor data begins.
    pub data_start: u64,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                offset: self.offset(),
                what,
                needed: n,
                available: self.remaining(),
            });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that the bytes remaining could hold, at `min_size` bytes per element.
    fn count(&mut self, what: &'static str, max: u64, min_size: u64) -> Result<u64, GgufError> {
        let offset = self.offset();
        let count = self.u64(what)?;
        if count > max {
            return Err(GgufError::CountTooLarge {
                offset,
                what,
                count,
                max,
            });
        }
        let needed = count.saturating_mul(min_size);
        if needed > self.remaining() {
            return Err(GgufError::Truncated {
                offset: self.offset(),
                what,
                needed,
                available: self.remaining(),
            });
        }
        Ok(count)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let offset = self.offset();
        let len = self.u64("string length")?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::StringTooLong {
                offset,
                len,
                max: MAX_STRING_LEN,
            });
        }
        let bytes = self.take(len, "string")?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 { offset: offset + 8 }),
        }
    }

    fn value_type(&mut self) -> Result<ValueType, GgufError> {
        let offset = self.offset();
        let id = self.u32("value type")?;
        ValueType::from_id(id).ok_or(GgufError::UnknownValueType {
            offset,
            type_id: id,
        })
    }

    fn value(&mut self, ty: ValueType, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(self.u8("u8 value")?),
            ValueType::I8 => MetaValue::I8(self.u8("i8 value")? as i8),
            ValueType::U16 => MetaValue::U16(self.u16("u16 value")?),
            ValueType::I16 => MetaValue::I16(self.u16("i16 value")? as i16),
            ValueType::U32 => MetaValue::U32(self.u32("u32 value")?),
            ValueType::I32 => MetaValue::I32(self.u32("i32 value")? as i32),
            ValueType::F32 => MetaValue::F32(f32::from_bits(self.u32("f32 value")?)),
            ValueType::U64 => MetaValue::U64(self.u64("u64 value")?),
            ValueType::I64 => MetaValue::I64(self.u64("i64 value")? as i64),
            ValueType::F64 => MetaValue::F64(f64::from_bits(self.u64("f64 value")?)),
            ValueType::Bool => MetaValue::Bool(self.u8("bool value")? != 0),
            ValueType::String => MetaValue::String(self.string()?),
            ValueType::Array => MetaValue::Array(self.meta_array(depth + 1)?),
        })
    }

    fn meta_array(&mut self, depth: usize) -> Result<MetaArray, GgufError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::ArrayTooDeep {
                offset: self.offset(),
                max: MAX_ARRAY_DEPTH,
            });
        }
        let ty = self.value_type()?;
        let n = self.count("array element", MAX_ARRAY_LEN, ty.min_encoded_size())? as usize;
        // `n` is now bounded by the bytes that remain, so these allocations are too.
        macro_rules! fixed {
            ($variant:ident, $read:expr) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push($read(&mut *self)?);
                }
                MetaArray::$variant(v)
            }};
        }
        Ok(match ty {
            ValueType::U8 => MetaArray::U8(self.take(n as u64, "u8 array")?.to_vec()),
            ValueType::I8 => MetaArray::I8(
                self.take(n as u64, "i8 array")?
                    .iter()
                    .map(|&b| b as i8)
                    .collect(),
            ),
            ValueType::Bool => MetaArray::Bool(
                self.take(n as u64, "bool array")?
                    .iter()
                    .map(|&b| b != 0)
                    .collect(),
            ),
            ValueType::U16 => fixed!(U16, |c: &mut Self| c.u16("u16 element")),
            ValueType::I16 => fixed!(I16, |c: &mut Self| c.u16("i16 element").map(|v| v as i16)),
            ValueType::U32 => fixed!(U32, |c: &mut Self| c.u32("u32 element")),
            ValueType::I32 => fixed!(I32, |c: &mut Self| c.u32("i32 element").map(|v| v as i32)),
            ValueType::F32 => fixed!(F32, |c: &mut Self| c.u32("f32 element").map(f32::from_bits)),
            ValueType::U64 => fixed!(U64, |c: &mut Self| c.u64("u64 element")),
            ValueType::I64 => fixed!(I64, |c: &mut Self| c.u64("i64 element").map(|v| v as i64)),
            ValueType::F64 => fixed!(F64, |c: &mut Self| c.u64("f64 element").map(f64::from_bits)),
            ValueType::String => fixed!(String, |c: &mut Self| c.string()),
            ValueType::Array => fixed!(Array, |c: &mut Self| c.meta_array(depth + 1)),
        })
    }
}

/// Parses the header of a GGUF file held in `bytes` and checks every tensor against the file.
pub(crate) fn parse_header(bytes: &[u8]) -> Result<Header, GgufError> {
    let mut cur = Cursor { bytes, pos: 0 };
    let magic = cur.take(4, "magic").map_err(|_| GgufError::BadMagic {
        found: bytes[..bytes.len().min(4)].to_vec(),
    })?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.to_vec(),
        });
    }
    let version = cur.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(GgufError::UnsupportedVersion {
                version,
                hint: "; version 1 used 32-bit counts: convert the file with a current llama.cpp",
            })
        }
        v if v.swap_bytes() <= 3 => {
            return Err(GgufError::UnsupportedVersion {
                version,
                hint: "; this looks like a big-endian GGUF, which egpu does not read",
            })
        }
        _ => return Err(GgufError::UnsupportedVersion { version, hint: "" }),
    }

    // Each tensor record is at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes,
    // and each key/value at least 8 (key length) + 4 (type) + 1 byte.
    let tensor_count = cur.count("tensor", MAX_TENSOR_COUNT, 24)?;
    let kv_count = cur.count("metadata entry", MAX_KV_COUNT, 13)?;

    let mut metadata = Metadata::default();
    for _ in 0..kv_count {
        let key_offset = cur.offset();
        let key = cur.string()?;
        let ty = cur.value_type()?;
        let value = cur.value(ty, 0)?;
        if !metadata.insert(key.clone(), value) {
            return Err(GgufError::DuplicateKey {
                offset: key_offset,
                key,
            });
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(v)) => u64::from(*v),
        Some(other) => match other.as_u64() {
            Some(v) => v,
            None => {
                return Err(GgufError::MetadataType {
                    key: "general.alignment".into(),
                    expected: "u32",
                    found: other.value_type().name(),
                })
            }
        },
    };
    if alignment == 0 || !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
        return Err(GgufError::BadAlignment {
            value: alignment,
            max: MAX_ALIGNMENT,
        });
    }

    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut names: HashMap<String, ()> = HashMap::with_capacity(tensor_count as usize);
    for _ in 0..tensor_count {
        let record_offset = cur.offset();
        let name = cur.string()?;
        let dims_offset = cur.offset();
        let n_dims = cur.u32("tensor dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                offset: dims_offset,
                tensor: name,
                n_dims,
                max: MAX_DIMS,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut n_elements: u64 = 1;
        for index in 0..n_dims as usize {
            let dim_offset = cur.offset();
            let value = cur.u64("tensor dimension")?;
            if value == 0 || value > MAX_DIM {
                return Err(GgufError::BadDim {
                    offset: dim_offset,
                    tensor: name,
                    index,
                    value,
                    max: MAX_DIM,
                });
            }
            n_elements = match n_elements.checked_mul(value) {
                Some(n) if n <= MAX_DIM => n,
                _ => {
                    return Err(GgufError::SizeOverflow {
                        offset: dim_offset,
                        tensor: name,
                    })
                }
            };
            dims.push(value);
        }
        let type_offset = cur.offset();
        let type_id = cur.u32("tensor type")?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(GgufError::UnknownTensorType {
                offset: type_offset,
                tensor: name,
                type_id,
            });
        };
        let row = dims.first().copied().unwrap_or(1);
        if row % ggml_type.block_size() as u64 != 0 {
            return Err(GgufError::NotBlockMultiple {
                tensor: name,
                ty: ggml_type,
                row,
                block: ggml_type.block_size(),
            });
        }
        let n_bytes = ggml_type
            .bytes_for(n_elements)
            .ok_or_else(|| GgufError::SizeOverflow {
                offset: dims_offset,
                tensor: name.clone(),
            })?;
        let data_offset = cur.u64("tensor data offset")?;
        if names.insert(name.clone(), ()).is_some() {
            return Err(GgufError::DuplicateTensor {
                offset: record_offset,
                tensor: name,
            });
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            n_elements,
            n_bytes,
            data_offset,
            file_offset: 0,
            shard: 0,
        });
    }

    let header_end = cur.offset();
    let data_start = header_end.div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    for t in &mut tensors {
        if t.data_offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                tensor: t.name.clone(),
                data_offset: t.data_offset,
                alignment,
            });
        }
        let start = data_start.checked_add(t.data_offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => t.file_offset = start,
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                })
            }
        }
    }
    check_no_overlap(&tensors)?;

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

fn check_no_overlap(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut by_start: Vec<&TensorInfo> = tensors.iter().collect();
    by_start.sort_by_key(|t| t.file_offset);
    for pair in by_start.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.file_offset + a.n_bytes > b.file_offset {
            return Err(GgufError::TensorOverlap {
                first: a.name.clone(),
                second: b.name.clone(),
                offset: b.file_offset,
            });
        }
    }
    Ok(())
}

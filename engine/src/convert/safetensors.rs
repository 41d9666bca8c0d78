//! The safetensors container (Hugging Face's weight format), read in place over a memory map.
//!
//! Layout: an 8-byte little-endian header length `n`, then `n` bytes of JSON — an object mapping
//! each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the
//! end of the header), plus an optional `"__metadata__"` object of strings — then the data.
//!
//! The file is untrusted input: the header length, every offset, every shape and every byte count
//! is checked when the file is opened, so a tensor's bytes are always a valid slice of the map.
//! Any byte string gives `Ok` or a [`SafetensorsError`]. Tensors of dtypes the engine does not
//! compute with (integers, F64, …) are listed but refused when their values are asked for.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

/// The header may not be larger than this (the reference implementation's own limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SafetensorsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a safetensors file: {len} bytes, too short for the 8-byte header length")]
    TooShort { len: u64 },
    #[error("header length {header_len} is larger than {limit} (file of {file_len} bytes)")]
    HeaderTooLong {
        header_len: u64,
        limit: u64,
        file_len: u64,
    },
    #[error("header is not a JSON object of tensors: {reason}")]
    BadHeader { reason: String },
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensors {first:?} and {second:?} overlap in the data section")]
    Overlap { first: String, second: String },
    #[error("no tensor named {name:?} in {path}")]
    Missing { name: String, path: PathBuf },
    #[error("tensor {name:?} is {dtype}; egpu reads F32, F16 and BF16 weights")]
    UnsupportedDtype { name: String, dtype: String },
}

/// Element type of a tensor. The three float types are the ones weights come in; anything else is
/// kept by name so that listing a file never fails on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    Other(String),
}

impl Dtype {
    fn parse(name: &str) -> Dtype {
        match name {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            other => Dtype::Other(other.to_string()),
        }
    }

    /// Bytes per element, for the types the format defines (None for an unknown name).
    fn size(&self) -> Option<u64> {
        Some(match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::Other(name) => match name.as_str() {
                "F64" | "I64" | "U64" => 8,
                "I32" | "U32" => 4,
                "I16" | "U16" => 2,
                "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
                _ => return None,
            },
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::Other(name) => name,
        }
    }
}

/// One tensor of the file, checked against it: `begin..end` is inside the data section and holds
/// exactly `shape`'s elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeTensor {
    pub name: String,
    pub dtype: Dtype,
    /// Row-major (numpy order): the last dimension is contiguous.
    pub shape: Vec<u64>,
    /// Absolute byte range in the file.
    begin: usize,
    end: usize,
}

impl SafeTensor {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn n_bytes(&self) -> usize {
        self.end - self.begin
    }
}

/// Bytes that hold a safetensors file: its memory map, or (in tests and for small files) a vector.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Bytes,
    tensors: BTreeMap<String, SafeTensor>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Maps `path` and checks its header and every tensor against the file.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile, SafetensorsError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| SafetensorsError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let map = crate::gguf::mmap::map_model_file(&file).map_err(io)?;
        Self::from_bytes_at(path, Bytes::Mapped(map))
    }

    /// Parses a file held in memory (`path` is only used in messages).
    pub fn from_vec(
        path: impl Into<PathBuf>,
        bytes: Vec<u8>,
    ) -> Result<SafetensorsFile, SafetensorsError> {
        Self::from_bytes_at(path.into(), Bytes::Owned(bytes))
    }

    fn from_bytes_at(path: PathBuf, bytes: Bytes) -> Result<SafetensorsFile, SafetensorsError> {
        let (tensors, metadata) = parse_header(bytes.as_slice())?;
        Ok(SafetensorsFile {
            path,
            bytes,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors by name, in name order.
    pub fn tensors(&self) -> impl Iterator<Item = &SafeTensor> {
        self.tensors.values()
    }

    pub fn tensor(&self, name: &str) -> Result<&SafeTensor, SafetensorsError> {
        self.tensors
            .get(name)
            .ok_or_else(|| SafetensorsError::Missing {
                name: name.to_string(),
                path: self.path.clone(),
            })
    }

    /// The `__metadata__` strings (empty if the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The tensor's bytes, little-endian, in place.
    pub fn data(&self, tensor: &SafeTensor) -> &[u8] {
        &self.bytes.as_slice()[tensor.begin..tensor.end]
    }

    /// The tensor's values widened to f32 (exactly: every F16 and BF16 value is an f32 value).
    pub fn to_f32(&self, tensor: &SafeTensor) -> Result<Vec<f32>, SafetensorsError> {
        let data = self.data(tensor);
        Ok(match tensor.dtype {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::Other(ref name) => {
                return Err(SafetensorsError::UnsupportedDtype {
                    name: tensor.name.clone(),
                    dtype: name.clone(),
                })
            }
        })
    }
}

/// A model's weights: one `model.safetensors`, or the shards a `model.safetensors.index.json`
/// names (`{"weight_map": {tensor: shard file}}`), looked up by tensor name as one set.
#[derive(Debug)]
pub struct SafetensorsSet {
    files: Vec<SafetensorsFile>,
    /// Tensor name to its file's index in `files`.
    owner: BTreeMap<String, usize>,
}

/// The single-file weights of a Hugging Face folder.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

impl SafetensorsSet {
    /// The weights of the model folder `dir`: `model.safetensors`, else the shards of
    /// `model.safetensors.index.json`. Each shard is checked as a file; the index must name only
    /// files in `dir`, and each tensor must be in the shard the index says.
    pub fn open_folder(dir: &Path) -> Result<SafetensorsSet, SafetensorsError> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if single.is_file() || !index.is_file() {
            let file = SafetensorsFile::open(&single)?;
            let owner = file.tensors.keys().map(|k| (k.clone(), 0)).collect();
            return Ok(SafetensorsSet {
                files: vec![file],
                owner,
            });
        }
        let bad = |reason: String| SafetensorsError::BadHeader {
            reason: format!("{}: {reason}", index.display()),
        };
        let text = std::fs::read_to_string(&index).map_err(|source| SafetensorsError::Io {
            path: index.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| bad("no weight_map object".into()))?;
        let mut files: Vec<SafetensorsFile> = Vec::new();
        let mut by_shard: BTreeMap<String, usize> = BTreeMap::new();
        let mut owner = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(format!("{tensor:?} maps to a non-string")))?;
            // A shard is a file next to the index, never a path elsewhere.
            if shard.is_empty() || shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(bad(format!(
                    "shard name {shard:?} is not a file in the folder"
                )));
            }
            let at = match by_shard.get(shard) {
                Some(&at) => at,
                None => {
                    files.push(SafetensorsFile::open(dir.join(shard))?);
                    by_shard.insert(shard.to_owned(), files.len() - 1);
                    files.len() - 1
                }
            };
            files[at].tensor(tensor)?;
            owner.insert(tensor.clone(), at);
        }
        if files.is_empty() {
            return Err(bad("the weight_map is empty".into()));
        }
        Ok(SafetensorsSet { files, owner })
    }

    /// Number of files the weights are in.
    pub fn n_files(&self) -> usize {
        self.files.len()
    }

    pub fn tensor(&self, name: &str) -> Result<&SafeTensor, SafetensorsError> {
        match self.owner.get(name) {
            Some(&at) => self.files[at].tensor(name),
            None => Err(SafetensorsError::Missing {
                name: name.to_string(),
                path: self.files[0].path.clone(),
            }),
        }
    }

    /// The tensor's values widened to f32 (see [`SafetensorsFile::to_f32`]).
    pub fn to_f32(&self, tensor: &SafeTensor) -> Result<Vec<f32>, SafetensorsError> {
        match self.owner.get(&tensor.name) {
            Some(&at) => self.files[at].to_f32(tensor),
            None => Err(SafetensorsError::Missing {
                name: tensor.name.clone(),
                path: self.files[0].path.clone(),
            }),
        }
    }
}

type Parsed = (BTreeMap<String, SafeTensor>, BTreeMap<String, String>);

fn parse_header(bytes: &[u8]) -> Result<Parsed, SafetensorsError> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(SafetensorsError::TooShort { len: file_len });
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let limit = MAX_HEADER_LEN.min(file_len - 8);
    if header_len > limit {
        return Err(SafetensorsError::HeaderTooLong {
            header_len,
            limit,
            file_len,
        });
    }
    let data_start = 8 + header_len as usize;
    let data_len = bytes.len() - data_start;
    let bad = |reason: String| SafetensorsError::BadHeader { reason };
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| bad(e.to_string()))?;
    let serde_json::Value::Object(entries) = header else {
        return Err(bad("the top level is not an object".into()));
    };

    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            let serde_json::Value::Object(meta) = entry else {
                return Err(bad("__metadata__ is not an object".into()));
            };
            for (key, value) in meta {
                let serde_json::Value::String(value) = value else {
                    return Err(bad(format!(
                        "__metadata__ value of {key:?} is not a string"
                    )));
                };
                metadata.insert(key, value);
            }
            continue;
        }
        let tensor = parse_tensor(&name, &entry, data_len)?;
        tensors.insert(
            name,
            SafeTensor {
                begin: tensor.begin + data_start,
                end: tensor.end + data_start,
                ..tensor
            },
        );
    }

    // No two tensors may share bytes (empty tensors occupy none).
    let mut spans: Vec<&SafeTensor> = tensors.values().filter(|t| t.end > t.begin).collect();
    spans.sort_by_key(|t| t.begin);
    for pair in spans.windows(2) {
        if pair[1].begin < pair[0].end {
            return Err(SafetensorsError::Overlap {
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
    }
    Ok((tensors, metadata))
}

/// One header entry, with its offsets still relative to the data section.
fn parse_tensor(
    name: &str,
    entry: &serde_json::Value,
    data_len: usize,
) -> Result<SafeTensor, SafetensorsError> {
    let bad = |reason: String| SafetensorsError::BadTensor {
        name: name.to_string(),
        reason,
    };
    let field = |key: &str| {
        entry
            .get(key)
            .ok_or_else(|| bad(format!("no {key:?} field")))
    };
    let dtype = field("dtype")?
        .as_str()
        .map(Dtype::parse)
        .ok_or_else(|| bad("dtype is not a string".into()))?;
    let size = dtype
        .size()
        .ok_or_else(|| bad(format!("unknown dtype {:?}", dtype.name())))?;
    let shape = field("shape")?
        .as_array()
        .ok_or_else(|| bad("shape is not an array".into()))?
        .iter()
        .map(|d| {
            d.as_u64()
                .ok_or_else(|| bad(format!("dimension {d} is not a non-negative integer")))
        })
        .collect::<Result<Vec<u64>, _>>()?;
    let offsets = field("data_offsets")?
        .as_array()
        .filter(|o| o.len() == 2)
        .ok_or_else(|| bad("data_offsets is not [begin, end]".into()))?;
    let offset = |v: &serde_json::Value| {
        v.as_u64()
            .ok_or_else(|| bad(format!("offset {v} is not a non-negative integer")))
    };
    let (begin, end) = (offset(&offsets[0])?, offset(&offsets[1])?);
    if begin > end || end > data_len as u64 {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] outside the {data_len}-byte data section"
        )));
    }
    let n_bytes = shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if n_bytes != end - begin {
        return Err(bad(format!(
            "shape {shape:?} of {} needs {n_bytes} bytes, data_offsets give {}",
            dtype.name(),
            end - begin
        )));
    }
    Ok(SafeTensor {
        name: name.to_string(),
        dtype,
        shape,
        begin: begin as usize,
        end: end as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file from a header (as JSON text) and data bytes.
    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn open(header: &str, data: &[u8]) -> Result<SafetensorsFile, SafetensorsError> {
        SafetensorsFile::from_vec("test.safetensors", file(header, data))
    }

    #[test]
    fn reads_a_small_file() {
        let data: Vec<u8> = [1.0f32, -2.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f = open(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &data,
        )
        .unwrap();
        let a = f.tensor("a").unwrap();
        assert_eq!((a.shape.as_slice(), a.n_bytes()), (&[2u64][..], 8));
        assert_eq!(f.to_f32(a).unwrap(), vec![1.0, -2.5]);
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let f32x2 = [0u8; 8];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "too short"),
            (u64::MAX.to_le_bytes().to_vec(), "header length"),
            (file("[1,2]", &[]), "not an object"),
            (file("{\"a\":", &[]), "EOF"),
            (
                file(r#"{"a":{"shape":[2],"data_offsets":[0,8]}}"#, &f32x2),
                "no \"dtype\"",
            ),
            (
                file(
                    r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#,
                    &f32x2,
                ),
                "unknown dtype",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
                    &f32x2,
                ),
                "non-negative",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,9]}}"#,
                    &f32x2,
                ),
                "outside",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
                    &f32x2,
                ),
                "outside",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    &f32x2,
                ),
                "needs 12 bytes",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}}"#,
                    &f32x2,
                ),
                "overflows",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    &f32x2,
                ),
                "overlap",
            ),
            (file(r#"{"__metadata__":{"k":1}}"#, &[]), "not a string"),
        ];
        for (bytes, want) in cases {
            let err = SafetensorsFile::from_vec("t", bytes)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn other_dtypes_are_listed_but_not_read() {
        let f = open(
            r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
            &[0; 8],
        )
        .unwrap();
        let ids = f.tensor("ids").unwrap();
        assert_eq!(ids.dtype, Dtype::Other("I64".into()));
        let err = f.to_f32(ids).unwrap_err().to_string();
        assert!(
            err.contains("I64") && err.contains("F32, F16 and BF16"),
            "{err}"
        );
        assert!(f
            .tensor("nope")
            .unwrap_err()
            .to_string()
            .contains("no tensor named \"nope\""));
    }
}

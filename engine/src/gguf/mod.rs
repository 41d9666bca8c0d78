//! The GGUF container (v2 and v3), read in place over a memory map.
//!
//! Opening a file parses only its header (metadata and tensor table) and checks every tensor
//! against the file; tensor data is never copied: [`GgufFile::tensor_data`] returns a slice of
//! the mapping. A model split into `NAME-00001-of-0000N.gguf` shards opens as one model.
//!
//! The file is untrusted input. Every count, length, dimension and offset is checked; see
//! `parse.rs` for the limits. Any byte string gives `Ok` or a [`GgufError`] naming the offset.

mod error;
mod metadata;
pub(crate) mod mmap;
mod parse;
pub mod write;

use std::fs::File;
use std::path::{Path, PathBuf};

pub use error::GgufError;
pub use metadata::{MetaArray, MetaValue, Metadata, ValueType};
pub use parse::{
    DEFAULT_ALIGNMENT, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_DIMS, MAX_KV_COUNT,
    MAX_STRING_LEN, MAX_TENSOR_COUNT,
};

use crate::quant::GgmlType;

/// One tensor's entry in the tensor table, already checked against its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub n_elements: u64,
    /// Bytes of data: whole blocks of `ggml_type`.
    pub n_bytes: u64,
    /// Offset relative to the start of the data section, as stored in the file.
    pub data_offset: u64,
    /// Absolute offset in its shard's file.
    pub file_offset: u64,
    /// Which file of a split model holds the data (0 for a single file).
    pub shard: usize,
}

impl TensorInfo {
    /// Elements per row (`dims[0]`), and the number of rows (the product of the other dims).
    pub fn rows(&self) -> (u64, u64) {
        let row = self.dims.first().copied().unwrap_or(1);
        (row, self.n_elements / row.max(1))
    }
}

/// Where a shard's bytes live: a read-only file mapping, or memory (tests, fuzzing).
#[derive(Debug)]
enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

#[derive(Debug)]
struct Shard {
    path: Option<PathBuf>,
    /// Unregisters the mapping from the SIGBUS guard; declared before `storage` so it drops
    /// (stops guarding) before the mapping goes.
    #[cfg(unix)]
    guard: Option<mmap::faults::Registration>,
    /// What the file was when it was mapped, to notice it being written in place.
    identity: Option<FileIdentity>,
    storage: Storage,
    version: u32,
    alignment: u64,
    data_start: u64,
}

/// An open GGUF model: one file, or every shard of a split model.
#[derive(Debug)]
pub struct GgufFile {
    shards: Vec<Shard>,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
}

impl GgufFile {
    /// Opens and maps a GGUF file. A path of the form `PREFIX-00001-of-0000N.gguf` (any shard
    /// number) opens all N shards as one model.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        match split_shard_paths(path) {
            Some(paths) => Self::open_split(&paths),
            None => {
                let (shard, header) = open_shard(path)?;
                Ok(GgufFile {
                    shards: vec![shard],
                    metadata: header.metadata,
                    tensors: header.tensors,
                })
            }
        }
    }

    /// Parses a GGUF image held in memory (used by tests and the fuzzer).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        let header = parse::parse_header(&bytes)?;
        Ok(GgufFile {
            shards: vec![Shard {
                path: None,
                #[cfg(unix)]
                guard: None,
                identity: None,
                version: header.version,
                alignment: header.alignment,
                data_start: header.data_start,
                storage: Storage::Owned(bytes),
            }],
            metadata: header.metadata,
            tensors: header.tensors,
        })
    }

    fn open_split(paths: &[PathBuf]) -> Result<GgufFile, GgufError> {
        let n = paths.len();
        let mut shards = Vec::with_capacity(n);
        let mut metadata = None;
        let mut tensors: Vec<TensorInfo> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, path) in paths.iter().enumerate() {
            let (shard, header) = open_shard(path)?;
            let no = header.metadata.get_u64("split.no");
            let count = header.metadata.get_u64("split.count");
            if no.is_some_and(|no| no != i as u64) || count.is_some_and(|c| c != n as u64) {
                return Err(GgufError::Split(format!(
                    "{} says it is shard {:?} of {:?}, expected shard {} of {}",
                    path.display(),
                    no,
                    count,
                    i,
                    n
                )));
            }
            for mut t in header.tensors {
                if !seen.insert(t.name.clone()) {
                    return Err(GgufError::Split(format!(
                        "tensor {:?} appears in more than one shard (again in {})",
                        t.name,
                        path.display()
                    )));
                }
                t.shard = i;
                tensors.push(t);
            }
            if i == 0 {
                metadata = Some(header.metadata);
            }
            shards.push(shard);
        }
        let metadata = metadata.unwrap_or_default();
        if let Some(expected) = metadata.get_u64("split.tensors.count") {
            if expected != tensors.len() as u64 {
                return Err(GgufError::Split(format!(
                    "first shard announces {expected} tensors, the shards hold {}",
                    tensors.len()
                )));
            }
        }
        Ok(GgufFile {
            shards,
            metadata,
            tensors,
        })
    }

    /// Why this model's files can no longer be trusted, if they cannot: a read past the end
    /// of a file that was truncated under its mapping (answered with zeros instead of a crash,
    /// see `mmap::faults`), or a file written in place since it was opened (its length or
    /// modification time changed on the same inode). A file replaced by renaming a new one
    /// over it is not a change: the mapping keeps the old, intact file.
    pub fn changed_on_disk(&self) -> Option<String> {
        for shard in &self.shards {
            let Some(path) = &shard.path else { continue };
            #[cfg(unix)]
            if shard.guard.as_ref().is_some_and(|g| g.faulted()) {
                return Some(format!(
                    "{} was truncated while loaded (written in place, e.g. by cp)",
                    path.display()
                ));
            }
            let (Some(then), Ok(now)) = (&shard.identity, std::fs::metadata(path)) else {
                continue;
            };
            let now = FileIdentity::of(&now);
            if now.device == then.device && now.inode == then.inode && now != *then {
                return Some(format!(
                    "{} was modified in place while loaded",
                    path.display()
                ));
            }
        }
        None
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The tensor table, in file order (shard by shard).
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The GGUF version of the (first) file.
    pub fn version(&self) -> u32 {
        self.shards[0].version
    }

    /// `general.alignment` of the (first) file.
    pub fn alignment(&self) -> u64 {
        self.shards[0].alignment
    }

    /// Absolute offset of the first file's data section.
    pub fn data_start(&self) -> u64 {
        self.shards[0].data_start
    }

    /// Number of files this model spans.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Paths of the files (empty for an in-memory image).
    pub fn paths(&self) -> Vec<&Path> {
        self.shards
            .iter()
            .filter_map(|s| s.path.as_deref())
            .collect()
    }

    /// Total bytes of all files.
    pub fn file_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.storage.bytes().len() as u64)
            .sum()
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }

    /// The tensor's bytes, borrowed from the mapping. `info` must come from this file's table
    /// (any other gives an empty slice rather than a panic).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let Some(shard) = self.shards.get(info.shard) else {
            return &[];
        };
        let bytes = shard.storage.bytes();
        let start = info.file_offset as usize;
        bytes
            .get(start..start.saturating_add(info.n_bytes as usize))
            .unwrap_or(&[])
    }

    /// Tells the OS that bytes `range` of the tensor's data will not be read again, so that its
    /// pages leave this process's resident set (see `mmap::release_pages`). Reading them later
    /// is still correct, only slower. A no-op for files held in memory.
    pub fn release_tensor_pages(&self, info: &TensorInfo, range: std::ops::Range<usize>) {
        let Some(shard) = self.shards.get(info.shard) else {
            return;
        };
        if let Storage::Mapped(map) = &shard.storage {
            let n = info.n_bytes as usize;
            let (start, end) = (range.start.min(n), range.end.min(n));
            let at = info.file_offset as usize + start;
            if end > start && at + (end - start) <= map.len() {
                mmap::release_pages(map, at, end - start);
            }
        }
    }

    /// The data of the tensor named `name`.
    pub fn tensor_data_by_name(&self, name: &str) -> Result<(&TensorInfo, &[u8]), GgufError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::NoSuchTensor(name.to_owned()))?;
        Ok((info, self.tensor_data(info)))
    }

    /// The tensor named `name`, dequantized to `f32` in a fresh vector. For tests and tools:
    /// inference reads the quantized blocks in place.
    pub fn dequantize_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let (info, data) = self.tensor_data_by_name(name)?;
        let mut out = vec![0f32; info.n_elements as usize];
        crate::quant::dequantize_to_f32(info.ggml_type, data, &mut out)
            .map_err(|_| unsupported(info))?;
        Ok(out)
    }

    /// The tensor named `name`, dequantized to `f16`: the exact `f32` value rounded to nearest.
    pub fn dequantize_f16(&self, name: &str) -> Result<Vec<half::f16>, GgufError> {
        let (info, data) = self.tensor_data_by_name(name)?;
        let mut out = vec![half::f16::ZERO; info.n_elements as usize];
        crate::quant::dequantize_to_f16(info.ggml_type, data, &mut out)
            .map_err(|_| unsupported(info))?;
        Ok(out)
    }
}

/// The only way dequantizing a checked tensor can fail: its type has no dequantizer. (Lengths
/// were checked against the type's geometry when the file was opened.)
fn unsupported(info: &TensorInfo) -> GgufError {
    GgufError::UnsupportedTensorType {
        tensor: info.name.clone(),
        ty: info.ggml_type,
    }
}

/// A file's identity and shape: writing it in place changes its length or modification time
/// (replacing it by rename changes the path's inode, and leaves the mapping intact).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileIdentity {
    fn of(metadata: &std::fs::Metadata) -> FileIdentity {
        #[cfg(unix)]
        let (device, inode) = {
            use std::os::unix::fs::MetadataExt as _;
            (metadata.dev(), metadata.ino())
        };
        #[cfg(not(unix))]
        let (device, inode) = (0, 0);
        FileIdentity {
            device,
            inode,
            len: metadata.len(),
            modified: metadata.modified().ok(),
        }
    }
}

fn open_shard(path: &Path) -> Result<(Shard, parse::Header), GgufError> {
    let io_err = |source| GgufError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let identity = file.metadata().ok().map(|m| FileIdentity::of(&m));
    let map = mmap::map_model_file(&file).map_err(io_err)?;
    #[cfg(unix)]
    let guard = Some(mmap::faults::register(map.as_ptr(), map.len()));
    let header = parse::parse_header(&map)?;
    Ok((
        Shard {
            path: Some(path.to_owned()),
            #[cfg(unix)]
            guard,
            identity,
            version: header.version,
            alignment: header.alignment,
            data_start: header.data_start,
            storage: Storage::Mapped(map),
        },
        header,
    ))
}

/// For `PREFIX-0000K-of-0000N.gguf`, the paths of all N shards in order; `None` otherwise.
/// The naming is llama.cpp's `llama_split_path` (`%s-%05d-of-%05d.gguf`).
pub fn split_shard_paths(path: &Path) -> Option<Vec<PathBuf>> {
    let file_name = path.file_name()?.to_str()?;
    let stem = file_name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, index) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(count) || !digits(index) {
        return None;
    }
    let n: usize = count.parse().ok()?;
    let k: usize = index.parse().ok()?;
    if n == 0 || k == 0 || k > n {
        return None;
    }
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    Some(
        (1..=n)
            .map(|i| dir.join(format!("{prefix}-{i:05}-of-{n:05}.gguf")))
            .collect(),
    )
}

//! The model catalog: where load sources resolve, offline.
//!
//! A source is a `.gguf` path, a name in egpu's models folder (`NAME`, `NAME.gguf` or a unique
//! prefix), a model of another program's store ([`super::stores`]: Ollama, LM Studio, GGUF
//! files in the HF cache), or a Hugging Face model folder — its absolute path, or a repo id
//! (`openai-community/gpt2`, or a bare `gpt2` when no GGUF in the models folder has that name)
//! found in the HF cache ([`egpu_engine::convert::hf_cache`]). A folder is converted once to a
//! GGUF ([`egpu_engine::convert`]) kept under `<models folder>/hf/<key>/<name>[-q8_0].gguf`,
//! and from then on it is an ordinary GGUF model. The key hashes the folder's path, its
//! `config.json` and its weights' and tokenizer files' size and modification time, so an
//! updated snapshot converts again and an unchanged one is reused; f32 and q8_0 conversions
//! are kept side by side.
//!
//! Converting is careful with the disk and with other loads: one conversion per output file
//! at a time (a second load of the same folder waits for the first and reuses its file); the
//! GGUF is written to a uniquely named temporary file, flushed to disk and renamed into place,
//! so a crash or a power loss never leaves a partial file under the final name, and a failed
//! write (a full disk) removes its temporary file; a cached conversion is opened and checked
//! (header and every tensor inside the file) before it is reused, and converted again if it
//! is damaged; a new conversion of a folder removes that folder's older ones (a `source`
//! file in each key folder names the folder it came from), and `egpuctl prune` removes every
//! conversion that no resident model uses.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use egpu_engine::convert::hf_cache::{self, HfCacheError, HfEnv, CONFIG_FILE};
use egpu_engine::convert::{gguf_from_hf_folder, HfModelError, WeightFormat};
use egpu_engine::gguf::GgufFile;
use egpu_engine::models::info::{bytes_by_type, file_type_name};

use super::stores::{Store, StoreRoots};
use crate::error::DaemonError;

/// A model file egpud can load by name, as ListModelFiles shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogFile {
    /// The name that loads it.
    pub name: String,
    pub store: Store,
    /// Canonical, so it compares equal to a resident model's source.
    pub path: PathBuf,
    pub size_bytes: u64,
    /// Empty when the header cannot be read; `error` says why.
    pub architecture: String,
    /// Weights (0 when the header cannot be read).
    pub parameters: u64,
    /// The tensor type holding most of the weights (`Q4_K`, ...), empty if unknown.
    pub quantization: String,
    pub modified: Option<std::time::SystemTime>,
    pub error: String,
}

/// Where model names and sources are looked up.
#[derive(Debug, Clone)]
pub struct Catalog {
    models_dir: PathBuf,
    stores: StoreRoots,
    /// One lock per conversion output, so concurrent loads of one folder convert it once.
    converting: Arc<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>>,
}

/// The file in each conversion folder that names the HF folder it was converted from.
pub const CONVERSION_SOURCE_FILE: &str = "source";

impl Catalog {
    /// The models folder, and the other stores where the environment puts them.
    pub fn new(models_dir: PathBuf) -> Catalog {
        Catalog {
            models_dir,
            stores: StoreRoots::from_env(&HfEnv::from_process()),
            converting: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    /// Sorts a source into a GGUF file or an HF folder (see [`classify`]).
    pub fn classify(&self, source: &str, env: &HfEnv) -> Result<Source, DaemonError> {
        classify(&self.models_dir, &self.stores, source, env)
    }

    /// The GGUF for an HF folder: converted now, or found from an earlier conversion. Blocking.
    ///
    /// `may_convert` is asked, with the memory converting will take at its peak, before a
    /// conversion starts (not when a cached one is reused): the budget's say.
    pub fn converted_gguf(
        &self,
        folder: &Path,
        name: &str,
        format: WeightFormat,
        may_convert: &dyn Fn(u64) -> Result<(), DaemonError>,
    ) -> Result<PathBuf, DaemonError> {
        let key = conversion_key(folder).map_err(|e| DaemonError::BadModelFile {
            path: folder.to_path_buf(),
            reason: e.to_string(),
        })?;
        let out = conversion_path(&self.models_dir, key, name, format);
        let lock = self
            .converting
            .lock()
            .entry(out.clone())
            .or_default()
            .clone();
        let _converting = lock.lock();
        let result = converted_gguf(&self.models_dir, folder, &out, format, may_convert);
        self.converting.lock().remove(&out);
        result
    }

    /// Removes the conversion folders under `<models>/hf/` that hold none of `keep`; returns
    /// the folders removed and the bytes freed. Blocking.
    pub fn prune_conversions(&self, keep: &[PathBuf]) -> std::io::Result<(Vec<PathBuf>, u64)> {
        let root = self.models_dir.join("hf");
        let mut removed = Vec::new();
        let mut freed = 0u64;
        let Ok(read) = std::fs::read_dir(&root) else {
            return Ok((removed, freed));
        };
        for entry in read.flatten() {
            let dir = entry.path();
            if !dir.is_dir() || self.converting_in(&dir) {
                continue;
            }
            let dir_canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
            if keep
                .iter()
                .any(|k| k.starts_with(&dir_canonical) || k.starts_with(&dir))
            {
                continue;
            }
            freed += folder_bytes(&dir);
            std::fs::remove_dir_all(&dir)?;
            removed.push(dir);
        }
        Ok((removed, freed))
    }

    fn converting_in(&self, dir: &Path) -> bool {
        self.converting.lock().keys().any(|p| p.starts_with(dir))
    }

    /// Every model file of the models folder and the other stores, with what their headers
    /// say. Blocking.
    pub fn files(&self) -> Vec<CatalogFile> {
        let own = gguf_files(&self.models_dir)
            .into_iter()
            .map(|path| (default_name(&path), path, Store::ModelsFolder));
        let others = self
            .stores
            .models()
            .into_iter()
            .map(|m| (m.name, m.path, m.store));
        own.chain(others)
            .map(|(name, path, store)| {
                let path = std::fs::canonicalize(&path).unwrap_or(path);
                let meta = std::fs::metadata(&path).ok();
                let mut file = CatalogFile {
                    name,
                    store,
                    size_bytes: meta.as_ref().map_or(0, |m| m.len()),
                    modified: meta.and_then(|m| m.modified().ok()),
                    architecture: String::new(),
                    parameters: 0,
                    quantization: String::new(),
                    error: String::new(),
                    path,
                };
                match GgufFile::open(&file.path) {
                    Ok(f) => {
                        file.architecture = f.metadata().architecture().unwrap_or("").to_owned();
                        file.parameters = f.tensors().iter().map(|t| t.n_elements).sum();
                        file.quantization = quantization(&f);
                    }
                    Err(e) => file.error = e.to_string(),
                }
                file
            })
            .collect()
    }
}

/// The quantization a file declares (`Q4_K_M`), else the type holding most of its bytes.
pub fn quantization(file: &GgufFile) -> String {
    file_type_name(file.metadata())
        .map(str::to_owned)
        .or_else(|| {
            bytes_by_type(file)
                .into_iter()
                .max_by_key(|(_, (_, bytes))| *bytes)
                .map(|(ty, _)| ty.to_string())
        })
        .unwrap_or_default()
}

/// Where a load's source points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A GGUF file; `name` is the name its store gives it (None: take the file's name).
    Gguf { path: PathBuf, name: Option<String> },
    /// A Hugging Face folder, with the model name to give it (the repo or folder name).
    HfFolder { folder: PathBuf, name: String },
}

/// Sorts a source into a GGUF file or an HF folder. A bare name is looked up in egpu's models
/// folder first, then in the other stores, then as a cached HF repo; a name with a `/` is
/// looked up in the other stores first (LM Studio and HF cache names have one), then as an
/// HF repo or a path.
fn classify(
    models_dir: &Path,
    stores: &StoreRoots,
    source: &str,
    env: &HfEnv,
) -> Result<Source, DaemonError> {
    let source = source.trim();
    let path = Path::new(source);
    let folder_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    };
    if path.is_absolute() && path.is_dir() {
        let folder = hf_cache::resolve(source, env).map_err(hf_error)?;
        let name = folder_name(&folder);
        return Ok(Source::HfFolder { folder, name });
    }
    let from_store = || {
        stores.resolve(source).map(|m| Source::Gguf {
            path: std::fs::canonicalize(&m.path).unwrap_or(m.path),
            name: Some(m.name),
        })
    };
    if !path.is_absolute() && source.contains('/') {
        if let Some(found) = from_store() {
            return Ok(found);
        }
    }
    let repo_name = |repo: &str| repo.rsplit('/').next().unwrap_or(repo).to_string();
    let gguf = source.ends_with(".gguf");
    if !path.is_absolute() && source.contains('/') && !gguf && hf_cache::is_repo_id(source) {
        let folder = hf_cache::resolve(source, env).map_err(hf_error)?;
        return Ok(Source::HfFolder {
            folder,
            name: repo_name(source),
        });
    }
    match resolve_source(models_dir, source) {
        Ok(path) => Ok(Source::Gguf { path, name: None }),
        Err(DaemonError::UnknownSource { name, dir, hint }) => {
            if let Some(found) = from_store() {
                return Ok(found);
            }
            let hint =
                format!("{hint}; nor is it a model of Ollama, LM Studio or the Hugging Face cache");
            if gguf || !hf_cache::is_repo_id(source) {
                return Err(DaemonError::UnknownSource { name, dir, hint });
            }
            match hf_cache::resolve(source, env) {
                Ok(folder) => Ok(Source::HfFolder {
                    folder,
                    name: repo_name(source),
                }),
                Err(HfCacheError::NotCached { .. }) => {
                    Err(DaemonError::UnknownSource { name, dir, hint })
                }
                Err(e) => Err(hf_error(e)),
            }
        }
        Err(e) => Err(e),
    }
}

fn hf_error(e: HfCacheError) -> DaemonError {
    match e {
        HfCacheError::NotCached { .. } => DaemonError::NotInHfCache(e.to_string()),
        other => DaemonError::InvalidArgument(other.to_string()),
    }
}

/// Where the conversion of a folder with key `key` is kept.
fn conversion_path(models_dir: &Path, key: u64, name: &str, format: WeightFormat) -> PathBuf {
    let file_name = match format {
        WeightFormat::F32 => format!("{name}.gguf"),
        other => format!("{name}-{}.gguf", other.name()),
    };
    models_dir
        .join("hf")
        .join(format!("{key:016x}"))
        .join(file_name)
}

/// The GGUF for an HF folder at `out`: found from an earlier conversion and checked, or
/// converted now. Blocking; the caller holds `out`'s conversion lock.
fn converted_gguf(
    models_dir: &Path,
    folder: &Path,
    out: &Path,
    format: WeightFormat,
    may_convert: &dyn Fn(u64) -> Result<(), DaemonError>,
) -> Result<PathBuf, DaemonError> {
    if out.is_file() {
        // Opening checks the header and that every tensor lies inside the file: an empty or
        // cut-short file (a crash of an older egpud mid-write) is not reused.
        match GgufFile::open(out) {
            Ok(_) => return Ok(out.to_path_buf()),
            Err(e) => {
                tracing::warn!(path = %out.display(), cause = %e, "damaged conversion; converting again");
                let _ = std::fs::remove_file(out);
            }
        }
    }
    may_convert(conversion_memory(folder))?;
    let bytes = gguf_from_hf_folder(folder, format).map_err(|e| match e {
        HfModelError::UnsupportedModelType { .. } | HfModelError::UnsupportedConfig { .. } => {
            DaemonError::InvalidArgument(format!("{}: {e}", folder.display()))
        }
        other => DaemonError::BadModelFile {
            path: folder.to_path_buf(),
            reason: other.to_string(),
        },
    })?;
    let io = |e: std::io::Error| DaemonError::Internal(format!("writing {}: {e}", out.display()));
    let dir = out.parent().unwrap_or(models_dir);
    std::fs::create_dir_all(dir).map_err(io)?;
    // A unique temporary name (two egpuds, or two formats, never share one), removed if
    // anything below fails (a full disk); flushed before the rename, and the rename flushed
    // with the folder, so the final name only ever holds a whole file.
    let mut tmp = tempfile::Builder::new()
        .prefix(".converting-")
        .tempfile_in(dir)
        .map_err(io)?;
    std::io::Write::write_all(&mut tmp, &bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(out).map_err(|e| io(e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    let canonical = folder
        .canonicalize()
        .unwrap_or_else(|_| folder.to_path_buf());
    let _ = std::fs::write(
        dir.join(CONVERSION_SOURCE_FILE),
        canonical.display().to_string(),
    );
    remove_superseded(models_dir, &canonical, dir);
    Ok(out.to_path_buf())
}

/// Removes older conversions of the same HF folder (its files changed since): their key
/// folders name the same source. A resident model converted from one keeps its mapping (the
/// file is unlinked, not truncated).
fn remove_superseded(models_dir: &Path, source: &Path, current: &Path) {
    let Ok(read) = std::fs::read_dir(models_dir.join("hf")) else {
        return;
    };
    for entry in read.flatten() {
        let dir = entry.path();
        if dir == current {
            continue;
        }
        let named = std::fs::read_to_string(dir.join(CONVERSION_SOURCE_FILE)).ok();
        if named.as_deref().map(Path::new) == Some(source) {
            tracing::info!(old = %dir.display(), "removing a superseded conversion");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Memory a conversion of `folder` takes at its peak: the converted tensors (f16 or bf16
/// weights double as f32) and the GGUF image built from them, so three times the weights.
fn conversion_memory(folder: &Path) -> u64 {
    let weights: u64 = std::fs::read_dir(folder)
        .map(|read| {
            read.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .filter_map(|e| std::fs::metadata(e.path()).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    weights.saturating_mul(3)
}

/// Bytes of the files in a folder (one level: conversion folders hold files only).
fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|read| {
            read.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn conversion_key(folder: &Path) -> std::io::Result<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    folder.canonicalize()?.hash(&mut h);
    std::fs::read(folder.join(CONFIG_FILE))?.hash(&mut h);
    for file in [
        "model.safetensors",
        "model.safetensors.index.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "generation_config.json",
        "source.spm",
    ] {
        if let Ok(meta) = std::fs::metadata(folder.join(file)) {
            file.hash(&mut h);
            meta.len().hash(&mut h);
            meta.modified().ok().hash(&mut h);
        }
    }
    Ok(h.finish())
}

/// The file's name without `.gguf` (and without a split suffix).
pub fn default_name(path: &Path) -> String {
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem.strip_suffix(".gguf").unwrap_or(&stem);
    let stem = match stem.rfind("-00001-of-") {
        Some(at) => &stem[..at],
        None => stem,
    };
    stem.to_owned()
}

/// `.gguf` files of a folder (the first shard only of split models), sorted.
fn gguf_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| {
                n.ends_with(".gguf") && (!n.contains("-of-") || n.contains("-00001-of-"))
            }) && p.is_file()
        })
        .collect();
    files.sort();
    files
}

/// A path (anything with a `/`, or an existing file) or a name in the models folder.
fn resolve_source(models_dir: &Path, source: &str) -> Result<PathBuf, DaemonError> {
    let source = source.trim();
    if source.is_empty() {
        return Err(DaemonError::InvalidArgument(
            "a load needs a source: a .gguf path or a name in the models folder".into(),
        ));
    }
    let as_path = Path::new(source);
    if source.contains('/') || as_path.is_file() {
        if !as_path.is_absolute() {
            return Err(DaemonError::InvalidArgument(format!(
                "{source}: give an absolute path (egpud's working directory is not the client's)"
            )));
        }
        return std::fs::canonicalize(as_path)
            .map_err(|_| DaemonError::MissingFile(as_path.to_owned()));
    }
    let files = gguf_files(models_dir);
    let exact = files
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == source) || default_name(p) == source);
    let canonical =
        |p: &Path| std::fs::canonicalize(p).map_err(|_| DaemonError::MissingFile(p.to_owned()));
    if let Some(p) = exact {
        return canonical(p);
    }
    let lower = source.to_lowercase();
    let matches: Vec<&PathBuf> = files
        .iter()
        .filter(|p| default_name(p).to_lowercase().starts_with(&lower))
        .collect();
    match matches.as_slice() {
        [one] => canonical(one),
        [] => Err(DaemonError::UnknownSource {
            name: source.to_owned(),
            dir: models_dir.to_owned(),
            hint: if files.is_empty() {
                " (the folder has no .gguf files)".into()
            } else {
                format!(
                    "; it has: {}",
                    files
                        .iter()
                        .map(|p| default_name(p))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        }),
        many => Err(DaemonError::UnknownSource {
            name: source.to_owned(),
            dir: models_dir.to_owned(),
            hint: format!(
                "; {} files match, name one: {}",
                many.len(),
                many.iter()
                    .map(|p| default_name(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

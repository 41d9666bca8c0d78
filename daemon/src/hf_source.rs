//! Hugging Face model folders as load sources.
//!
//! A load's source may name a Hugging Face model folder — its absolute path, or a repo id
//! (`openai-community/gpt2`, or a bare `gpt2` when no GGUF in the models folder has that name)
//! found offline in the HF cache (`egpu_engine::convert::hf_cache`). Such a folder is converted once to a
//! GGUF (`egpu_engine::convert`) kept under
//! `<models folder>/hf/<key>/<name>[-q8_0].gguf`, and from then on it is an ordinary GGUF model.
//! The key hashes the folder's path, its `config.json` and its weights' and tokenizer files' size
//! and modification time, so an updated snapshot converts again and an unchanged one is reused;
//! f32 and q8_0 conversions are kept side by side.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use egpu_engine::convert::hf_cache::{self, HfCacheError, HfEnv, CONFIG_FILE};
use egpu_engine::convert::{gguf_from_hf_folder, HfModelError, WeightFormat};

use crate::error::DaemonError;
use crate::residency::resolve_source;

/// Where a load's source points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Gguf(PathBuf),
    /// A Hugging Face folder, with the model name to give it (the repo or folder name).
    HfFolder {
        folder: PathBuf,
        name: String,
    },
}

/// Sorts a source into a GGUF file or an HF folder. GGUF names in the models folder win over a
/// cached repo of the same bare name.
pub fn classify(models_dir: &Path, source: &str, env: &HfEnv) -> Result<Source, DaemonError> {
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
        Ok(path) => Ok(Source::Gguf(path)),
        Err(DaemonError::UnknownSource { name, dir, hint })
            if !gguf && hf_cache::is_repo_id(source) =>
        {
            match hf_cache::resolve(source, env) {
                Ok(folder) => Ok(Source::HfFolder {
                    folder,
                    name: repo_name(source),
                }),
                Err(HfCacheError::NotCached { .. }) => Err(DaemonError::UnknownSource {
                    name,
                    dir,
                    hint: format!("{hint}; nor is it a Hugging Face repo in the local HF cache"),
                }),
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

/// The GGUF for an HF folder: converted now, or found from an earlier conversion. Blocking.
pub fn converted_gguf(
    models_dir: &Path,
    folder: &Path,
    name: &str,
    format: WeightFormat,
) -> Result<PathBuf, DaemonError> {
    let key = conversion_key(folder).map_err(|e| DaemonError::BadModelFile {
        path: folder.to_path_buf(),
        reason: e.to_string(),
    })?;
    let dir = models_dir.join("hf").join(format!("{key:016x}"));
    let file_name = match format {
        WeightFormat::F32 => format!("{name}.gguf"),
        other => format!("{name}-{}.gguf", other.name()),
    };
    let out = dir.join(&file_name);
    if out.is_file() {
        return Ok(out);
    }
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
    std::fs::create_dir_all(&dir).map_err(io)?;
    // Written aside and renamed, so a crash never leaves a half GGUF under the final name.
    let tmp = dir.join(format!(".{file_name}.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, &out).map_err(io)?;
    Ok(out)
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

//! Models by name: the ones a request may name (resident or loadable), loading one on demand,
//! and what a model file says about itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use egpu_engine::gguf::GgufFile;
use egpu_engine::models::info::ModelSummary;

use super::requests::{Caller, GenerateRequest};
use super::{Core, GenerationStream};
use crate::error::DaemonError;
use crate::residency::catalog::{self, Source};
use crate::residency::stores::Store;
use crate::residency::{KeepAlive, LoadOptions, ModelInfo, ModelState, Resident};

/// What a request that loads a model on demand may ask of the load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadHints {
    /// Tokens per slot (Ollama's `num_ctx`); used only when the request loads the model.
    pub context: Option<usize>,
    pub keep_alive: Option<KeepAlive>,
}

/// A model a request may name.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    pub name: String,
    pub path: PathBuf,
    /// None: resident from a source no store lists (a path, an HF folder's conversion).
    pub store: Option<Store>,
    pub size_bytes: u64,
    pub modified: Option<SystemTime>,
    pub architecture: String,
    pub parameters: u64,
    pub quantization: String,
    /// Set when the model is resident (under this name).
    pub resident: Option<ModelInfo>,
}

/// What a model is, read from its file's header.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    pub name: String,
    pub path: PathBuf,
    pub summary: ModelSummary,
    pub parameters: u64,
    pub quantization: String,
    pub chat_template: Option<String>,
    pub modified: Option<SystemTime>,
    pub size_bytes: u64,
}

impl Core {
    /// The resident model a request names; a name that is not resident but resolves (models
    /// folder, Ollama, LM Studio, HF cache) is loaded first, under the budget, evicting idle
    /// models as any load does. Concurrent first requests share one load, and a name that
    /// resolves to a file resident under another name is served by that model.
    pub async fn resident_or_load(
        &self,
        name: &str,
        hints: LoadHints,
    ) -> Result<Arc<Resident>, DaemonError> {
        if let Ok(model) = self.residency.get(name) {
            return Ok(model);
        }
        let residency = self.residency.clone();
        let source = name.to_owned();
        let resolved = tokio::task::spawn_blocking(move || residency.classify(&source))
            .await
            .map_err(|e| DaemonError::Internal(e.to_string()))??;
        if let Source::Gguf { path, .. } = &resolved {
            if let Some(model) = self.residency.find_by_source(path) {
                return Ok(model);
            }
        }
        let ticket = self
            .residency
            .start_load(LoadOptions {
                source: name.to_owned(),
                name: Some(name.to_owned()),
                context: hints.context,
                keep_alive: hints.keep_alive,
                ..LoadOptions::default()
            })
            .await?;
        ticket.wait().await
    }

    /// [`Core::generate`] on a model named by a request, loaded first if need be. The request's
    /// keep-alive applies once the generation is queued, so a keep-alive of 0 cannot unload
    /// the model before it serves; a model that goes away between its load and the queue
    /// (another request's keep-alive of 0) is loaded again, once. Also returns the time the
    /// load took.
    pub async fn generate_on_demand(
        &self,
        name: &str,
        hints: LoadHints,
        mut request: GenerateRequest,
        caller: Caller,
    ) -> Result<(GenerationStream, Duration), DaemonError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let started = Instant::now();
            let model = self.resident_or_load(name, hints).await?;
            let load = started.elapsed();
            request.model = model.name.clone();
            match self.generate(request.clone(), caller.clone()).await {
                Ok(stream) => {
                    if let Some(keep_alive) = hints.keep_alive {
                        // The model is busy with this request, so it is still resident.
                        let _ = self.set_keep_alive(&model.name, keep_alive);
                    }
                    return Ok((stream, load));
                }
                Err(DaemonError::UnknownModel { .. } | DaemonError::Unloaded(_))
                    if attempts < 2 => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// Every model a request may name: the resident ones, then the files of every store not
    /// resident under that name.
    pub async fn available(&self) -> Result<Vec<Available>, DaemonError> {
        let files = self.list_model_files().await?;
        let resident = self.residency.snapshot();
        let mut out: Vec<Available> = resident
            .iter()
            // A waiting pin is not resident; its file, if it is there, is listed below.
            .filter(|m| m.state != ModelState::Waiting)
            .map(|m| {
                let file = files.iter().find(|f| f.file.path == m.source);
                Available {
                    name: m.name.clone(),
                    path: m.source.clone(),
                    store: file.map(|f| f.file.store),
                    size_bytes: file.map_or(m.bytes_estimated, |f| f.file.size_bytes),
                    modified: file.and_then(|f| f.file.modified),
                    architecture: m.architecture.clone(),
                    parameters: m.parameters,
                    quantization: file.map_or_else(
                        || {
                            m.quant_mix
                                .first()
                                .map(|q| q.ggml_type.clone())
                                .unwrap_or_default()
                        },
                        |f| f.file.quantization.clone(),
                    ),
                    resident: Some(m.clone()),
                }
            })
            .collect();
        for f in files {
            if f.resident_as.contains(&f.file.name) || !f.file.error.is_empty() {
                continue;
            }
            out.push(Available {
                name: f.file.name,
                path: f.file.path,
                store: Some(f.file.store),
                size_bytes: f.file.size_bytes,
                modified: f.file.modified,
                architecture: f.file.architecture,
                parameters: f.file.parameters,
                quantization: f.file.quantization,
                resident: None,
            });
        }
        Ok(out)
    }

    /// What a named model is (resident or loadable), without loading it.
    pub async fn describe(&self, name: &str) -> Result<Description, DaemonError> {
        let path = match self.residency.get(name) {
            Ok(model) => model.source.clone(),
            Err(_) => {
                let residency = self.residency.clone();
                let source = name.to_owned();
                let resolved = tokio::task::spawn_blocking(move || residency.classify(&source))
                    .await
                    .map_err(|e| DaemonError::Internal(e.to_string()))??;
                match resolved {
                    Source::Gguf { path, .. } => path,
                    Source::HfFolder { folder, .. } => {
                        return Err(DaemonError::InvalidArgument(format!(
                            "{name} is a Hugging Face folder ({}); load it to convert it first",
                            folder.display()
                        )))
                    }
                }
            }
        };
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let file = GgufFile::open(&path).map_err(|e| DaemonError::BadModelFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let meta = std::fs::metadata(&path).ok();
            Ok(Description {
                summary: ModelSummary::from_metadata(file.metadata()),
                parameters: file.tensors().iter().map(|t| t.n_elements).sum(),
                quantization: catalog::quantization(&file),
                chat_template: file
                    .metadata()
                    .get_str("tokenizer.chat_template")
                    .map(str::to_owned),
                modified: meta.as_ref().and_then(|m| m.modified().ok()),
                size_bytes: meta.map_or(0, |m| m.len()),
                name,
                path,
            })
        })
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?
    }

    /// Changes how long a resident model stays once idle (Ollama's `keep_alive`).
    pub fn set_keep_alive(&self, name: &str, keep_alive: KeepAlive) -> Result<(), DaemonError> {
        self.residency.set_keep_alive(name, keep_alive)
    }
}

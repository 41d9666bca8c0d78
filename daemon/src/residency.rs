//! Which models are resident: loading under a memory budget, eviction, keep-alive, unloading.
//!
//! Decisions are made under one lock over the table of models, so two loads can never both
//! count the same free bytes, and a model is only evicted when its queue confirms, under the
//! queue's own lock, that nothing is running or waiting.
//!
//! Memory accounting: each model reserves `max(estimate, measured)`; a load proceeds only if
//! its estimate fits beside every reservation, evicting idle unpinned models least recently
//! used first. If it cannot fit even after evicting every candidate, nothing is evicted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use egpu_engine::chat::ChatTemplate;
use egpu_engine::convert::hf_cache::HfEnv;
use egpu_engine::convert::WeightFormat;
use egpu_engine::gguf::GgufFile;
use egpu_engine::models::info::{bytes_by_type, ModelSummary};
use egpu_engine::tokenizer::Tokenizer;
use egpu_proto::v1::{self as pb, ModelState};
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use crate::backend::{
    self, CpuModel, Estimate, LoadedModel, MarianCpu, ModelSpec, Progress, TinygradModel,
};
use crate::config::KeepAlive;
use crate::error::DaemonError;
use crate::hf_source;
use crate::scheduler::{self, BatchSettings, Device, ModelQueue, StopReason};
use crate::state::{PinnedModel, StateStore};
use crate::worker::{Worker, WorkerLink, WorkerPhase};

/// Context used when a load does not ask for one and the model's trained context is larger.
pub const DEFAULT_CONTEXT: usize = 4096;
pub const DEFAULT_SLOTS: usize = 4;
pub const MAX_SLOTS: usize = 64;
/// Longest context one slot may be given.
pub const MAX_CONTEXT: usize = 1 << 20;

/// What a Load request asks for.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub source: String,
    pub name: Option<String>,
    pub context: Option<usize>,
    pub slots: Option<usize>,
    pub pin: bool,
    pub keep_alive: Option<KeepAlive>,
    pub backend: Option<String>,
    /// How a Hugging Face folder's weights are converted (`f32`, `q8_0`).
    pub quantize: Option<String>,
}

/// Fixed settings of the residency manager.
#[derive(Debug, Clone)]
pub struct ResidencySettings {
    pub budget: u64,
    pub models_dir: PathBuf,
    pub default_backend: String,
    pub default_keep_alive: KeepAlive,
    pub max_queue: usize,
    pub batch_tokens: usize,
}

/// A model that serves requests.
#[derive(Debug)]
pub struct Resident {
    pub name: String,
    pub source: PathBuf,
    pub summary: ModelSummary,
    pub quant_mix: Vec<pb::QuantShare>,
    pub parameters: u64,
    pub estimate: Estimate,
    pub context: usize,
    pub slots: usize,
    pub pinned: bool,
    pub keep_alive: KeepAlive,
    pub backend: String,
    /// For a tinygrad model: the generation of the worker that holds it.
    pub worker_generation: Option<u64>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    pub queue: Arc<ModelQueue>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Resident {
    /// Bytes counted against the budget.
    fn reserved(&self) -> u64 {
        self.estimate.total.max(self.queue.memory_bytes())
    }

    /// When the model expires if it stays idle; None = never.
    fn expiry(&self) -> Option<Instant> {
        if self.pinned {
            return None;
        }
        let KeepAlive::For(keep) = self.keep_alive else {
            return None;
        };
        let counts = self.queue.counts();
        // A keep-alive of 0 means "unload when idle after a request": a model nobody has
        // used yet is not idle *after* anything, and unloading it the moment it is loaded
        // would make the load useless.
        if keep.is_zero() && counts.served == 0 {
            return None;
        }
        let idle_since = counts.idle_since.unwrap_or_else(Instant::now);
        Some(idle_since + keep)
    }

    pub fn info(&self) -> pb::ModelInfo {
        let counts = self.queue.counts();
        pb::ModelInfo {
            name: self.name.clone(),
            source: self.source.display().to_string(),
            architecture: self.summary.architecture.clone(),
            quant_mix: self.quant_mix.clone(),
            bytes: self.queue.memory_bytes(),
            bytes_estimated: self.estimate.total,
            context_length: self.context as u32,
            slots: self.slots as u32,
            pinned: self.pinned,
            keep_alive_expires_unix_ms: self.expiry().map_or(0, instant_to_unix_ms),
            active: counts.active as u32,
            queued: counts.queued as u32,
            requests_served: counts.served,
            last_used_unix_ms: system_to_unix_ms(counts.last_used),
            backend: self.backend.clone(),
            state: ModelState::Ready as i32,
            parameters: self.parameters,
            vocab_size: self.tokenizer.vocab_size() as u32,
            trained_context_length: self.summary.context_length.unwrap_or(0) as u32,
        }
    }

    /// An encoder-decoder translation model (Translate), rather than a decoder-only one
    /// (Generate, Score).
    pub fn is_translation_model(&self) -> bool {
        self.summary.architecture == "marian"
    }

    /// Waits for the batching thread to end (after its queue was stopped).
    fn join(&self) {
        if let Some(thread) = self.thread.lock().take() {
            if thread.join().is_err() {
                tracing::error!(model = %self.name, "batching thread panicked");
            }
        }
    }
}

/// What watchers of a load see.
#[derive(Debug, Clone)]
pub enum LoadPhase {
    Progress(pb::LoadProgress),
    Done(Result<Arc<Resident>, DaemonError>),
}

#[derive(Debug)]
struct Loading {
    source: PathBuf,
    estimate: Estimate,
    context: usize,
    slots: usize,
    pinned: bool,
    backend: String,
    summary: ModelSummary,
    phase: watch::Receiver<LoadPhase>,
}

#[derive(Debug)]
enum Entry {
    Loading(Arc<Loading>),
    Ready(Arc<Resident>),
}

/// The outcome of starting a load.
#[derive(Debug)]
pub enum LoadTicket {
    /// The name was already resident with this source.
    Resident(Arc<Resident>),
    /// A load is under way (this request's or another's); watch it until `Done`.
    Pending {
        name: String,
        phase: watch::Receiver<LoadPhase>,
    },
}

#[derive(Debug)]
pub struct Residency {
    settings: ResidencySettings,
    device: Arc<Device>,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Woken when a model becomes idle or the table changes: keep-alive is re-checked.
    changed: Arc<Notify>,
    shutting_down: AtomicBool,
    /// Where the pinned set is persisted (see [`crate::state`]); None = not persisted.
    state: Option<Arc<StateStore>>,
    /// The tinygrad backend's worker, when egpud runs one.
    worker: Option<Arc<Worker>>,
}

impl Residency {
    pub fn new(settings: ResidencySettings, device: Arc<Device>) -> Residency {
        Residency {
            settings,
            device,
            entries: Mutex::new(BTreeMap::new()),
            changed: Arc::new(Notify::new()),
            shutting_down: AtomicBool::new(false),
            state: None,
            worker: None,
        }
    }

    /// Serves the tinygrad backend through `worker` from now on.
    pub fn with_worker(mut self, worker: Arc<Worker>) -> Residency {
        self.worker = Some(worker);
        self
    }

    pub fn worker(&self) -> Option<&Arc<Worker>> {
        self.worker.as_ref()
    }

    fn backends(&self) -> String {
        if self.worker.is_some() {
            "cpu, tinygrad"
        } else {
            "cpu (start egpud with --backend tinygrad for the tinygrad backend)"
        }
        .into()
    }

    /// Bytes held by the models of one backend.
    pub fn used_by(&self, backend: &str) -> u64 {
        let entries = self.entries.lock();
        entries
            .values()
            .filter_map(|e| match e {
                Entry::Ready(r) if r.backend == backend => Some(r.queue.memory_bytes()),
                _ => None,
            })
            .sum()
    }

    /// Persists the pinned set in `state` from now on.
    pub fn with_state(mut self, state: Arc<StateStore>) -> Residency {
        self.state = Some(state);
        self
    }

    pub fn budget(&self) -> u64 {
        self.settings.budget
    }

    pub fn models_dir(&self) -> &Path {
        &self.settings.models_dir
    }

    /// A ready model by name.
    pub fn get(&self, name: &str) -> Result<Arc<Resident>, DaemonError> {
        let entries = self.entries.lock();
        match entries.get(name) {
            Some(Entry::Ready(r)) => Ok(r.clone()),
            Some(Entry::Loading(_)) => Err(DaemonError::InvalidArgument(format!(
                "{name} is still loading; wait for its load to finish"
            ))),
            None => Err(DaemonError::UnknownModel {
                name: name.to_owned(),
                resident: list_names(&entries),
            }),
        }
    }

    /// Every model, most recently used first, and the bytes they hold (measured).
    pub fn snapshot(&self) -> (Vec<pb::ModelInfo>, u64) {
        let entries = self.entries.lock();
        let mut models: Vec<pb::ModelInfo> = entries
            .iter()
            .map(|(name, entry)| match entry {
                Entry::Ready(r) => r.info(),
                Entry::Loading(l) => pb::ModelInfo {
                    name: name.clone(),
                    source: l.source.display().to_string(),
                    architecture: l.summary.architecture.clone(),
                    bytes_estimated: l.estimate.total,
                    context_length: l.context as u32,
                    slots: l.slots as u32,
                    pinned: l.pinned,
                    backend: l.backend.clone(),
                    state: ModelState::Loading as i32,
                    trained_context_length: l.summary.context_length.unwrap_or(0) as u32,
                    last_used_unix_ms: system_to_unix_ms(SystemTime::now()),
                    ..Default::default()
                },
            })
            .collect();
        models.sort_by_key(|m| std::cmp::Reverse(m.last_used_unix_ms));
        let used = models.iter().map(|m| m.bytes).sum();
        (models, used)
    }

    /// Resolves, checks and plans a load; the loading itself runs in the background so that
    /// a client that goes away does not abandon it half-way (and others may be waiting on it).
    pub async fn start_load(
        self: &Arc<Self>,
        opts: LoadOptions,
    ) -> Result<LoadTicket, DaemonError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(DaemonError::ShuttingDown);
        }
        let backend = opts
            .backend
            .clone()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| self.settings.default_backend.clone());
        let link: Option<Arc<WorkerLink>> = match (backend.as_str(), &self.worker) {
            ("cpu", _) => None,
            ("tinygrad", Some(worker)) => Some(worker.link()?),
            _ => {
                return Err(DaemonError::UnsupportedBackend {
                    name: backend,
                    available: self.backends(),
                })
            }
        };
        let budget = match (&link, &self.worker) {
            (Some(link), Some(worker)) => worker.budget(link)?,
            _ => self.settings.budget,
        };
        let (path, hf_name) = match hf_source::classify(
            &self.settings.models_dir,
            &opts.source,
            &HfEnv::from_process(),
        )? {
            hf_source::Source::Gguf(path) => (path, None),
            hf_source::Source::HfFolder { folder, name } => {
                let models_dir = self.settings.models_dir.clone();
                let hf_name = name.clone();
                let quantize = opts.quantize.clone().unwrap_or_default();
                let format = WeightFormat::parse(&quantize).ok_or_else(|| {
                    DaemonError::InvalidArgument(format!(
                        "unknown quantize {quantize:?}: use f32 or q8_0"
                    ))
                })?;
                let path = tokio::task::spawn_blocking(move || {
                    hf_source::converted_gguf(&models_dir, &folder, &name, format)
                })
                .await
                .map_err(|e| DaemonError::Internal(e.to_string()))??;
                (path, Some(hf_name))
            }
        };
        let name = match opts.name.as_deref().map(str::trim) {
            Some(n) if !n.is_empty() => validate_name(n)?,
            _ => hf_name.map_or_else(|| Ok(default_name(&path)), |n| validate_name(&n))?,
        };
        // Coalesce before touching the file: a second request for a loading model waits.
        if let Some(ticket) = self.existing(&name, &path)? {
            return Ok(ticket);
        }

        let header_path = path.clone();
        let file = tokio::task::spawn_blocking(move || GgufFile::open(&header_path))
            .await
            .map_err(|e| DaemonError::Internal(e.to_string()))?
            .map_err(|e| DaemonError::BadModelFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let file = Arc::new(file);
        let summary = ModelSummary::from_metadata(file.metadata());
        let trained = summary.context_length.map(|c| c as usize);
        let context = match opts.context {
            Some(0) | None => trained.map_or(DEFAULT_CONTEXT, |t| t.clamp(1, DEFAULT_CONTEXT)),
            Some(c) if c > MAX_CONTEXT => {
                return Err(DaemonError::InvalidArgument(format!(
                    "context length {c} is above the limit of {MAX_CONTEXT}"
                )))
            }
            Some(c) => c,
        };
        // Learned absolute positions (GPT-2) end at the trained context.
        if let (true, Some(t)) = (summary.architecture == "gpt2", trained) {
            if context > t {
                return Err(DaemonError::InvalidArgument(format!(
                    "{} has learned positions for {t} tokens; the context can be at most {t}",
                    path.display()
                )));
            }
        }
        let slots = match opts.slots {
            Some(0) | None => DEFAULT_SLOTS,
            Some(s) if s > MAX_SLOTS => {
                return Err(DaemonError::InvalidArgument(format!(
                    "{s} slots is above the limit of {MAX_SLOTS}"
                )))
            }
            Some(s) => s,
        };
        let spec = ModelSpec {
            path: path.clone(),
            context,
            slots,
            batch_tokens: self.settings.batch_tokens.max(slots),
        };
        let translation = summary.architecture == "marian";
        if translation && link.is_some() {
            return Err(DaemonError::UnsupportedBackend {
                name: format!("{backend} (Marian translation models run on the cpu backend only)"),
                available: "cpu".into(),
            });
        }
        let estimate = if translation {
            // `slots` sentences translated at once, as a typical batch.
            backend::marian_estimate(&file, slots as u64).map_err(|e| {
                DaemonError::BadModelFile {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?
        } else {
            backend::estimate(&file, &summary, &spec)
        };
        let keep_alive = opts.keep_alive.unwrap_or(self.settings.default_keep_alive);

        let (phase_tx, phase_rx) = watch::channel(LoadPhase::Progress(pb::LoadProgress {
            stage: "estimating".into(),
            message: format!(
                "needs {} bytes (weights {}, KV cache {}, scratch {})",
                estimate.total, estimate.weights, estimate.kv_cache, estimate.scratch
            ),
            ..Default::default()
        }));
        let victims = {
            let mut entries = self.entries.lock();
            // Someone may have started the same load while the header was read.
            match entries.get(&name) {
                Some(Entry::Ready(r)) if r.source == path => {
                    return Ok(LoadTicket::Resident(r.clone()))
                }
                Some(Entry::Loading(l)) if l.source == path => {
                    return Ok(LoadTicket::Pending {
                        name,
                        phase: l.phase.clone(),
                    })
                }
                Some(Entry::Ready(r)) => {
                    return Err(DaemonError::NameTaken {
                        name,
                        source_path: r.source.clone(),
                    })
                }
                Some(Entry::Loading(l)) => {
                    return Err(DaemonError::NameTaken {
                        name,
                        source_path: l.source.clone(),
                    })
                }
                None => {}
            }
            let victims =
                self.plan_eviction(&mut entries, &name, &backend, budget, estimate.total)?;
            entries.insert(
                name.clone(),
                Entry::Loading(Arc::new(Loading {
                    source: path.clone(),
                    estimate,
                    context,
                    slots,
                    pinned: opts.pin,
                    backend: backend.clone(),
                    summary: summary.clone(),
                    phase: phase_rx.clone(),
                })),
            );
            victims
        };
        tracing::info!(
            model = %name,
            source = %path.display(),
            context,
            slots,
            estimate = estimate.total,
            evicting = victims.len(),
            "loading"
        );

        let this = self.clone();
        let task_name = name.clone();
        tokio::spawn(async move {
            let loaded = this
                .finish_load(
                    task_name.clone(),
                    file,
                    spec,
                    summary,
                    estimate,
                    opts.pin,
                    keep_alive,
                    backend,
                    link,
                    victims,
                    &phase_tx,
                )
                .await;
            if let Err(err) = &loaded {
                tracing::error!(model = %task_name, cause = %err, "load failed");
                this.entries.lock().remove(&task_name);
            }
            this.changed.notify_one();
            phase_tx.send_replace(LoadPhase::Done(loaded));
        });
        Ok(LoadTicket::Pending {
            name,
            phase: phase_rx,
        })
    }

    fn existing(&self, name: &str, path: &Path) -> Result<Option<LoadTicket>, DaemonError> {
        let entries = self.entries.lock();
        match entries.get(name) {
            None => Ok(None),
            Some(Entry::Ready(r)) if r.source == path => Ok(Some(LoadTicket::Resident(r.clone()))),
            Some(Entry::Loading(l)) if l.source == path => Ok(Some(LoadTicket::Pending {
                name: name.to_owned(),
                phase: l.phase.clone(),
            })),
            Some(Entry::Ready(r)) => Err(DaemonError::NameTaken {
                name: name.to_owned(),
                source_path: r.source.clone(),
            }),
            Some(Entry::Loading(l)) => Err(DaemonError::NameTaken {
                name: name.to_owned(),
                source_path: l.source.clone(),
            }),
        }
    }

    /// The idle, unpinned models to evict (least recently used first) so that `needed` more
    /// bytes fit; an error, evicting nothing, when even evicting all of them is not enough.
    ///
    /// The victims are stopped and removed from `entries` here. A victim stopped before a
    /// later candidate turned out to be busy stays removed even when the plan then fails:
    /// its thread has ended, and leaving it listed would advertise a model that cannot serve.
    /// Only models of the same backend count: each backend has its own memory and budget.
    fn plan_eviction(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        name: &str,
        backend: &str,
        budget: u64,
        needed: u64,
    ) -> Result<Vec<Arc<Resident>>, DaemonError> {
        let reserved = |e: &Entry| match e {
            Entry::Ready(r) => r.reserved(),
            Entry::Loading(l) => l.estimate.total,
        };
        let same_backend = |e: &Entry| match e {
            Entry::Ready(r) => r.backend == backend,
            Entry::Loading(l) => l.backend == backend,
        };
        let used: u64 = entries
            .values()
            .filter(|e| same_backend(e))
            .map(reserved)
            .sum();
        let free = budget.saturating_sub(used);
        if needed <= free {
            return Ok(Vec::new());
        }
        let mut candidates: Vec<Arc<Resident>> = entries
            .values()
            .filter_map(|e| match e {
                Entry::Ready(r) if r.backend == backend && !r.pinned && r.queue.is_idle() => {
                    Some(r.clone())
                }
                _ => None,
            })
            .collect();
        candidates.sort_by_key(|r| r.queue.counts().last_used);
        let evictable: u64 = candidates.iter().map(|r| r.reserved()).sum();
        if needed > free.saturating_add(evictable) {
            let holders = entries
                .iter()
                .filter(|(_, e)| same_backend(e))
                .map(|(n, e)| {
                    let why = match e {
                        Entry::Loading(_) => "loading",
                        Entry::Ready(r) if r.pinned => "pinned",
                        Entry::Ready(r) if !r.queue.is_idle() => "busy",
                        Entry::Ready(_) => "idle",
                    };
                    format!("{n} {} bytes ({why})", reserved(e))
                })
                .collect::<Vec<_>>();
            return Err(DaemonError::OverBudget {
                name: name.to_owned(),
                needed,
                available: free.saturating_add(evictable),
                budget,
                holders: if holders.is_empty() {
                    "nothing".into()
                } else {
                    holders.join(", ")
                },
            });
        }
        let mut victims = Vec::new();
        let mut freed = free;
        for candidate in candidates {
            if freed >= needed {
                break;
            }
            // The queue re-checks idleness under its own lock: a request that arrived since
            // keeps its model.
            if candidate.queue.stop(StopReason::Unload, false).is_ok() {
                freed = freed.saturating_add(candidate.reserved());
                victims.push(candidate);
            }
        }
        for victim in &victims {
            entries.remove(&victim.name);
        }
        if freed < needed {
            // Requests raced in; the stopped victims are gone either way (they were idle).
            return Err(DaemonError::OverBudget {
                name: name.to_owned(),
                needed,
                available: freed,
                budget,
                holders: "models that became busy while planning".into(),
            });
        }
        Ok(victims)
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish_load(
        self: &Arc<Self>,
        name: String,
        file: Arc<GgufFile>,
        spec: ModelSpec,
        summary: ModelSummary,
        estimate: Estimate,
        pinned: bool,
        keep_alive: KeepAlive,
        backend: String,
        link: Option<Arc<WorkerLink>>,
        victims: Vec<Arc<Resident>>,
        phase: &watch::Sender<LoadPhase>,
    ) -> Result<Arc<Resident>, DaemonError> {
        let progress = |stage: &str, done: u64, total: u64, message: String| {
            phase.send_replace(LoadPhase::Progress(pb::LoadProgress {
                stage: stage.into(),
                done,
                total,
                message,
            }));
        };
        for (i, victim) in victims.iter().enumerate() {
            tracing::info!(model = %victim.name, "evicting (least recently used, idle)");
            progress(
                "evicting",
                i as u64,
                victims.len() as u64,
                format!("evicting {} ({} bytes)", victim.name, victim.reserved()),
            );
            let victim = victim.clone();
            join_blocking(victim).await;
        }

        let load_phase = phase.clone();
        let load_spec = spec.clone();
        let on_cpu = link.is_none();
        let loaded = tokio::task::spawn_blocking(move || {
            let mut report = |p: Progress| {
                load_phase.send_replace(LoadPhase::Progress(pb::LoadProgress {
                    stage: p.stage.into(),
                    done: p.done,
                    total: p.total,
                    message: String::new(),
                }));
            };
            let bad = |reason: String| DaemonError::BadModelFile {
                path: load_spec.path.clone(),
                reason,
            };
            let meta = file.metadata();
            let tokenizer = Tokenizer::from_gguf(meta).map_err(|e| bad(e.to_string()))?;
            let template = ChatTemplate::from_gguf(meta).map_err(|e| bad(e.to_string()))?;
            let quant_mix = quant_mix(&file);
            let parameters = file.tensors().iter().map(|t| t.n_elements).sum();
            let model = if !on_cpu {
                None
            } else if file.metadata().architecture() == Some("marian") {
                Some(LoadedModel::Marian(Box::new(MarianCpu::load(
                    file,
                    &load_spec,
                    &mut report,
                )?)))
            } else {
                Some(LoadedModel::Cpu(Box::new(CpuModel::load(
                    file,
                    &load_spec,
                    &mut report,
                )?)))
            };
            Ok::<_, DaemonError>((model, tokenizer, template, quant_mix, parameters))
        })
        .await
        .map_err(|e| DaemonError::Internal(format!("load task failed: {e}")))??;
        let (cpu_model, tokenizer, template, quant_mix, parameters) = loaded;
        let model = match (cpu_model, link) {
            (Some(model), _) => model,
            (None, Some(link)) => {
                progress(
                    "uploading to the device",
                    0,
                    estimate.weights,
                    format!("{} ({})", link.device.device, link.device.name),
                );
                LoadedModel::Tinygrad(TinygradModel::load(link, &spec).await?)
            }
            (None, None) => unreachable!("a model is loaded on the cpu or through a worker"),
        };
        let (worker_generation, worker_link) = match &model {
            LoadedModel::Tinygrad(m) => (Some(m.generation()), Some(m.link().clone())),
            LoadedModel::Cpu(_) | LoadedModel::Marian(_) => (None, None),
        };
        // Every id the tokenizer can produce must have an embedding row and a logit;
        // a file where it does not would fail requests (or worse) much later.
        let n_vocab = model.n_vocab();
        if tokenizer.vocab_size() > n_vocab {
            return Err(DaemonError::BadModelFile {
                path: spec.path.clone(),
                reason: format!(
                    "the tokenizer has {} tokens but the embedding table only {n_vocab}",
                    tokenizer.vocab_size()
                ),
            });
        }

        let tokenizer = Arc::new(tokenizer);
        let queue = Arc::new(ModelQueue::new(
            name.clone(),
            self.settings.max_queue,
            self.changed.clone(),
            model.memory_bytes(),
        ));
        let resident = Arc::new(Resident {
            name: name.clone(),
            source: spec.path.clone(),
            summary,
            quant_mix,
            parameters,
            estimate,
            context: spec.context,
            slots: spec.slots,
            pinned,
            keep_alive,
            backend,
            worker_generation,
            tokenizer: tokenizer.clone(),
            template,
            queue: queue.clone(),
            thread: Mutex::new(None),
        });
        let device = self.device.clone();
        let settings = BatchSettings {
            batch_tokens: spec.batch_tokens,
        };
        let thread = std::thread::Builder::new()
            .name(format!("egpu-{name}"))
            .spawn(move || scheduler::run_batcher(model, tokenizer, queue, device, settings))
            .map_err(|e| DaemonError::Internal(format!("cannot start a thread: {e}")))?;
        *resident.thread.lock() = Some(thread);

        let mut entries = self.entries.lock();
        if self.shutting_down.load(Ordering::SeqCst) {
            drop(entries);
            let _ = resident.queue.stop(StopReason::Shutdown, true);
            join_blocking(resident).await;
            return Err(DaemonError::ShuttingDown);
        }
        // The worker may have died since it loaded the model. Its loss is marked on the link
        // before it is announced, and the announcement's handler takes this lock: so either
        // the loss is seen here, or the handler will find this entry and drop it.
        if worker_link.as_ref().is_some_and(|l| l.is_lost()) {
            drop(entries);
            let _ = resident.queue.stop(StopReason::DeviceLost, true);
            join_blocking(resident).await;
            return Err(DaemonError::DeviceLost(
                "the tinygrad worker stopped while the model was loading".into(),
            ));
        }
        tracing::info!(
            model = %name,
            bytes = resident.queue.memory_bytes(),
            estimate = estimate.total,
            "resident"
        );
        // Remembered under the table's lock, so an Unload that comes right after the model
        // appears (and forgets it, under the same lock) cannot be overtaken by this write.
        if let (true, Some(state)) = (resident.pinned, &self.state) {
            state.remember(PinnedModel::from_resident(&resident));
        }
        entries.insert(name, Entry::Ready(resident.clone()));
        Ok(resident)
    }

    /// Unloads a model; with `force`, its running and queued requests end with ABORTED.
    /// Returns the bytes freed and the number of requests aborted.
    pub async fn unload(&self, name: &str, force: bool) -> Result<(u64, usize), DaemonError> {
        let resident = {
            let mut entries = self.entries.lock();
            let resident = match entries.get(name) {
                Some(Entry::Ready(r)) => r.clone(),
                Some(Entry::Loading(_)) => {
                    return Err(DaemonError::InvalidArgument(format!(
                        "{name} is still loading; unload it when its load has finished"
                    )))
                }
                None => {
                    return Err(DaemonError::UnknownModel {
                        name: name.to_owned(),
                        resident: list_names(&entries),
                    })
                }
            };
            let aborted = resident.queue.stop(StopReason::Unload, force)?;
            entries.remove(name);
            (resident, aborted)
        };
        let (resident, aborted) = resident;
        let freed = resident.queue.memory_bytes();
        tracing::info!(model = %name, force, aborted, freed, "unloading");
        if let (true, Some(state)) = (resident.pinned, &self.state) {
            state.forget(name);
        }
        join_blocking(resident).await;
        self.changed.notify_one();
        Ok((freed, aborted))
    }

    /// Unloads idle models whose keep-alive has passed; returns when the next one expires.
    fn expire_idle(&self) -> (Vec<Arc<Resident>>, Option<Instant>) {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        for entry in entries.values() {
            let Entry::Ready(r) = entry else { continue };
            let Some(at) = r.expiry() else { continue };
            if !r.queue.is_idle() {
                continue;
            }
            if at <= now {
                if r.queue.stop(StopReason::Unload, false).is_ok() {
                    expired.push(r.clone());
                }
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        for r in &expired {
            tracing::info!(model = %r.name, "keep-alive expired; unloading");
            entries.remove(&r.name);
        }
        (expired, next)
    }

    /// Unloads models as their keep-alive expires, until `stop` is set.
    pub async fn run_keep_alive(self: Arc<Self>) {
        loop {
            if self.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            // Register interest before checking, so a change between the check and the wait
            // is not missed.
            let changed = self.changed.clone();
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (expired, next) = self.expire_idle();
            for r in expired {
                join_blocking(r).await;
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Ends every model's requests with UNAVAILABLE and waits for their threads.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let residents: Vec<Arc<Resident>> = {
            let mut entries = self.entries.lock();
            let residents = entries
                .values()
                .filter_map(|e| match e {
                    Entry::Ready(r) => Some(r.clone()),
                    Entry::Loading(_) => None,
                })
                .collect();
            entries.retain(|_, e| matches!(e, Entry::Loading(_)));
            residents
        };
        for r in &residents {
            let _ = r.queue.stop(StopReason::Shutdown, true);
        }
        for r in residents {
            join_blocking(r).await;
        }
        self.changed.notify_one();
    }

    /// The tinygrad worker of `generation` is gone: its models' requests end with
    /// UNAVAILABLE "device lost" and the models leave the table. Pinned ones stay in the
    /// state file; [`Residency::follow_worker`] loads them again once a worker is back.
    pub async fn device_lost(&self, generation: u64) {
        let lost: Vec<Arc<Resident>> = {
            let mut entries = self.entries.lock();
            let lost: Vec<Arc<Resident>> = entries
                .values()
                .filter_map(|e| match e {
                    Entry::Ready(r) if r.worker_generation == Some(generation) => Some(r.clone()),
                    _ => None,
                })
                .collect();
            for r in &lost {
                let _ = r.queue.stop(StopReason::DeviceLost, true);
                entries.remove(&r.name);
            }
            lost
        };
        for r in lost {
            tracing::warn!(model = %r.name, "device lost: the model is no longer resident");
            join_blocking(r).await;
        }
        self.changed.notify_one();
    }

    /// Follows the tinygrad worker: a lost worker's models are dropped, and when a worker is
    /// ready (at start, or after a restart) the pinned tinygrad models are loaded on it.
    pub async fn follow_worker(self: Arc<Self>) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let mut phases = worker.subscribe();
        loop {
            let phase = phases.borrow_and_update().clone();
            match phase {
                WorkerPhase::Lost { generation, .. } => self.device_lost(generation).await,
                WorkerPhase::Ready(_) => {
                    if let Some(state) = self.state.clone() {
                        crate::state::reload_pinned(self.clone(), state, Some("tinygrad")).await;
                    }
                }
                WorkerPhase::Stopped => return,
                WorkerPhase::Starting => {}
            }
            if phases.changed().await.is_err() {
                return;
            }
        }
    }

    /// The `.gguf` files in the models folder.
    pub fn list_files(&self) -> Result<Vec<pb::ModelFile>, DaemonError> {
        let dir = &self.settings.models_dir;
        let mut files = Vec::new();
        for path in gguf_files(dir) {
            // Sources are stored canonical; so must the listing be to match them.
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            let size = std::fs::metadata(&path).map_or(0, |m| m.len());
            let (architecture, error) = match GgufFile::open(&path) {
                Ok(f) => (
                    f.metadata().architecture().unwrap_or("").to_owned(),
                    String::new(),
                ),
                Err(e) => (String::new(), e.to_string()),
            };
            let resident_as = {
                let entries = self.entries.lock();
                entries
                    .iter()
                    .filter(|(_, e)| match e {
                        Entry::Ready(r) => r.source == path,
                        Entry::Loading(l) => l.source == path,
                    })
                    .map(|(n, _)| n.clone())
                    .collect()
            };
            files.push(pb::ModelFile {
                name: default_name(&path),
                path: path.display().to_string(),
                size_bytes: size,
                architecture,
                resident_as,
                error,
            });
        }
        Ok(files)
    }
}

async fn join_blocking(resident: Arc<Resident>) {
    let _ = tokio::task::spawn_blocking(move || resident.join()).await;
}

fn list_names(entries: &BTreeMap<String, Entry>) -> String {
    if entries.is_empty() {
        "none".into()
    } else {
        entries.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn quant_mix(file: &GgufFile) -> Vec<pb::QuantShare> {
    let mut mix: Vec<pb::QuantShare> = bytes_by_type(file)
        .into_iter()
        .map(|(ty, (tensors, bytes))| pb::QuantShare {
            r#type: ty.to_string(),
            tensors: tensors as u32,
            bytes,
        })
        .collect();
    mix.sort_by_key(|q| std::cmp::Reverse(q.bytes));
    mix
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

fn validate_name(name: &str) -> Result<String, DaemonError> {
    let ok = name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(DaemonError::InvalidArgument(format!(
            "model name {name:?} must be at most 128 letters, digits, '-', '_', '.', ':' or '/'"
        )))
    }
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
pub fn resolve_source(models_dir: &Path, source: &str) -> Result<PathBuf, DaemonError> {
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

fn system_to_unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn instant_to_unix_ms(at: Instant) -> i64 {
    let now = Instant::now();
    let wall = if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now()
            .checked_sub(now - at)
            .unwrap_or(UNIX_EPOCH)
    };
    system_to_unix_ms(wall)
}

//! Which models are resident: loading under a memory budget, eviction, keep-alive, unloading.
//!
//! - [`catalog`]: where a load's source resolves (models folder, HF cache, conversions).
//! - [`eviction`]: which idle models make room (a pure rule over plain records).
//! - [`pins`]: pinned models brought back after a restart.
//!
//! Decisions are made under one lock over the table of models, so two loads can never both
//! count the same free bytes, and a model is only evicted when its queue confirms, under the
//! queue's own lock, that nothing is running or waiting.
//!
//! Memory accounting: each model reserves `max(estimate, measured)`; a load proceeds only if
//! its estimate fits beside every reservation of its backend, evicting idle unpinned models
//! least recently used first. If it cannot fit even after evicting every candidate, nothing
//! is evicted.

pub mod catalog;
pub mod eviction;
pub mod pins;
pub mod stores;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use egpu_engine::chat::ChatTemplate;
use egpu_engine::convert::hf_cache::HfEnv;
use egpu_engine::convert::WeightFormat;
use egpu_engine::gguf::GgufFile;
use egpu_engine::models::info::{bytes_by_type, ModelSummary};
use egpu_engine::models::ModelKind;
use egpu_engine::tokenizer::Tokenizer;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use crate::backend::tinygrad::{Worker, WorkerLink, WorkerPhase};
use crate::backend::{
    self, BackendKind, ComputeTurns, CpuModel, DecoderModel, Estimate, LoadedModel, MarianCpu,
    ModelSpec, Progress, TinygradModel, TranslationCosts,
};
use crate::error::DaemonError;
use crate::metrics::{self, LoadLabels, Metrics};
use crate::scheduler::constraint::Grammars;
use crate::scheduler::{self, ModelQueue, PrefixStats, RunnerSettings, StopReason};
use crate::state::StateStore;
use catalog::{Catalog, CatalogFile, Source};
use egpu_engine::models::embedding::Pooling;
use eviction::{Holder, Holding};

/// How often the files of CPU models are checked for in-place writes.
const FILE_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Context used when a load does not ask for one and the model's trained context is larger.
pub const DEFAULT_CONTEXT: usize = 4096;
pub const DEFAULT_SLOTS: usize = 4;
pub const MAX_SLOTS: usize = 64;
/// Longest context one slot may be given.
pub const MAX_CONTEXT: usize = 1 << 20;

/// How long an idle model stays resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    Forever,
    For(Duration),
}

impl KeepAlive {
    /// The API's encoding: negative = forever, else milliseconds.
    pub fn from_millis(ms: i64) -> KeepAlive {
        if ms < 0 {
            KeepAlive::Forever
        } else {
            KeepAlive::For(Duration::from_millis(ms as u64))
        }
    }

    /// `forever`, `inf` or anything negative (`-1`, `-1m`); `0`; a bare number of seconds;
    /// or numbers with units `ns`, `us`, `ms`, `s`, `m`, `h`, in a row as Go writes durations
    /// (`30s`, `5m`, `1h30m`, `1.5h`, `250ms`) — the forms egpud's flags and Ollama's
    /// `keep_alive` take.
    pub fn parse(text: &str) -> Result<KeepAlive, String> {
        let text = text.trim().to_ascii_lowercase();
        if text == "forever" || text == "inf" || text.starts_with('-') {
            return Ok(KeepAlive::Forever);
        }
        let usage = || format!("{text:?} is not a duration (try 30s, 5m, 1h30m, 2h, forever)");
        if text.is_empty() {
            return Err(usage());
        }
        let mut seconds = 0f64;
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let split = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (number, after) = rest.split_at(split);
            let number: f64 = number.parse().map_err(|_| usage())?;
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_len);
            let scale = match unit {
                "" if next.is_empty() && rest.len() == text.len() => 1.0,
                "ns" => 1e-9,
                "us" | "µs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                other => {
                    return Err(format!(
                        "unknown duration unit {other:?} in {text:?} (use ms, s, m, h)"
                    ))
                }
            };
            seconds += number * scale;
            rest = next;
        }
        Duration::try_from_secs_f64(seconds)
            .map(KeepAlive::For)
            .map_err(|_| format!("{text:?} is not a usable duration"))
    }
}

/// What a Load request asks for.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub source: String,
    pub name: Option<String>,
    pub context: Option<usize>,
    pub slots: Option<usize>,
    pub pin: bool,
    pub keep_alive: Option<KeepAlive>,
    /// A backend's name as the client wrote it; None = egpud's default.
    pub backend: Option<String>,
    /// How a Hugging Face folder's weights are converted (`f32`, `q8_0`).
    pub quantize: Option<String>,
}

/// Fixed settings of the residency manager.
#[derive(Debug, Clone)]
pub struct ResidencySettings {
    pub budget: u64,
    pub models_dir: PathBuf,
    pub default_backend: BackendKind,
    pub default_keep_alive: KeepAlive,
    pub max_queue: usize,
    pub batch_tokens: usize,
}

/// How a model's memory is split by tensor type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantShare {
    pub ggml_type: String,
    pub tensors: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    /// A pinned model that could not be loaded again (its file missing for now, the budget
    /// full for now); egpud retries it with backoff until it loads or is unloaded.
    Waiting,
}

/// A model as Status and the model lists show it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub source: PathBuf,
    pub architecture: String,
    pub kind: ModelKind,
    /// Largest first.
    pub quant_mix: Vec<QuantShare>,
    /// Measured bytes held (0 while loading).
    pub bytes: u64,
    pub bytes_estimated: u64,
    pub context_length: usize,
    pub slots: usize,
    pub pinned: bool,
    /// When an idle model unloads; None = never (pinned, forever, or not yet used).
    pub keep_alive_expires: Option<SystemTime>,
    pub active: usize,
    pub queued: usize,
    pub requests_served: u64,
    pub last_used: SystemTime,
    pub backend: BackendKind,
    pub state: ModelState,
    pub parameters: u64,
    pub vocab_size: usize,
    pub trained_context_length: Option<u64>,
    /// Why a waiting pin is not loaded yet (the last attempt's error); empty otherwise.
    pub detail: String,
    pub prefix_cache: PrefixStats,
}

/// A model that serves requests.
#[derive(Debug)]
pub struct Resident {
    pub name: String,
    pub source: PathBuf,
    pub summary: ModelSummary,
    pub kind: ModelKind,
    pub quant_mix: Vec<QuantShare>,
    pub parameters: u64,
    pub estimate: Estimate,
    pub context: usize,
    pub slots: usize,
    pub pinned: bool,
    /// Changed by requests that ask for another (Ollama's `keep_alive`).
    keep_alive: Mutex<KeepAlive>,
    pub backend: BackendKind,
    /// For a tinygrad model: the generation of the worker that holds it.
    pub worker_generation: Option<u64>,
    pub tokenizer: Arc<Tokenizer>,
    /// The vocabulary for constrained generation, built at the first request that needs it.
    pub grammars: Arc<Grammars>,
    pub template: ChatTemplate,
    pub queue: Arc<ModelQueue>,
    /// For a translation model: what its translations' working memory costs.
    pub translation: Option<TranslationCosts>,
    /// The mapped file a CPU model computes from (watched: see [`Residency::watch_files`]).
    file: Option<Arc<GgufFile>>,
    /// How embeddings are pooled, from the file's header at load (or why they cannot be).
    pooling: Result<Pooling, String>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Working memory a job holds beyond its model's reservation; given back on drop.
#[derive(Debug)]
pub struct WorkingGrant {
    queue: Arc<ModelQueue>,
    before: u64,
}

impl Drop for WorkingGrant {
    fn drop(&mut self) {
        self.queue.set_memory_bytes(self.before);
    }
}

impl Resident {
    /// How this model's embeddings are pooled (its file's `<arch>.pooling_type`, else last
    /// token), on either backend.
    pub fn pooling(&self) -> Result<Pooling, DaemonError> {
        self.pooling.clone().map_err(DaemonError::InvalidArgument)
    }

    /// Bytes counted against the budget.
    fn reserved(&self) -> u64 {
        self.estimate.total.max(self.queue.memory_bytes())
    }

    /// When the model expires if it stays idle; None = never.
    fn expiry(&self) -> Option<Instant> {
        if self.pinned {
            return None;
        }
        let KeepAlive::For(keep) = self.keep_alive() else {
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

    pub fn info(&self) -> ModelInfo {
        let counts = self.queue.counts();
        ModelInfo {
            name: self.name.clone(),
            source: self.source.clone(),
            architecture: self.summary.architecture.clone(),
            kind: self.kind,
            quant_mix: self.quant_mix.clone(),
            bytes: self.queue.memory_bytes(),
            bytes_estimated: self.estimate.total,
            context_length: self.context,
            slots: self.slots,
            pinned: self.pinned,
            keep_alive_expires: self.expiry().map(instant_to_system),
            active: counts.active,
            queued: counts.queued,
            requests_served: counts.served,
            last_used: counts.last_used,
            backend: self.backend,
            state: ModelState::Ready,
            parameters: self.parameters,
            vocab_size: self.tokenizer.vocab_size(),
            trained_context_length: self.summary.context_length,
            detail: String::new(),
            prefix_cache: self.queue.prefix_stats(),
        }
    }

    pub fn keep_alive(&self) -> KeepAlive {
        *self.keep_alive.lock()
    }

    /// Waits for the runner thread to end (after its queue was stopped).
    fn join(&self) {
        if let Some(thread) = self.thread.lock().take() {
            if thread.join().is_err() {
                tracing::error!(model = %self.name, "model runner panicked");
            }
        }
    }
}

/// A load's progress as its watchers see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadProgress {
    pub stage: String,
    pub done: u64,
    pub total: u64,
    pub message: String,
}

/// What watchers of a load see.
#[derive(Debug, Clone)]
pub enum LoadPhase {
    Progress(LoadProgress),
    Done(Result<Arc<Resident>, DaemonError>),
}

#[derive(Debug)]
struct Loading {
    source: PathBuf,
    estimate: Estimate,
    context: usize,
    slots: usize,
    pinned: bool,
    backend: BackendKind,
    summary: ModelSummary,
    phase: watch::Receiver<LoadPhase>,
}

/// What [`Residency::lookup`] found under a name.
enum Lookup {
    Ready(Arc<Resident>),
    Loading(watch::Receiver<LoadPhase>),
}

#[derive(Debug)]
enum Entry {
    Loading(Arc<Loading>),
    Ready(Arc<Resident>),
}

impl Entry {
    fn source(&self) -> &Path {
        match self {
            Entry::Loading(l) => &l.source,
            Entry::Ready(r) => &r.source,
        }
    }

    fn backend(&self) -> BackendKind {
        match self {
            Entry::Loading(l) => l.backend,
            Entry::Ready(r) => r.backend,
        }
    }

    /// The entry as the eviction rule sees it.
    fn holder(&self, name: &str) -> Holder {
        match self {
            Entry::Loading(l) => Holder {
                name: name.to_owned(),
                reserved: l.estimate.total,
                holding: Holding::Loading,
                last_used: SystemTime::now(),
            },
            Entry::Ready(r) => Holder {
                name: name.to_owned(),
                reserved: r.reserved(),
                holding: if r.pinned {
                    Holding::Pinned
                } else if r.queue.is_idle() {
                    Holding::Idle
                } else {
                    Holding::Busy
                },
                last_used: r.queue.counts().last_used,
            },
        }
    }
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

impl LoadTicket {
    /// Waits for the load to end: the resident model, or why it failed.
    pub async fn wait(self) -> Result<Arc<Resident>, DaemonError> {
        let mut phase = match self {
            LoadTicket::Resident(r) => return Ok(r),
            LoadTicket::Pending { phase, .. } => phase,
        };
        loop {
            if let LoadPhase::Done(result) = &*phase.borrow_and_update() {
                return result.clone();
            }
            if phase.changed().await.is_err() {
                // The sender is dropped only after Done was sent.
                return match &*phase.borrow() {
                    LoadPhase::Done(result) => result.clone(),
                    LoadPhase::Progress(_) => {
                        Err(DaemonError::Internal("the load ended unexpectedly".into()))
                    }
                };
            }
        }
    }
}

/// A resident model of the catalog's listing, with the names it is resident as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFile {
    pub file: CatalogFile,
    pub resident_as: Vec<String>,
}

#[derive(Debug)]
pub struct Residency {
    settings: ResidencySettings,
    catalog: Catalog,
    turns: Arc<ComputeTurns>,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Woken when a model becomes idle or the table changes: keep-alive is re-checked.
    changed: Arc<Notify>,
    shutting_down: AtomicBool,
    /// Where the pinned set is persisted (see [`crate::state`]); None = not persisted.
    state: Option<Arc<StateStore>>,
    /// The tinygrad backend's worker, when egpud runs one.
    worker: Option<Arc<Worker>>,
    metrics: Arc<Metrics>,
    /// Pinned models that failed to load again at start, by name; see [`pins`].
    waiting: Mutex<BTreeMap<String, pins::WaitingPin>>,
}

impl Residency {
    pub fn new(
        settings: ResidencySettings,
        turns: Arc<ComputeTurns>,
        metrics: Arc<Metrics>,
    ) -> Residency {
        Residency {
            catalog: Catalog::new(settings.models_dir.clone()),
            settings,
            turns,
            metrics,
            entries: Mutex::new(BTreeMap::new()),
            changed: Arc::new(Notify::new()),
            shutting_down: AtomicBool::new(false),
            state: None,
            worker: None,
            waiting: Mutex::new(BTreeMap::new()),
        }
    }

    /// Serves the tinygrad backend through `worker` from now on.
    pub fn with_worker(mut self, worker: Arc<Worker>) -> Residency {
        self.worker = Some(worker);
        self
    }

    /// Persists the pinned set in `state` from now on.
    pub fn with_state(mut self, state: Arc<StateStore>) -> Residency {
        self.state = Some(state);
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn worker(&self) -> Option<&Arc<Worker>> {
        self.worker.as_ref()
    }

    pub fn budget(&self) -> u64 {
        self.settings.budget
    }

    pub fn models_dir(&self) -> &Path {
        self.catalog.models_dir()
    }

    /// The backends this egpud serves, for error messages.
    fn backends(&self) -> String {
        if self.worker.is_some() {
            "cpu, tinygrad"
        } else {
            "cpu (start egpud with --backend tinygrad for the tinygrad backend)"
        }
        .into()
    }

    /// A backend by the name a client gave; None or empty = egpud's default.
    fn backend_named(&self, name: Option<&str>) -> Result<BackendKind, DaemonError> {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return Ok(self.settings.default_backend);
        };
        match BackendKind::parse(name) {
            Some(BackendKind::Tinygrad) if self.worker.is_none() => {
                Err(DaemonError::UnsupportedBackend {
                    name: name.to_owned(),
                    available: self.backends(),
                })
            }
            Some(kind) => Ok(kind),
            None => Err(DaemonError::UnsupportedBackend {
                name: name.to_owned(),
                available: self.backends(),
            }),
        }
    }

    /// Bytes reserved on one backend (each model's `max(estimate, measured)`, loads included).
    fn reserved_on(&self, backend: BackendKind) -> u64 {
        let entries = self.entries.lock();
        entries
            .iter()
            .filter(|(_, e)| e.backend() == backend)
            .map(|(name, e)| e.holder(name).reserved)
            .sum()
    }

    /// Removes conversions of HF folders that no resident model uses; see
    /// [`catalog::Catalog::prune_conversions`]. Blocking.
    pub fn prune_conversions(&self) -> std::io::Result<(Vec<PathBuf>, u64)> {
        let keep: Vec<PathBuf> = self
            .entries
            .lock()
            .values()
            .map(|e| e.source().to_path_buf())
            .collect();
        self.catalog.prune_conversions(&keep)
    }

    /// Bytes held by the models of one backend.
    pub fn used_by(&self, backend: BackendKind) -> u64 {
        let entries = self.entries.lock();
        entries
            .values()
            .filter_map(|e| match e {
                Entry::Ready(r) if r.backend == backend => Some(r.queue.memory_bytes()),
                _ => None,
            })
            .sum()
    }

    /// Lets `model` hold `holding` bytes in all (weights and working memory) while one job
    /// runs, if the budget has them free now without evicting anything; the grant gives the
    /// bytes back when dropped. Checked and counted under the table's lock, so two grants or
    /// a grant and a load cannot both take the same free bytes. Err carries the bytes free.
    pub fn grow_working(&self, model: &Arc<Resident>, holding: u64) -> Result<WorkingGrant, u64> {
        let entries = self.entries.lock();
        let others: u64 = entries
            .iter()
            .filter(|(name, e)| e.backend() == model.backend && **name != model.name)
            .map(|(name, e)| e.holder(name).reserved)
            .sum();
        let mine = model.reserved();
        // Jobs that grow their working memory (translations) run on the CPU backend only,
        // whose budget is egpud's own.
        let budget = self.settings.budget;
        let spare = budget.saturating_sub(others.saturating_add(mine));
        if holding > mine && holding - mine > spare {
            return Err(spare);
        }
        let before = model.queue.memory_bytes();
        model.queue.set_memory_bytes(holding);
        Ok(WorkingGrant {
            queue: model.queue.clone(),
            before,
        })
    }

    /// A ready model by name, now: a model still loading is an error (see [`Residency::ready`]
    /// for requests, which wait for it).
    pub fn get(&self, name: &str) -> Result<Arc<Resident>, DaemonError> {
        match self.lookup(name)? {
            Lookup::Ready(r) => Ok(r),
            Lookup::Loading(_) => Err(DaemonError::StillLoading(name.to_owned())),
        }
    }

    /// A ready model by name, waiting for it while it loads (its first load, or a pinned model
    /// coming back after a lost device), as Ollama's clients expect; how long is bounded by
    /// the request (a client's deadline or disconnect drops this future). A load that fails
    /// gives the request that load's error.
    pub async fn ready(&self, name: &str) -> Result<Arc<Resident>, DaemonError> {
        loop {
            match self.lookup(name)? {
                Lookup::Ready(r) => return Ok(r),
                Lookup::Loading(mut phase) => {
                    tracing::info!(
                        model = name,
                        "a request waits for the model's load to finish"
                    );
                    let done = phase
                        .wait_for(|p| matches!(p, LoadPhase::Done(_)))
                        .await
                        .map(|p| match &*p {
                            LoadPhase::Done(result) => result.clone().map(|_| ()),
                            LoadPhase::Progress(_) => Ok(()),
                        });
                    match done {
                        // Loaded: look again (it may be ready, or already replaced).
                        Ok(Ok(())) => continue,
                        Ok(Err(err)) => return Err(err),
                        // The load task ended without a result (it panicked): looking again
                        // would find the same entry and spin.
                        Err(_) => {
                            return Err(DaemonError::Internal(format!(
                                "the load of {name} ended without a result"
                            )))
                        }
                    }
                }
            }
        }
    }

    fn lookup(&self, name: &str) -> Result<Lookup, DaemonError> {
        let entries = self.entries.lock();
        match entries.get(name) {
            Some(Entry::Ready(r)) => Ok(Lookup::Ready(r.clone())),
            Some(Entry::Loading(l)) => Ok(Lookup::Loading(l.phase.clone())),
            None => match self.waiting.lock().get(name) {
                Some(pin) => Err(DaemonError::PinWaiting {
                    name: name.to_owned(),
                    reason: pin.reason.clone(),
                }),
                // Pinned but in neither table: between a lost device or a restart and the
                // reload that brings it back. Not "unknown": the client should retry.
                None if self.is_pinned(name) => Err(DaemonError::PinWaiting {
                    name: name.to_owned(),
                    reason: "being loaded again after a restart or a lost device".into(),
                }),
                None => Err(DaemonError::UnknownModel {
                    name: name.to_owned(),
                    resident: list_names(&entries),
                }),
            },
        }
    }

    fn is_pinned(&self, name: &str) -> bool {
        self.state
            .as_ref()
            .is_some_and(|state| state.pinned().iter().any(|p| p.name == name))
    }

    /// The ready model loaded from `path`, under whatever name.
    pub fn find_by_source(&self, path: &Path) -> Option<Arc<Resident>> {
        self.entries.lock().values().find_map(|e| match e {
            Entry::Ready(r) if r.source == path => Some(r.clone()),
            _ => None,
        })
    }

    /// Where a source resolves, without loading it (see [`Catalog::classify`]); blocking only
    /// for a Hugging Face folder's conversion, which this does not start.
    pub fn classify(&self, source: &str) -> Result<Source, DaemonError> {
        self.catalog.classify(source, &HfEnv::from_process())
    }

    /// Changes how long a resident model stays once idle; pinned models stay pinned.
    pub fn set_keep_alive(&self, name: &str, keep_alive: KeepAlive) -> Result<(), DaemonError> {
        let model = self.get(name)?;
        *model.keep_alive.lock() = keep_alive;
        self.changed.notify_one();
        Ok(())
    }

    /// Every model, most recently used first.
    pub fn snapshot(&self) -> Vec<ModelInfo> {
        let entries = self.entries.lock();
        let mut models: Vec<ModelInfo> = entries
            .iter()
            .map(|(name, entry)| match entry {
                Entry::Ready(r) => r.info(),
                Entry::Loading(l) => ModelInfo {
                    name: name.clone(),
                    source: l.source.clone(),
                    architecture: l.summary.architecture.clone(),
                    kind: ModelKind::of_architecture(&l.summary.architecture),
                    quant_mix: Vec::new(),
                    bytes: 0,
                    bytes_estimated: l.estimate.total,
                    context_length: l.context,
                    slots: l.slots,
                    pinned: l.pinned,
                    keep_alive_expires: None,
                    active: 0,
                    queued: 0,
                    requests_served: 0,
                    last_used: SystemTime::now(),
                    backend: l.backend,
                    state: ModelState::Loading,
                    parameters: 0,
                    vocab_size: 0,
                    trained_context_length: l.summary.context_length,
                    detail: String::new(),
                    prefix_cache: PrefixStats::default(),
                },
            })
            .collect();
        let waiting = self.waiting.lock();
        for (name, pin) in waiting.iter() {
            if entries.contains_key(name) {
                continue; // its retry is loading it now
            }
            models.push(pin.info(name));
        }
        models.sort_by_key(|m| std::cmp::Reverse(m.last_used));
        models
    }

    /// Resolves, checks and plans a load; the loading itself runs in the background so that
    /// a client that goes away does not abandon it half-way (and others may be waiting on it).
    pub async fn start_load(
        self: &Arc<Self>,
        opts: LoadOptions,
    ) -> Result<LoadTicket, DaemonError> {
        let source = opts.source.clone();
        let started = self.plan_load(opts).await;
        if let Err(err) = &started {
            self.count_load(&source, Err(err));
        }
        started
    }

    fn count_load(&self, model: &str, result: Result<(), &DaemonError>) {
        let outcome = result.map_or_else(metrics::outcome, |()| "ok");
        self.metrics
            .loads
            .get_or_create(&LoadLabels {
                model: model.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    async fn plan_load(self: &Arc<Self>, opts: LoadOptions) -> Result<LoadTicket, DaemonError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(DaemonError::ShuttingDown);
        }
        let backend = self.backend_named(opts.backend.as_deref())?;
        let link: Option<Arc<WorkerLink>> = match (backend, &self.worker) {
            (BackendKind::Tinygrad, Some(worker)) => Some(worker.ready_link().await?),
            _ => None,
        };
        let budget = match (&link, &self.worker) {
            (Some(link), Some(worker)) => worker.budget(link)?,
            _ => self.settings.budget,
        };
        let (path, source_name) = match self
            .catalog
            .classify(&opts.source, &HfEnv::from_process())?
        {
            Source::Gguf { path, name } => (path, name),
            Source::HfFolder { folder, name } => {
                let catalog = self.catalog.clone();
                let hf_name = name.clone();
                let quantize = opts.quantize.clone().unwrap_or_default();
                let format = WeightFormat::parse(&quantize).ok_or_else(|| {
                    DaemonError::InvalidArgument(format!(
                        "unknown quantize {quantize:?}: use f32 or q8_0"
                    ))
                })?;
                // A bad name is refused before minutes of converting, not after.
                if let Some(n) = opts
                    .name
                    .as_deref()
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                {
                    validate_name(n)?;
                }
                let budget = self.settings.budget;
                let free = budget.saturating_sub(self.reserved_on(BackendKind::Cpu));
                let converting = folder.display().to_string();
                let path = tokio::task::spawn_blocking(move || {
                    let may_convert = |needed: u64| {
                        if needed > free {
                            return Err(DaemonError::OverBudget {
                                name: format!("converting {converting}"),
                                needed,
                                available: free,
                                budget,
                                holders:
                                    "the resident models (unload some, or raise --memory-budget)"
                                        .into(),
                            });
                        }
                        Ok(())
                    };
                    catalog.converted_gguf(&folder, &name, format, &may_convert)
                })
                .await
                .map_err(|e| DaemonError::Internal(e.to_string()))??;
                (path, Some(hf_name))
            }
        };
        let name = match opts.name.as_deref().map(str::trim) {
            Some(n) if !n.is_empty() => validate_name(n)?,
            _ => source_name
                .map_or_else(|| Ok(catalog::default_name(&path)), |n| validate_name(&n))?,
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
        let kind = ModelKind::of_architecture(&summary.architecture);
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
        // Learned absolute positions (GPT-2, BERT) end at the trained context.
        let learned_positions = matches!(summary.architecture.as_str(), "gpt2" | "bert");
        if let (true, Some(t)) = (learned_positions, trained) {
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
        // An encoder reads each text in one pass (its tokens all see each other), so its
        // passes, and the scratch budgeted for them, can be a whole context long.
        let whole_text = if kind == ModelKind::Embedder {
            context
        } else {
            0
        };
        let spec = ModelSpec {
            path: path.clone(),
            context,
            slots,
            batch_tokens: self.settings.batch_tokens.max(slots).max(whole_text),
        };
        if kind == ModelKind::Translator && backend != BackendKind::Cpu {
            return Err(DaemonError::UnsupportedBackend {
                name: format!("{backend} (Marian translation models run on the cpu backend only)"),
                available: "cpu".into(),
            });
        }
        // The tinygrad worker runs BERT itself; nomic-bert (RoPE, SwiGLU) only on the CPU engine.
        if kind == ModelKind::Embedder
            && backend != BackendKind::Cpu
            && summary.architecture != "bert"
        {
            return Err(DaemonError::UnsupportedBackend {
                name: format!(
                    "{backend} ({} embedding models run on the cpu backend only)",
                    summary.architecture
                ),
                available: "cpu".into(),
            });
        }
        let estimate = match kind {
            // `slots` sentences translated at once, as a typical batch.
            ModelKind::Translator => {
                backend::marian_estimate(&file, slots as u64).map_err(|e| {
                    DaemonError::BadModelFile {
                        path: path.clone(),
                        reason: e.to_string(),
                    }
                })?
            }
            ModelKind::Decoder | ModelKind::Embedder => backend::estimate(&file, &summary, &spec),
        };
        let keep_alive = opts.keep_alive.unwrap_or(self.settings.default_keep_alive);

        let (phase_tx, phase_rx) = watch::channel(LoadPhase::Progress(LoadProgress {
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
            if let Some(ticket) = existing_entry(&entries, &name, &path)? {
                return Ok(ticket);
            }
            let victims = self.evict_for(&mut entries, &name, backend, budget, estimate.total)?;
            entries.insert(
                name.clone(),
                Entry::Loading(Arc::new(Loading {
                    source: path.clone(),
                    estimate,
                    context,
                    slots,
                    pinned: opts.pin,
                    backend,
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
        let plan = LoadPlan {
            name: name.clone(),
            file,
            spec,
            summary,
            kind,
            estimate,
            pinned: opts.pin,
            keep_alive,
            backend,
            link,
            victims,
        };
        tokio::spawn(async move {
            let loaded = this.finish_load(plan, &phase_tx).await;
            this.count_load(&task_name, loaded.as_ref().map(|_| ()));
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
        existing_entry(&self.entries.lock(), name, path)
    }

    /// Stops and removes the idle models to evict so that `needed` more bytes fit on
    /// `backend` (see [`eviction::plan`]); an error, evicting nothing, when even evicting all
    /// of them is not enough.
    ///
    /// A candidate that became busy since the records were read refuses to stop (its queue
    /// re-checks under its own lock); the plan is then made again with it busy. Victims
    /// stopped before that stay removed even when the new plan fails: their runners have
    /// ended, and leaving them listed would advertise models that cannot serve.
    fn evict_for(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        name: &str,
        backend: BackendKind,
        budget: u64,
        needed: u64,
    ) -> Result<Vec<Arc<Resident>>, DaemonError> {
        let mut stopped = Vec::new();
        'plan: loop {
            let holders: Vec<Holder> = entries
                .iter()
                .filter(|(_, e)| e.backend() == backend)
                .map(|(n, e)| e.holder(n))
                .collect();
            let victims = eviction::plan(&holders, budget, needed).map_err(|short| {
                DaemonError::OverBudget {
                    name: name.to_owned(),
                    needed,
                    available: short.available,
                    budget,
                    holders: short.holders,
                }
            })?;
            for victim in victims {
                let Some(Entry::Ready(r)) = entries.get(&victim) else {
                    continue 'plan;
                };
                let r = r.clone();
                if r.queue.stop(StopReason::Unload, false).is_err() {
                    continue 'plan;
                }
                entries.remove(&victim);
                self.metrics
                    .evictions
                    .get_or_create(&metrics::model(&victim))
                    .inc();
                stopped.push(r);
            }
            return Ok(stopped);
        }
    }

    async fn finish_load(
        self: &Arc<Self>,
        plan: LoadPlan,
        phase: &watch::Sender<LoadPhase>,
    ) -> Result<Arc<Resident>, DaemonError> {
        let LoadPlan {
            name,
            file,
            spec,
            summary,
            kind,
            estimate,
            pinned,
            keep_alive,
            backend,
            link,
            victims,
        } = plan;
        let progress = |stage: &str, done: u64, total: u64, message: String| {
            phase.send_replace(LoadPhase::Progress(LoadProgress {
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
            join_blocking(victim.clone()).await;
        }

        let header = file.clone();
        let load_phase = phase.clone();
        let load_spec = spec.clone();
        let on_cpu = link.is_none();
        let loaded = tokio::task::spawn_blocking(move || {
            let mut report = |p: Progress| {
                load_phase.send_replace(LoadPhase::Progress(LoadProgress {
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
            let model = match (on_cpu, kind) {
                (false, _) => None,
                (true, ModelKind::Translator) => Some(LoadedModel::Translator(Box::new(
                    MarianCpu::load(file, &load_spec, &mut report)?,
                ))),
                (true, ModelKind::Decoder | ModelKind::Embedder) => Some(LoadedModel::Decoder(
                    DecoderModel::Cpu(Box::new(CpuModel::load(file, &load_spec, &mut report)?)),
                )),
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
                LoadedModel::Decoder(DecoderModel::Tinygrad(
                    TinygradModel::load(link, &spec, &header).await?,
                ))
            }
            (None, None) => unreachable!("a model is loaded on the cpu or through a worker"),
        };
        let worker_link = match &model {
            LoadedModel::Decoder(DecoderModel::Tinygrad(m)) => Some(m.link().clone()),
            _ => None,
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

        let translation = match kind {
            ModelKind::Translator => Some(
                TranslationCosts::of(&header, spec.slots as u64).map_err(|e| {
                    DaemonError::BadModelFile {
                        path: spec.path.clone(),
                        reason: e.to_string(),
                    }
                })?,
            ),
            ModelKind::Decoder | ModelKind::Embedder => None,
        };
        let tokenizer = Arc::new(tokenizer);
        let queue = Arc::new(ModelQueue::new(
            name.clone(),
            self.settings.max_queue,
            self.changed.clone(),
            model.memory_bytes(),
            self.metrics.clone(),
        ));
        let pooling = Pooling::from_metadata(header.metadata(), &summary.architecture);
        let resident = Arc::new(Resident {
            name: name.clone(),
            source: spec.path.clone(),
            summary,
            kind,
            quant_mix,
            parameters,
            estimate,
            context: spec.context,
            slots: spec.slots,
            pinned,
            keep_alive: Mutex::new(keep_alive),
            backend,
            worker_generation: worker_link.as_ref().map(|l| l.generation),
            tokenizer: tokenizer.clone(),
            grammars: Arc::new(Grammars::new(tokenizer.clone())),
            template,
            queue: queue.clone(),
            translation,
            file: on_cpu.then(|| header.clone()),
            pooling,
            thread: Mutex::new(None),
        });
        let turns = self.turns.clone();
        let settings = RunnerSettings {
            batch_tokens: spec.batch_tokens,
        };
        let thread = std::thread::Builder::new()
            .name(format!("egpu-{name}"))
            .spawn(move || scheduler::run_model(model, tokenizer, queue, turns, settings))
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
            state.remember(pins::record(&resident));
        }
        entries.insert(name, Entry::Ready(resident.clone()));
        Ok(resident)
    }

    /// Unloads a model; with `force`, its running and queued requests end with ABORTED.
    /// Returns the bytes freed and the number of requests aborted.
    pub async fn unload(&self, name: &str, force: bool) -> Result<(u64, usize), DaemonError> {
        // An Unload sent while the model loads waits for the load, then unloads it, as
        // someone who ran `egpuctl load` and `unload` in a hurry expects.
        if matches!(self.lookup(name), Ok(Lookup::Loading(_))) {
            let _ = self.ready(name).await;
        }
        let (resident, aborted) = {
            let mut entries = self.entries.lock();
            let resident = match entries.get(name) {
                Some(Entry::Ready(r)) => r.clone(),
                // Loading again already (another Load came in after the wait).
                Some(Entry::Loading(_)) => return Err(DaemonError::StillLoading(name.to_owned())),
                None => {
                    // Unloading a waiting pin is how a user gives it up: no more retries, and
                    // gone from the state file.
                    if self.waiting.lock().remove(name).is_some() {
                        if let Some(state) = &self.state {
                            state.forget(name);
                        }
                        tracing::info!(model = %name, "waiting pin unloaded; no more retries");
                        return Ok((0, 0));
                    }
                    return Err(DaemonError::UnknownModel {
                        name: name.to_owned(),
                        resident: list_names(&entries),
                    });
                }
            };
            let aborted = resident.queue.stop(StopReason::Unload, force)?;
            entries.remove(name);
            (resident, aborted)
        };
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

    /// Unloads models as their keep-alive expires, until egpud shuts down.
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

    /// Watches the files CPU models compute from, once a second. A file written in place
    /// while loaded (`cp new.gguf loaded.gguf` truncates it first) would have crashed egpud
    /// with SIGBUS; the engine now reads zeros instead (see `egpu_engine::gguf`), and here the
    /// model is stopped within a second, its requests ended with ABORTED saying why, and a
    /// pinned one waits to be loaded again from the new file.
    pub async fn watch_files(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(FILE_WATCH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if self.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            let changed: Vec<(Arc<Resident>, String)> = {
                let entries = self.entries.lock();
                entries
                    .values()
                    .filter_map(|e| match e {
                        Entry::Ready(r) => {
                            let why = r.file.as_ref()?.changed_on_disk()?;
                            Some((r.clone(), why))
                        }
                        Entry::Loading(_) => None,
                    })
                    .collect()
            };
            for (resident, why) in changed {
                self.file_changed(resident, why).await;
            }
        }
    }

    async fn file_changed(self: &Arc<Self>, resident: Arc<Resident>, why: String) {
        {
            let mut entries = self.entries.lock();
            match entries.get(&resident.name) {
                Some(Entry::Ready(r)) if Arc::ptr_eq(r, &resident) => {}
                _ => return,
            }
            let _ = resident.queue.stop(StopReason::FileChanged, true);
            entries.remove(&resident.name);
        }
        tracing::error!(model = %resident.name, cause = %why, "model file changed while loaded; unloading it");
        join_blocking(resident.clone()).await;
        self.changed.notify_one();
        if resident.pinned {
            let err = DaemonError::BadModelFile {
                path: resident.source.clone(),
                reason: format!("{why}; loading it again"),
            };
            pins::wait_and_retry(self, pins::record(&resident), resident.backend, &err);
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

    /// Loads the pinned models of `backend` again (at start, or when the worker is back).
    pub async fn reload_pinned(self: Arc<Self>, backend: BackendKind) {
        if let Some(state) = self.state.clone() {
            pins::reload_pinned(self, state, backend).await;
        }
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
                WorkerPhase::Ready(_) => self.clone().reload_pinned(BackendKind::Tinygrad).await,
                WorkerPhase::Stopped => return,
                WorkerPhase::Starting => {}
            }
            if phases.changed().await.is_err() {
                return;
            }
        }
    }

    /// The `.gguf` files in the models folder, with the names each is resident as. Blocking.
    pub fn list_files(&self) -> Vec<ModelFile> {
        self.catalog
            .files()
            .into_iter()
            .map(|file| {
                let resident_as = {
                    let entries = self.entries.lock();
                    entries
                        .iter()
                        .filter(|(_, e)| e.source() == file.path)
                        .map(|(n, _)| n.clone())
                        .collect()
                };
                ModelFile { file, resident_as }
            })
            .collect()
    }
}

/// Everything `finish_load` needs, decided by `start_load`.
struct LoadPlan {
    name: String,
    file: Arc<GgufFile>,
    spec: ModelSpec,
    summary: ModelSummary,
    kind: ModelKind,
    estimate: Estimate,
    pinned: bool,
    keep_alive: KeepAlive,
    backend: BackendKind,
    link: Option<Arc<WorkerLink>>,
    victims: Vec<Arc<Resident>>,
}

/// What a load of `path` as `name` joins, if anything: the resident model, a load under way,
/// or an error when the name serves another file.
fn existing_entry(
    entries: &BTreeMap<String, Entry>,
    name: &str,
    path: &Path,
) -> Result<Option<LoadTicket>, DaemonError> {
    match entries.get(name) {
        None => Ok(None),
        Some(Entry::Ready(r)) if r.source == path => Ok(Some(LoadTicket::Resident(r.clone()))),
        Some(Entry::Loading(l)) if l.source == path => Ok(Some(LoadTicket::Pending {
            name: name.to_owned(),
            phase: l.phase.clone(),
        })),
        Some(other) => Err(DaemonError::NameTaken {
            name: name.to_owned(),
            source_path: other.source().to_owned(),
        }),
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

fn quant_mix(file: &GgufFile) -> Vec<QuantShare> {
    let mut mix: Vec<QuantShare> = bytes_by_type(file)
        .into_iter()
        .map(|(ty, (tensors, bytes))| QuantShare {
            ggml_type: ty.to_string(),
            tensors,
            bytes,
        })
        .collect();
    mix.sort_by_key(|q| std::cmp::Reverse(q.bytes));
    mix
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

/// The wall-clock time of a monotonic instant (for showing expiry times).
fn instant_to_system(at: Instant) -> SystemTime {
    let now = Instant::now();
    if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now()
            .checked_sub(now - at)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

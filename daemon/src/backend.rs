//! The backends a model runs on, behind one [`LoadedModel`] the scheduler drives one batched
//! step at a time:
//!
//! - cpu: the native engine running a model from its memory-mapped GGUF file.
//! - tinygrad: the model lives in the tinygrad worker process (see [`crate::worker`]); a step
//!   is one call to it, and logits come back for egpud to sample.
//!
//! A loaded model owns one KV cache per slot, allocated at load time so that the memory it
//! holds is known (and counted against the budget) before it serves anything.

use std::path::PathBuf;
use std::sync::Arc;

use egpu_engine::gguf::GgufFile;
use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{
    BatchItem, KvCache, Logits, LogitsWanted, Model, ModelError, Scratch,
};
use egpu_engine::models::info::{estimate_from_summary, scratch_bytes_per_token, ModelSummary};
use egpu_engine::models::marian::{
    batch_memory, MarianConfig, MarianError, MarianModel, PoolAccess, SearchSettings,
};
use egpu_proto::worker as wp;

use crate::error::DaemonError;
use crate::scheduler::Device;
use crate::worker::WorkerLink;

/// What to load and how big to make it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub path: PathBuf,
    /// Tokens per slot.
    pub context: usize,
    pub slots: usize,
    /// Most tokens one forward pass carries (bounds the scratch memory).
    pub batch_tokens: usize,
}

/// Memory a model will hold, estimated from its header before anything is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub weights: u64,
    /// All slots' KV caches.
    pub kv_cache: u64,
    pub scratch: u64,
    pub total: u64,
}

/// Weights (used in place) + one f16 KV cache of `context` tokens per slot + activations for a
/// pass of `batch_tokens` tokens.
pub fn estimate(file: &GgufFile, summary: &ModelSummary, spec: &ModelSpec) -> Estimate {
    let context = spec.context as u64;
    let one_slot = estimate_from_summary(summary, file.tensor_bytes(), context);
    let kv_cache = one_slot.kv_cache.saturating_mul(spec.slots as u64);
    let scratch =
        scratch_bytes_per_token(summary, context).saturating_mul(spec.batch_tokens as u64);
    Estimate {
        weights: one_slot.weights,
        kv_cache,
        scratch,
        total: one_slot
            .weights
            .saturating_add(kv_cache)
            .saturating_add(scratch),
    }
}

/// Progress of a load, reported as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub stage: &'static str,
    pub done: u64,
    pub total: u64,
}

/// One slot's part of a batched step.
#[derive(Debug, Clone, Copy)]
pub struct SlotStep<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
    pub logits: LogitsWanted,
}

/// A model resident on the CPU backend.
#[derive(Debug)]
pub struct CpuModel {
    model: Model,
    caches: Vec<KvCache>,
    scratch: Scratch,
}

impl CpuModel {
    /// Finds every tensor, reads the weights once so that they are resident (a model's first
    /// request should not pay for page faults), and allocates every slot's KV cache.
    pub fn load(
        file: Arc<GgufFile>,
        spec: &ModelSpec,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<CpuModel, DaemonError> {
        let bad_file = |e: ModelError| DaemonError::BadModelFile {
            path: spec.path.clone(),
            reason: e.to_string(),
        };
        let model = Model::load(file).map_err(bad_file)?;
        touch_weights(model.file(), progress);
        let total = spec.slots as u64;
        let mut caches = Vec::with_capacity(spec.slots);
        for slot in 0..spec.slots {
            progress(Progress {
                stage: "allocating cache",
                done: slot as u64,
                total,
            });
            caches.push(model.new_kv_cache(spec.context).map_err(bad_file)?);
        }
        progress(Progress {
            stage: "allocating cache",
            done: total,
            total,
        });
        Ok(CpuModel {
            scratch: model.new_scratch(),
            model,
            caches,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Bytes held now: the mapped weights, the caches, and the scratch buffers.
    pub fn memory_bytes(&self) -> u64 {
        let caches: usize = self.caches.iter().map(KvCache::bytes).sum();
        self.model.file().tensor_bytes() + caches as u64 + self.scratch.bytes() as u64
    }

    pub fn n_slots(&self) -> usize {
        self.caches.len()
    }

    pub fn slot_capacity(&self, slot: usize) -> usize {
        self.caches[slot].capacity()
    }

    /// Empties a slot for the next sequence.
    pub fn clear_slot(&mut self, slot: usize) {
        self.caches[slot].clear();
    }

    /// One forward pass over several slots. `steps` must name distinct slots in increasing
    /// order; the logits come back in the same order.
    pub fn forward(
        &mut self,
        pool: &ThreadPool,
        steps: &[SlotStep<'_>],
    ) -> Result<Logits, ModelError> {
        let mut wanted = steps.iter().peekable();
        let mut items = Vec::with_capacity(steps.len());
        for (slot, cache) in self.caches.iter_mut().enumerate() {
            if let Some(step) = wanted.next_if(|s| s.slot == slot) {
                items.push(BatchItem::append(cache, step.tokens, step.logits));
            }
        }
        if items.len() != steps.len() {
            return Err(ModelError::InvalidBatch(
                "slot steps must be distinct and in increasing order".into(),
            ));
        }
        self.model.forward(pool, &mut self.scratch, &mut items)
    }
}

/// A Marian (opus-mt) translation model on the CPU backend. It holds no per-slot caches: a
/// translation's decoder caches live only while it runs.
#[derive(Debug)]
pub struct MarianCpu {
    model: MarianModel,
}

impl MarianCpu {
    pub fn load(
        file: Arc<GgufFile>,
        spec: &ModelSpec,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<MarianCpu, DaemonError> {
        let model = MarianModel::load(file).map_err(|e| DaemonError::BadModelFile {
            path: spec.path.clone(),
            reason: e.to_string(),
        })?;
        touch_weights(model.file(), progress);
        Ok(MarianCpu { model })
    }

    pub fn model(&self) -> &MarianModel {
        &self.model
    }
}

impl PoolAccess for Device {
    fn with_pool(&self, f: &mut dyn FnMut(&ThreadPool)) {
        let pool = self.pool.lock();
        f(&pool)
    }
}

/// What a translation model is estimated to hold: its weights plus a batch of `batch`
/// sentences' caches and scratch ([`egpu_engine::models::marian::batch_memory`]).
pub fn marian_estimate(file: &GgufFile, batch: u64) -> Result<Estimate, MarianError> {
    let config = MarianConfig::from_metadata(file.metadata())?;
    let settings = SearchSettings::from_metadata(file.metadata(), &config);
    let (kv_cache, scratch) = batch_memory(&config, &settings, batch);
    let weights = file.tensor_bytes();
    Ok(Estimate {
        weights,
        kv_cache,
        scratch,
        total: weights.saturating_add(kv_cache).saturating_add(scratch),
    })
}

/// A model on either backend.
#[derive(Debug)]
pub enum LoadedModel {
    Cpu(Box<CpuModel>),
    Tinygrad(TinygradModel),
    /// A translation model; the scheduler runs it with its own loop (see
    /// `scheduler::translate_until_stopped`), so the slot methods below are never used on it.
    Marian(Box<MarianCpu>),
}

impl LoadedModel {
    pub fn memory_bytes(&self) -> u64 {
        match self {
            LoadedModel::Cpu(m) => m.memory_bytes(),
            LoadedModel::Tinygrad(m) => m.bytes,
            LoadedModel::Marian(m) => m.model.weight_bytes(),
        }
    }

    pub fn n_slots(&self) -> usize {
        match self {
            LoadedModel::Cpu(m) => m.n_slots(),
            LoadedModel::Tinygrad(m) => m.lengths.len(),
            LoadedModel::Marian(_) => 0,
        }
    }

    pub fn n_vocab(&self) -> usize {
        match self {
            LoadedModel::Cpu(m) => m.model().config().n_vocab,
            LoadedModel::Tinygrad(m) => m.n_vocab,
            LoadedModel::Marian(m) => m.model.config().n_vocab,
        }
    }

    pub fn slot_capacity(&self, slot: usize) -> usize {
        match self {
            LoadedModel::Cpu(m) => m.slot_capacity(slot),
            LoadedModel::Tinygrad(m) => m.context,
            LoadedModel::Marian(_) => 0,
        }
    }

    pub fn clear_slot(&mut self, slot: usize) {
        match self {
            LoadedModel::Cpu(m) => m.clear_slot(slot),
            LoadedModel::Tinygrad(m) => m.lengths[slot] = 0,
            LoadedModel::Marian(_) => {}
        }
    }

    /// One batched forward pass. CPU models take turns on the device's thread pool; tinygrad
    /// models take turns on their worker.
    pub fn forward(
        &mut self,
        device: &Device,
        steps: &[SlotStep<'_>],
    ) -> Result<Logits, DaemonError> {
        match self {
            LoadedModel::Cpu(m) => {
                let pool = device.pool.lock();
                m.forward(&pool, steps)
                    .map_err(|e| DaemonError::Internal(e.to_string()))
            }
            LoadedModel::Tinygrad(m) => m.forward(steps),
            LoadedModel::Marian(_) => Err(DaemonError::Internal(
                "a translation model has no decoder-only forward pass".into(),
            )),
        }
    }
}

/// A model resident in the tinygrad worker. egpud keeps each slot's length (the worker is
/// told where every chunk starts) so that both backends share the scheduler's contract:
/// a step appends to its slot's cache.
#[derive(Debug)]
pub struct TinygradModel {
    link: Arc<WorkerLink>,
    id: u64,
    n_vocab: usize,
    context: usize,
    lengths: Vec<usize>,
    bytes: u64,
}

impl TinygradModel {
    /// Uploads the model to the worker's device (its weights stay quantized there) and
    /// allocates every slot's KV cache on it.
    pub async fn load(
        link: Arc<WorkerLink>,
        spec: &ModelSpec,
    ) -> Result<TinygradModel, DaemonError> {
        let reply = link.load(&spec.path, spec.context, spec.slots).await?;
        Ok(TinygradModel {
            link,
            id: reply.model_id,
            n_vocab: reply.n_vocab as usize,
            context: spec.context,
            lengths: vec![0; spec.slots],
            bytes: reply.bytes,
        })
    }

    /// The worker that holds the model.
    pub fn link(&self) -> &Arc<WorkerLink> {
        &self.link
    }

    /// The worker generation the model lives in.
    pub fn generation(&self) -> u64 {
        self.link.generation
    }

    fn forward(&mut self, steps: &[SlotStep<'_>]) -> Result<Logits, DaemonError> {
        let mut items = Vec::with_capacity(steps.len());
        for step in steps {
            let start = self.lengths[step.slot];
            if start + step.tokens.len() > self.context {
                return Err(DaemonError::InvalidArgument(format!(
                    "slot {} would hold {} tokens; its context is {}",
                    step.slot,
                    start + step.tokens.len(),
                    self.context
                )));
            }
            items.push(wp::StepItem {
                slot: step.slot as u32,
                start_pos: start as u32,
                tokens: step.tokens.to_vec(),
                logits: match step.logits {
                    LogitsWanted::None => wp::LogitsWanted::None,
                    LogitsWanted::Last => wp::LogitsWanted::Last,
                    LogitsWanted::All => wp::LogitsWanted::All,
                } as i32,
            });
        }
        let reply = {
            let _turn = self.link.turns.lock();
            self.link.step_blocking(wp::StepRequest {
                model_id: self.id,
                items,
            })?
        };
        for step in steps {
            self.lengths[step.slot] += step.tokens.len();
        }
        let bad = |why: String| DaemonError::Internal(format!("tinygrad worker reply: {why}"));
        if reply.items.len() != steps.len() || reply.n_vocab as usize != self.n_vocab {
            return Err(bad(format!(
                "{} items of {} logits for {} asked of {}",
                reply.items.len(),
                reply.n_vocab,
                steps.len(),
                self.n_vocab
            )));
        }
        let mut rows = Vec::with_capacity(steps.len());
        let mut values = Vec::new();
        for (item, step) in reply.items.iter().zip(steps) {
            let expected = match step.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => step.tokens.len(),
            };
            if item.rows as usize != expected || item.values.len() != expected * self.n_vocab * 4 {
                return Err(bad(format!(
                    "{} rows ({} bytes) where {expected} rows were asked",
                    item.rows,
                    item.values.len()
                )));
            }
            values.extend(
                item.values
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            rows.push(expected);
        }
        Logits::from_rows(self.n_vocab, values, &rows)
            .ok_or_else(|| bad("row count mismatch".into()))
    }
}

impl Drop for TinygradModel {
    /// The device memory goes back when the model does (an unload, an eviction, a failed load).
    fn drop(&mut self) {
        self.link.unload(self.id);
    }
}

/// Reads one byte of every page of tensor data, so the weights are in memory when the first
/// request comes and a load that reports "ready" has really paid for reading the file.
fn touch_weights(file: &GgufFile, progress: &mut dyn FnMut(Progress)) {
    const PAGE: usize = 4096;
    const REPORT_EVERY: u64 = 16 << 20;
    let total = file.tensor_bytes();
    let mut done = 0u64;
    let mut last_report = 0u64;
    let mut checksum = 0u8;
    progress(Progress {
        stage: "reading weights",
        done,
        total,
    });
    for info in file.tensors() {
        let data = file.tensor_data(info);
        for page in data.chunks(PAGE) {
            checksum = checksum.wrapping_add(page[0]);
        }
        done += data.len() as u64;
        if done - last_report >= REPORT_EVERY {
            last_report = done;
            progress(Progress {
                stage: "reading weights",
                done,
                total,
            });
        }
    }
    std::hint::black_box(checksum);
    progress(Progress {
        stage: "reading weights",
        done: total,
        total,
    });
}

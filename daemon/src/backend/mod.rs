//! The backends a model runs on, behind one [`DecoderModel`] the decoder runner drives one
//! batched step at a time (and [`MarianCpu`] for the translation runner):
//!
//! - [`cpu`]: the native engine running a model from its memory-mapped GGUF file, on the
//!   thread pool that [`ComputeTurns`] lends to one model at a time.
//! - [`tinygrad`]: the model lives in the tinygrad worker process; a step is one call to it,
//!   and logits come back for egpud to sample.
//!
//! A loaded model owns one KV cache per slot, allocated at load time so that the memory it
//! holds is known (and counted against the budget) before it serves anything.

pub mod compute;
pub mod cpu;
pub mod device;
pub mod tinygrad;

use std::path::PathBuf;

use egpu_engine::gguf::GgufFile;
use egpu_engine::models::decoder::{Logits, LogitsWanted};
use egpu_engine::models::info::{estimate_from_summary, scratch_bytes_per_token, ModelSummary};
use egpu_engine::models::marian::{batch_memory, MarianConfig, MarianError, SearchSettings};

pub use compute::ComputeTurns;
pub use cpu::{CpuModel, MarianCpu};
pub use tinygrad::TinygradModel;

use crate::error::DaemonError;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendKind {
    /// The native engine on this machine's CPU.
    Cpu,
    /// The tinygrad worker process and the device it holds.
    Tinygrad,
}

impl BackendKind {
    pub const ALL: [BackendKind; 2] = [BackendKind::Cpu, BackendKind::Tinygrad];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Tinygrad => "tinygrad",
        }
    }

    /// From its name as flags, requests and the state file spell it.
    pub fn parse(name: &str) -> Option<BackendKind> {
        BackendKind::ALL.into_iter().find(|b| b.as_str() == name)
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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

/// What a translation's working memory costs on one Marian model: the caches and scratch
/// [`batch_memory`] counts, per sentence at a request's beams and length, against what the
/// model reserved at load (its `slots` sentences at its own generation settings).
#[derive(Debug, Clone)]
pub struct TranslationCosts {
    config: MarianConfig,
    defaults: SearchSettings,
    /// Working bytes the load estimate reserved beside the weights.
    pub reserved: u64,
}

impl TranslationCosts {
    pub fn of(file: &GgufFile, batch: u64) -> Result<TranslationCosts, MarianError> {
        let config = MarianConfig::from_metadata(file.metadata())?;
        let defaults = SearchSettings::from_metadata(file.metadata(), &config);
        let (kv_cache, scratch) = batch_memory(&config, &defaults, batch);
        Ok(TranslationCosts {
            config,
            defaults,
            reserved: kv_cache.saturating_add(scratch),
        })
    }

    /// The beams and decoder length a request gets (0 = the model's own), as the search
    /// will clamp them.
    pub fn resolve(&self, num_beams: usize, max_tokens: usize) -> (usize, usize) {
        let beams = if num_beams > 0 {
            num_beams
        } else {
            self.defaults.num_beams
        };
        // max_length counts the decoder start token.
        let length = if max_tokens > 0 {
            max_tokens.saturating_add(1)
        } else {
            self.defaults.max_length
        };
        (beams.max(1), length.clamp(2, self.config.max_positions))
    }

    /// Working bytes of one sentence translated with `beams` beams up to `length` tokens.
    pub fn per_sentence(&self, beams: usize, length: usize) -> u64 {
        let settings = SearchSettings {
            num_beams: beams,
            max_length: length,
            ..self.defaults.clone()
        };
        let (kv_cache, scratch) = batch_memory(&self.config, &settings, 1);
        kv_cache.saturating_add(scratch)
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

/// A resident model, as the scheduler runs it.
#[derive(Debug)]
pub enum LoadedModel {
    Decoder(DecoderModel),
    Translator(Box<MarianCpu>),
}

impl LoadedModel {
    pub fn memory_bytes(&self) -> u64 {
        match self {
            LoadedModel::Decoder(m) => m.memory_bytes(),
            LoadedModel::Translator(m) => m.model().weight_bytes(),
        }
    }

    pub fn n_vocab(&self) -> usize {
        match self {
            LoadedModel::Decoder(m) => m.n_vocab(),
            LoadedModel::Translator(m) => m.model().config().n_vocab,
        }
    }
}

/// A decoder-only model on either backend: slots with KV caches, one batched step at a time.
#[derive(Debug)]
pub enum DecoderModel {
    Cpu(Box<CpuModel>),
    Tinygrad(TinygradModel),
}

impl DecoderModel {
    pub fn memory_bytes(&self) -> u64 {
        match self {
            DecoderModel::Cpu(m) => m.memory_bytes(),
            DecoderModel::Tinygrad(m) => m.memory_bytes(),
        }
    }

    pub fn n_slots(&self) -> usize {
        match self {
            DecoderModel::Cpu(m) => m.n_slots(),
            DecoderModel::Tinygrad(m) => m.n_slots(),
        }
    }

    pub fn n_vocab(&self) -> usize {
        match self {
            DecoderModel::Cpu(m) => m.model().config().n_vocab,
            DecoderModel::Tinygrad(m) => m.n_vocab(),
        }
    }

    pub fn slot_capacity(&self, slot: usize) -> usize {
        match self {
            DecoderModel::Cpu(m) => m.slot_capacity(slot),
            DecoderModel::Tinygrad(m) => m.slot_capacity(),
        }
    }

    /// Empties a slot for the next sequence.
    pub fn clear_slot(&mut self, slot: usize) {
        self.keep_prefix(slot, 0);
    }

    /// Keeps the first `len` positions of a slot's cache and forgets the rest: the next step
    /// for the slot appends at `len` (a reused prompt prefix).
    pub fn keep_prefix(&mut self, slot: usize, len: usize) {
        match self {
            DecoderModel::Cpu(m) => m.keep_prefix(slot, len),
            DecoderModel::Tinygrad(m) => m.keep_prefix(slot, len),
        }
    }

    /// Makes slot `to` hold the first `len` positions of slot `from`'s cache: what
    /// prefilling them there would write (a prompt prefix the slots share). The backends check
    /// `len` against what `from` holds.
    pub fn copy_prefix(&mut self, from: usize, to: usize, len: usize) -> Result<(), DaemonError> {
        let n = self.n_slots();
        if from == to || from >= n || to >= n {
            return Err(DaemonError::Internal(format!(
                "no prefix copy from slot {from} to slot {to} of {n}"
            )));
        }
        match self {
            DecoderModel::Cpu(m) => m.copy_prefix(from, to, len),
            DecoderModel::Tinygrad(m) => m.copy_prefix(from, to, len),
        }
    }

    /// The final hidden states of `tokens` fed to slot `slot` at `start_pos`: what embeddings
    /// are pooled from, on either backend.
    pub fn hidden(
        &mut self,
        turns: &ComputeTurns,
        slot: usize,
        tokens: &[u32],
        start_pos: usize,
        wanted: LogitsWanted,
    ) -> Result<Logits, DaemonError> {
        match self {
            DecoderModel::Cpu(m) => turns
                .with_pool(|pool| m.hidden(pool, slot, tokens, start_pos, wanted))
                .map_err(|e| DaemonError::Internal(e.to_string())),
            DecoderModel::Tinygrad(m) => m.hidden(slot, tokens, start_pos, wanted),
        }
    }

    /// The final hidden states of several whole texts, item by item (the rows `wanted` asks
    /// for of each): one pass on the CPU backend; one pass per text through the held slot on
    /// tinygrad, whose worker has no caches beyond its slots.
    pub fn hidden_texts(
        &mut self,
        turns: &ComputeTurns,
        slot: usize,
        texts: &[&[u32]],
        wanted: LogitsWanted,
    ) -> Result<Logits, DaemonError> {
        match self {
            DecoderModel::Cpu(m) => turns
                .with_pool(|pool| m.hidden_texts(pool, slot, texts, wanted))
                .map_err(|e| DaemonError::Internal(e.to_string())),
            DecoderModel::Tinygrad(m) => {
                let mut values = Vec::new();
                let mut rows = Vec::with_capacity(texts.len());
                let mut width = 0;
                for text in texts {
                    let one = m.hidden(slot, text, 0, wanted)?;
                    width = one.n_vocab();
                    rows.push(one.n_rows(0));
                    values.extend_from_slice(one.item(0));
                }
                Logits::from_rows(width, values, &rows).ok_or_else(|| {
                    DaemonError::Internal("tinygrad worker: hidden rows do not add up".into())
                })
            }
        }
    }

    /// One batched forward pass. CPU models take their turn on the thread pool; tinygrad
    /// models take turns on their worker.
    pub fn forward(
        &mut self,
        turns: &ComputeTurns,
        steps: &[SlotStep<'_>],
    ) -> Result<Logits, DaemonError> {
        match self {
            DecoderModel::Cpu(m) => turns
                .with_pool(|pool| m.forward(pool, steps))
                .map_err(|e| DaemonError::Internal(e.to_string())),
            DecoderModel::Tinygrad(m) => m.forward(steps),
        }
    }
}

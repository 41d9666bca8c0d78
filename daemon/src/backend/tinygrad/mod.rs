//! The tinygrad backend: models resident in the tinygrad worker process, which holds the
//! device (the eGPU on the Mac).
//!
//! - [`worker`]: the supervised worker process and the link calls go through.
//! - [`wire`]: its protocol, mapped to the backend's own types.

pub mod wire;
pub mod worker;

use std::sync::Arc;

use egpu_engine::gguf::GgufFile;
use egpu_engine::models::decoder::{Logits, LogitsWanted, ModelConfig};

pub use worker::{Worker, WorkerLink, WorkerPhase, WorkerSettings};

use super::{ModelSpec, SlotStep};
use crate::error::DaemonError;

/// A model resident in the tinygrad worker. egpud keeps each slot's length (the worker is
/// told where every chunk starts) so that both backends share the scheduler's contract:
/// a step appends to its slot's cache.
#[derive(Debug)]
pub struct TinygradModel {
    link: Arc<WorkerLink>,
    id: u64,
    n_vocab: usize,
    /// Width of a hidden state (an embedding row).
    n_embd: usize,
    context: usize,
    lengths: Vec<usize>,
    /// Device bytes the model holds: at load, its weights and caches; after each step, what
    /// the worker reports, which adds the activations of the graphs it has captured.
    bytes: u64,
}

impl TinygradModel {
    /// Uploads the model to the worker's device (its weights stay quantized there) and
    /// allocates every slot's KV cache on it. The worker gets the engine's configuration of
    /// the file, so it runs the model exactly as the CPU backend would.
    pub async fn load(
        link: Arc<WorkerLink>,
        spec: &ModelSpec,
        file: &GgufFile,
    ) -> Result<TinygradModel, DaemonError> {
        let bad = |reason: String| DaemonError::BadModelFile {
            path: spec.path.clone(),
            reason,
        };
        let config = ModelConfig::from_gguf(file).map_err(|e| bad(e.to_string()))?;
        let config_json = serde_json::to_string(&config).map_err(|e| bad(e.to_string()))?;
        let loaded = link
            .load(&spec.path, spec.context, spec.slots, config_json)
            .await?;
        Ok(TinygradModel {
            link,
            id: loaded.model_id,
            n_vocab: loaded.n_vocab,
            n_embd: config.n_embd,
            context: spec.context,
            lengths: vec![0; spec.slots],
            bytes: loaded.bytes,
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

    pub fn memory_bytes(&self) -> u64 {
        self.bytes
    }

    pub fn n_slots(&self) -> usize {
        self.lengths.len()
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    pub fn slot_capacity(&self) -> usize {
        self.context
    }

    /// Keeps the first `len` positions of a slot's cache: the worker is told where each
    /// chunk starts. Positions past it keep stale entries until overwritten; a batched pass
    /// reads them, but their attention weights and weight × value products are masked to 0.
    pub fn keep_prefix(&mut self, slot: usize, len: usize) {
        self.lengths[slot] = self.lengths[slot].min(len);
    }

    /// Makes slot `to` hold the first `len` positions of slot `from` (the worker copies the
    /// slot's cache on the device, one captured graph for every pair of slots, and refuses a
    /// `len` past what `from` holds). `from` and `to` are distinct slots
    /// ([`super::DecoderModel::copy_prefix`] checks).
    pub fn copy_prefix(&mut self, from: usize, to: usize, len: usize) -> Result<(), DaemonError> {
        let bytes = {
            let _turn = self.link.turns.lock();
            self.link.copy_prefix_blocking(self.id, from, to, len)?
        };
        self.lengths[to] = len;
        if bytes > 0 {
            self.bytes = bytes;
        }
        Ok(())
    }

    pub fn forward(&mut self, steps: &[SlotStep<'_>]) -> Result<Logits, DaemonError> {
        self.step(steps, false)
    }

    /// The final hidden states of `tokens` fed to `slot` at `start_pos` (its cache cut there
    /// first), the rows `wanted` asks for: what the CPU backend's `hidden` gives.
    pub fn hidden(
        &mut self,
        slot: usize,
        tokens: &[u32],
        start_pos: usize,
        wanted: LogitsWanted,
    ) -> Result<Logits, DaemonError> {
        self.keep_prefix(slot, start_pos);
        if self.lengths[slot] != start_pos {
            return Err(DaemonError::Internal(format!(
                "slot {slot} holds {} positions, the chunk starts at {start_pos}",
                self.lengths[slot]
            )));
        }
        self.step(
            &[SlotStep {
                slot,
                tokens,
                logits: wanted,
            }],
            true,
        )
    }

    fn step(&mut self, steps: &[SlotStep<'_>], hidden: bool) -> Result<Logits, DaemonError> {
        let width = if hidden { self.n_embd } else { self.n_vocab };
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
            items.push(wire::StepItem {
                slot: step.slot,
                start,
                tokens: step.tokens.to_vec(),
                logits: step.logits,
            });
        }
        let reply = {
            let _turn = self.link.turns.lock();
            self.link.step_blocking(self.id, items, hidden)?
        };
        for step in steps {
            self.lengths[step.slot] += step.tokens.len();
        }
        // The worker's graphs for a new batch size or prompt length hold device memory from
        // now on; the scheduler publishes this figure to the budget after the step.
        if reply.bytes > 0 {
            self.bytes = reply.bytes;
        }
        let bad = |why: String| DaemonError::Internal(format!("tinygrad worker reply: {why}"));
        if reply.items.len() != steps.len() || reply.n_vocab != width {
            return Err(bad(format!(
                "{} items of {} values for {} asked of {width}",
                reply.items.len(),
                reply.n_vocab,
                steps.len(),
            )));
        }
        let mut rows = Vec::with_capacity(steps.len());
        let mut values = Vec::new();
        for (item, step) in reply.items.into_iter().zip(steps) {
            let expected = match step.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => step.tokens.len(),
            };
            if item.rows != expected || item.values.len() != expected * width {
                return Err(bad(format!(
                    "{} rows ({} values) where {expected} rows were asked",
                    item.rows,
                    item.values.len()
                )));
            }
            values.extend(item.values);
            rows.push(expected);
        }
        Logits::from_rows(width, values, &rows).ok_or_else(|| bad("row count mismatch".into()))
    }
}

impl Drop for TinygradModel {
    /// The device memory goes back when the model does (an unload, an eviction, a failed load).
    fn drop(&mut self) {
        self.link.unload(self.id);
    }
}

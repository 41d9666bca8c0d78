//! The CPU backend: models run by the native engine from their memory-mapped GGUF files.

use std::sync::Arc;

use egpu_engine::gguf::GgufFile;
use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{
    BatchItem, KvCache, Logits, LogitsWanted, Model, ModelError, Scratch,
};
use egpu_engine::models::marian::MarianModel;

use super::{ModelSpec, Progress, SlotStep};
use crate::error::DaemonError;

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

    /// Keeps the first `len` positions of a slot's cache (0: empties it).
    pub fn keep_prefix(&mut self, slot: usize, len: usize) {
        self.caches[slot].truncate(len);
    }

    /// Makes slot `to` hold the first `len` positions of slot `from`'s cache (see
    /// [`KvCache::copy_prefix_from`]). `from` and `to` are distinct slots
    /// ([`super::DecoderModel::copy_prefix`] checks).
    pub fn copy_prefix(&mut self, from: usize, to: usize, len: usize) -> Result<(), DaemonError> {
        // Two distinct slots borrowed at once: split the list between them.
        let (low, high) = self.caches.split_at_mut(from.max(to));
        let (src, dst) = if from < to {
            (&low[from], &mut high[0])
        } else {
            (&high[0], &mut low[to])
        };
        dst.copy_prefix_from(src, len)
            .map_err(|e| DaemonError::Internal(e.to_string()))
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

impl CpuModel {
    /// The final hidden states of `tokens` fed to slot `slot` at `start_pos` (its cache cut
    /// there first): the rows `wanted` asks for. An embedding feeds its text chunk by chunk.
    pub fn hidden(
        &mut self,
        pool: &ThreadPool,
        slot: usize,
        tokens: &[u32],
        start_pos: usize,
        wanted: LogitsWanted,
    ) -> Result<Logits, ModelError> {
        let cache = &mut self.caches[slot];
        cache.truncate(start_pos);
        let mut items = [BatchItem::new(cache, tokens, start_pos, wanted)];
        self.model
            .forward_hidden(pool, &mut self.scratch, &mut items)
    }
}

impl CpuModel {
    /// The final hidden states of several whole texts in one pass, the rows `wanted` asks for
    /// of each: the first text in slot `slot`'s cache (cut to nothing first), the others in
    /// caches made for this pass and dropped after it (the pass's working memory, which the
    /// load estimate counts with its scratch). Each text's rows are those it would get alone.
    pub fn hidden_texts(
        &mut self,
        pool: &ThreadPool,
        slot: usize,
        texts: &[&[u32]],
        wanted: LogitsWanted,
    ) -> Result<Logits, ModelError> {
        let Some((first, rest)) = texts.split_first() else {
            return Err(ModelError::InvalidBatch("no texts".into()));
        };
        let mut caches = rest
            .iter()
            .map(|t| self.model.new_kv_cache(t.len().max(1)))
            .collect::<Result<Vec<_>, _>>()?;
        let slot_cache = &mut self.caches[slot];
        slot_cache.truncate(0);
        let mut items = Vec::with_capacity(texts.len());
        items.push(BatchItem::new(slot_cache, first, 0, wanted));
        for (cache, text) in caches.iter_mut().zip(rest) {
            items.push(BatchItem::new(cache, text, 0, wanted));
        }
        self.model
            .forward_hidden(pool, &mut self.scratch, &mut items)
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

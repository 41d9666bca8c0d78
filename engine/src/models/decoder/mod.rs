//! Running a model: load it from a GGUF file, keep one [`KvCache`] per sequence, and advance
//! several sequences at once with [`Model::forward`].
//!
//! One forward pass takes a batch of [`BatchItem`]s: each is one sequence with its cache, its
//! new tokens (a decode token or a prompt chunk) and the position they start at. All items'
//! tokens go through every weight matrix together, so the weights are read once per step;
//! attention is done per sequence against its own cache. A sequence's logits do not depend on
//! what else is in the batch, and a prompt fed in chunks gives the same logits as in one go.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use egpu_engine::{gguf::GgufFile, kernels::ThreadPool};
//! # use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model};
//! let model = Model::load(Arc::new(GgufFile::open("model.gguf")?))?;
//! let pool = ThreadPool::new(2);
//! let mut scratch = model.new_scratch();
//! let mut cache = model.new_kv_cache(2048)?;
//! let prompt = [504, 3575, 282, 4649, 314];
//! let logits = model.forward(
//!     &pool,
//!     &mut scratch,
//!     &mut [BatchItem::new(&mut cache, &prompt, 0, LogitsWanted::Last)],
//! )?;
//! let next_token_logits = logits.last(0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod attention;
mod config;
mod forward;
mod kv_cache;
mod weights;

use std::path::Path;
use std::sync::Arc;

use crate::gguf::{GgufError, GgufFile};
use crate::kernels::KernelError;
use crate::ops::RopeFrequencies;
use crate::quant::GgmlType;

pub use config::{Arch, FfnKind, ModelConfig, NormKind, RopeConfig, SUPPORTED_ARCHITECTURES};
pub use forward::Scratch;
pub use kv_cache::KvCache;

use weights::Weights;

/// Why a model could not be loaded or a batch could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "unsupported model architecture {arch:?}; supported architectures: {}",
        SUPPORTED_ARCHITECTURES.join(", ")
    )]
    UnsupportedArchitecture { arch: String },
    #[error("missing metadata key {0}")]
    MissingMetadata(String),
    #[error("metadata {key}: {reason}")]
    InvalidMetadata { key: String, reason: String },
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name}: expected dims {expected}, found {found:?}")]
    TensorShape {
        name: String,
        expected: String,
        found: Vec<u64>,
    },
    #[error("tensor {name}: type {ty} is not supported")]
    UnsupportedTensorType { name: String, ty: GgmlType },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("context overflow: the sequence needs {needed} positions, its cache holds {capacity}")]
    ContextOverflow { needed: usize, capacity: usize },
    #[error("token id {token} is out of range (vocabulary of {n_vocab})")]
    InvalidToken { token: u32, n_vocab: usize },
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("cannot reserve a KV cache of {positions} positions")]
    CacheAllocation { positions: usize },
}

/// Which positions of a batch item need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prompt chunk that is not the last).
    None,
    /// The last token's: the next-token distribution (decode, end of prefill).
    Last,
    /// Every token's (scoring a text).
    All,
}

/// One sequence's part of a forward pass.
#[derive(Debug)]
pub struct BatchItem<'a> {
    /// The sequence's cache; after the pass it holds `start_pos + tokens.len()` positions.
    pub cache: &'a mut KvCache,
    /// The new tokens, at positions `start_pos..start_pos + tokens.len()`.
    pub tokens: &'a [u32],
    /// Where the new tokens start: at most `cache.len()` (less rewinds the cache).
    pub start_pos: usize,
    pub logits: LogitsWanted,
}

impl<'a> BatchItem<'a> {
    pub fn new(
        cache: &'a mut KvCache,
        tokens: &'a [u32],
        start_pos: usize,
        logits: LogitsWanted,
    ) -> BatchItem<'a> {
        BatchItem {
            cache,
            tokens,
            start_pos,
            logits,
        }
    }

    /// The next tokens of a sequence, continuing where its cache ends.
    pub fn append(cache: &'a mut KvCache, tokens: &'a [u32], logits: LogitsWanted) -> Self {
        let start_pos = cache.len();
        BatchItem::new(cache, tokens, start_pos, logits)
    }
}

/// The logits a forward pass produced, item by item.
#[derive(Debug, Clone)]
pub struct Logits {
    n_vocab: usize,
    values: Vec<f32>,
    /// Per batch item: its first row and number of rows.
    items: Vec<(usize, usize)>,
}

impl Logits {
    /// Logits computed elsewhere (another backend): `rows[i]` rows for item `i`, item after
    /// item in `values`. None if `values` does not hold exactly that many rows of `n_vocab`.
    pub fn from_rows(n_vocab: usize, values: Vec<f32>, rows: &[usize]) -> Option<Logits> {
        let mut items = Vec::with_capacity(rows.len());
        let mut first = 0;
        for &n in rows {
            items.push((first, n));
            first += n;
        }
        (first.checked_mul(n_vocab)? == values.len()).then_some(Logits {
            n_vocab,
            values,
            items,
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Rows of logits for batch item `item` (0, 1, or one per token, as asked).
    pub fn n_rows(&self, item: usize) -> usize {
        self.items.get(item).map_or(0, |&(_, n)| n)
    }

    /// Row `row` of batch item `item`: `n_vocab` logits.
    pub fn row(&self, item: usize, row: usize) -> Option<&[f32]> {
        let &(first, n) = self.items.get(item)?;
        (row < n).then(|| &self.values[(first + row) * self.n_vocab..][..self.n_vocab])
    }

    /// Every row of batch item `item`, one after another.
    pub fn item(&self, item: usize) -> &[f32] {
        self.items.get(item).map_or(&[][..], |&(first, n)| {
            &self.values[first * self.n_vocab..(first + n) * self.n_vocab]
        })
    }

    /// The last row of batch item `item` (the next-token logits).
    pub fn last(&self, item: usize) -> Option<&[f32]> {
        self.row(item, self.n_rows(item).checked_sub(1)?)
    }

    /// All rows of all items, item after item.
    pub fn values(&self) -> &[f32] {
        &self.values
    }
}

/// A model ready to run: its configuration, and its weights used in place from the file.
#[derive(Debug)]
pub struct Model {
    file: Arc<GgufFile>,
    config: ModelConfig,
    weights: Weights,
    rope: Option<RopeFrequencies>,
    rope_swa: Option<RopeFrequencies>,
    /// Multiply with the exact-f32 reference kernel instead of the fast one.
    exact_matmuls: bool,
}

impl Model {
    /// Reads the configuration and finds every tensor. Nothing is dequantized except the
    /// small vectors (norms, biases); weight matrices are read from the mapping when used.
    pub fn load(file: Arc<GgufFile>) -> Result<Model, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let mut weights = Weights::load(&file, &config)?;
        weights.move_to_arena(&file);
        let factors = weights.rope_freqs.as_deref();
        let freqs = |r: &RopeConfig| {
            RopeFrequencies::new(r.style, r.n_rot, r.freq_base, r.freq_scale, factors)
        };
        let rope = config.rope.as_ref().map(freqs);
        let rope_swa = config.rope_swa.as_ref().map(freqs);
        Ok(Model {
            file,
            config,
            weights,
            rope,
            rope_swa,
            exact_matmuls: false,
        })
    }

    /// Opens and loads a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Model, ModelError> {
        Model::load(Arc::new(GgufFile::open(path)?))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// Whether matrix products use [`crate::kernels::matmul_reference`] (weights dequantized
    /// exactly, f32 arithmetic, no activation rounding) instead of the fast kernels. Much
    /// slower; for validating numerics, e.g. telling a real disagreement with another
    /// implementation from activation-rounding noise.
    pub fn set_exact_matmuls(&mut self, exact: bool) {
        self.exact_matmuls = exact;
    }

    pub fn exact_matmuls(&self) -> bool {
        self.exact_matmuls
    }

    /// An empty cache for one sequence of up to `capacity` tokens.
    pub fn new_kv_cache(&self, capacity: usize) -> Result<KvCache, ModelError> {
        KvCache::new(&self.config, capacity)
    }

    /// Working memory for forward passes; it grows to the largest batch it has served and is
    /// reused after that.
    pub fn new_scratch(&self) -> Scratch {
        Scratch::default()
    }
}

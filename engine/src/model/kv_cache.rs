//! One sequence's key/value cache, in f16.

use half::f16;

use super::config::ModelConfig;
use super::ModelError;

/// The keys and values of one sequence for every layer, stored as f16 for `capacity` positions.
///
/// Layout per layer: `[kv_head][position][head_dim]`, so the keys one attention head reads
/// are contiguous across positions. The buffers are allocated zeroed, which the OS provides
/// lazily: pages are only resident once positions are written.
#[derive(Debug)]
pub struct KvCache {
    capacity: usize,
    len: usize,
    n_head_kv: usize,
    head_dim_k: usize,
    head_dim_v: usize,
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
}

impl KvCache {
    /// A cache for `capacity` tokens of a model with this configuration.
    pub fn new(config: &ModelConfig, capacity: usize) -> Result<KvCache, ModelError> {
        if capacity == 0 {
            return Err(ModelError::InvalidBatch(
                "a KV cache needs room for at least one token".into(),
            ));
        }
        let k_len = config.n_head_kv * capacity * config.head_dim_k;
        let v_len = config.n_head_kv * capacity * config.head_dim_v;
        Ok(KvCache {
            capacity,
            len: 0,
            n_head_kv: config.n_head_kv,
            head_dim_k: config.head_dim_k,
            head_dim_v: config.head_dim_v,
            keys: (0..config.n_layer)
                .map(|_| vec![f16::ZERO; k_len])
                .collect(),
            values: (0..config.n_layer)
                .map(|_| vec![f16::ZERO; v_len])
                .collect(),
        })
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything (the buffers stay allocated for reuse).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets positions from `len` on (e.g. to rewind rejected tokens).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes of the f16 buffers (at full capacity).
    pub fn bytes(&self) -> usize {
        let per_layer = self.n_head_kv * self.capacity * (self.head_dim_k + self.head_dim_v);
        self.keys.len() * per_layer * std::mem::size_of::<f16>()
    }

    /// Whether this cache was made for a model of this shape.
    pub(crate) fn fits(&self, config: &ModelConfig) -> bool {
        self.keys.len() == config.n_layer
            && self.n_head_kv == config.n_head_kv
            && self.head_dim_k == config.head_dim_k
            && self.head_dim_v == config.head_dim_v
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
    }

    /// Stores one token's keys (`n_head_kv × head_dim_k`, head-major) and values at `pos`.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (cap, dk, dv) = (self.capacity, self.head_dim_k, self.head_dim_v);
        for h in 0..self.n_head_kv {
            let dst = &mut self.keys[layer][(h * cap + pos) * dk..][..dk];
            crate::ops::f32_to_f16(&k[h * dk..][..dk], dst);
            let dst = &mut self.values[layer][(h * cap + pos) * dv..][..dv];
            crate::ops::f32_to_f16(&v[h * dv..][..dv], dst);
        }
    }

    /// Keys of one KV head for positions `range`, `head_dim_k` values per position.
    pub(crate) fn keys(&self, layer: usize, head: usize, range: std::ops::Range<usize>) -> &[f16] {
        let base = head * self.capacity;
        &self.keys[layer]
            [(base + range.start) * self.head_dim_k..(base + range.end) * self.head_dim_k]
    }

    /// Values of one KV head for positions `range`, `head_dim_v` values per position.
    pub(crate) fn values(
        &self,
        layer: usize,
        head: usize,
        range: std::ops::Range<usize>,
    ) -> &[f16] {
        let base = head * self.capacity;
        &self.values[layer]
            [(base + range.start) * self.head_dim_v..(base + range.end) * self.head_dim_v]
    }
}

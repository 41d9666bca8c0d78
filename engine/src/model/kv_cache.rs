//! One sequence's key/value cache, in f16.

use half::f16;

use super::config::ModelConfig;
use super::ModelError;

/// The keys and values of one sequence for every layer, stored as f16 for `capacity` positions.
///
/// One buffer per layer and KV head, `[position][head_dim]`, so the keys one attention head
/// reads are contiguous across positions. Each buffer reserves room for `capacity` positions
/// up front (so it never moves) but is only filled as positions are written: reserved pages
/// the OS has not been asked to touch do not count as resident memory.
#[derive(Debug)]
pub struct KvCache {
    capacity: usize,
    len: usize,
    n_head_kv: usize,
    head_dim_k: usize,
    head_dim_v: usize,
    /// `[layer][kv_head]`.
    keys: Vec<Vec<Vec<f16>>>,
    values: Vec<Vec<Vec<f16>>>,
}

impl KvCache {
    /// A cache for `capacity` tokens of a model with this configuration.
    pub fn new(config: &ModelConfig, capacity: usize) -> Result<KvCache, ModelError> {
        if capacity == 0 {
            return Err(ModelError::InvalidBatch(
                "a KV cache needs room for at least one token".into(),
            ));
        }
        let reserve = |dim: usize| -> Result<Vec<Vec<Vec<f16>>>, ModelError> {
            let per_head = capacity
                .checked_mul(dim)
                .ok_or(ModelError::CacheAllocation {
                    positions: capacity,
                })?;
            (0..config.n_layer)
                .map(|_| {
                    (0..config.n_head_kv)
                        .map(|_| {
                            let mut buf = Vec::new();
                            buf.try_reserve_exact(per_head).map_err(|_| {
                                ModelError::CacheAllocation {
                                    positions: capacity,
                                }
                            })?;
                            Ok(buf)
                        })
                        .collect()
                })
                .collect()
        };
        Ok(KvCache {
            capacity,
            len: 0,
            n_head_kv: config.n_head_kv,
            head_dim_k: config.head_dim_k,
            head_dim_v: config.head_dim_v,
            keys: reserve(config.head_dim_k)?,
            values: reserve(config.head_dim_v)?,
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

    /// Forgets everything (the buffers stay reserved for reuse).
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

    /// Stores one token's keys (`n_head_kv × head_dim_k`, head-major) and values at `pos`,
    /// which is at most one past the furthest position written so far.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert!(pos < self.capacity);
        let store = |buf: &mut Vec<f16>, src: &[f32]| {
            let dim = src.len();
            if buf.len() < (pos + 1) * dim {
                buf.resize((pos + 1) * dim, f16::ZERO);
            }
            crate::ops::f32_to_f16(src, &mut buf[pos * dim..(pos + 1) * dim]);
        };
        let (dk, dv) = (self.head_dim_k, self.head_dim_v);
        for (h, buf) in self.keys[layer].iter_mut().enumerate() {
            store(buf, &k[h * dk..(h + 1) * dk]);
        }
        for (h, buf) in self.values[layer].iter_mut().enumerate() {
            store(buf, &v[h * dv..(h + 1) * dv]);
        }
    }

    /// Keys of one KV head for positions `range` (all written), `head_dim_k` values each.
    pub(crate) fn keys(&self, layer: usize, head: usize, range: std::ops::Range<usize>) -> &[f16] {
        &self.keys[layer][head][range.start * self.head_dim_k..range.end * self.head_dim_k]
    }

    /// Values of one KV head for positions `range` (all written), `head_dim_v` values each.
    pub(crate) fn values(
        &self,
        layer: usize,
        head: usize,
        range: std::ops::Range<usize>,
    ) -> &[f16] {
        &self.values[layer][head][range.start * self.head_dim_v..range.end * self.head_dim_v]
    }
}

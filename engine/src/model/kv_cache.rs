//! One sequence's key/value cache, in f16.

use half::f16;

use super::config::ModelConfig;
use super::ModelError;

/// Positions per key block: keys are stored transposed within blocks of this many positions.
pub(crate) const KEY_BLOCK: usize = 64;

/// The keys and values of one sequence for every layer, stored as f16 for `capacity` positions.
///
/// One buffer per layer and KV head. Values are `[position][head_dim]`. Keys are stored in
/// blocks of [`KEY_BLOCK`] positions, each block transposed, `[block][head_dim][KEY_BLOCK]`:
/// attention computes a block's scores across positions, eight at a time, and reads the block
/// in exactly that layout, so widening it to f32 is the only work before the dot products (a
/// `[position][head_dim]` layout had to be transposed on every read, the largest cost of
/// decode attention at long contexts). Each buffer reserves room for `capacity` positions (keys:
/// rounded up to whole blocks) up front, so it never moves, but is only filled as positions are
/// written: reserved pages the OS has not been asked to touch do not count as resident memory.
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
        let key_positions = capacity.div_ceil(KEY_BLOCK) * KEY_BLOCK;
        let reserve = |dim: usize, positions: usize| -> Result<Vec<Vec<Vec<f16>>>, ModelError> {
            let per_head = positions
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
            keys: reserve(config.head_dim_k, key_positions)?,
            values: reserve(config.head_dim_v, capacity)?,
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
        let key_positions = self.capacity.div_ceil(KEY_BLOCK) * KEY_BLOCK;
        let per_layer =
            self.n_head_kv * (key_positions * self.head_dim_k + self.capacity * self.head_dim_v);
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
        let (block, column) = (pos / KEY_BLOCK, pos % KEY_BLOCK);
        for (h, buf) in self.keys[layer].iter_mut().enumerate() {
            let start = block * dk * KEY_BLOCK;
            if buf.len() < start + dk * KEY_BLOCK {
                buf.resize(start + dk * KEY_BLOCK, f16::ZERO);
            }
            let block = &mut buf[start..start + dk * KEY_BLOCK];
            for (d, &x) in k[h * dk..(h + 1) * dk].iter().enumerate() {
                block[d * KEY_BLOCK + column] = f16::from_f32(x);
            }
        }
        for (h, buf) in self.values[layer].iter_mut().enumerate() {
            store(buf, &v[h * dv..(h + 1) * dv]);
        }
    }

    /// Keys of one KV head for the block of positions `block·KEY_BLOCK..(block+1)·KEY_BLOCK`,
    /// transposed: `[head_dim_k][KEY_BLOCK]`. Only columns of written positions are meaningful.
    pub(crate) fn key_block(&self, layer: usize, head: usize, block: usize) -> &[f16] {
        let n = self.head_dim_k * KEY_BLOCK;
        &self.keys[layer][head][block * n..(block + 1) * n]
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

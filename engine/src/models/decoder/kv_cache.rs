//! One sequence's key/value cache, in f16.

use half::f16;

use super::config::ModelConfig;
use super::ModelError;
use crate::kernels::HugePageArena;

/// Positions per key block: keys are stored transposed within blocks of this many positions.
pub(crate) const KEY_BLOCK: usize = 64;

/// The keys and values of one sequence for every layer, stored as f16 for `capacity` positions.
///
/// Positions are grouped in blocks of [`KEY_BLOCK`]. For each block, every layer and KV head has
/// its keys, transposed (`[head_dim_k][KEY_BLOCK]`), then its values (`[KEY_BLOCK][head_dim_v]`):
///
/// ```text
/// [block][layer][kv_head] { keys [head_dim_k][KEY_BLOCK], values [KEY_BLOCK][head_dim_v] }
/// ```
///
/// Attention computes a block's scores across positions, eight at a time, and reads the keys in
/// exactly that layout, so widening them to f32 is the only work before the dot products (a
/// `[position][head_dim]` layout had to be transposed on every read, the largest cost of decode
/// attention at long contexts).
///
/// Block-major, because the cache lives in a [`HugePageArena`]: decode reads the whole cache
/// for every token, and with huge pages those reads miss the TLB far less (the weights gained
/// ~30 % from the same change). The arena is mapped for the whole capacity up front, so it never
/// moves, but pages become resident only as positions are written; with the positions' blocks
/// outermost, a sequence's resident cache grows with its length (in 2 MiB steps) instead of
/// touching every layer's region at once.
#[derive(Debug)]
pub struct KvCache {
    capacity: usize,
    len: usize,
    n_layer: usize,
    n_head_kv: usize,
    head_dim_k: usize,
    head_dim_v: usize,
    data: HugePageArena,
}

impl KvCache {
    /// A cache for `capacity` tokens of a model with this configuration.
    pub fn new(config: &ModelConfig, capacity: usize) -> Result<KvCache, ModelError> {
        if capacity == 0 {
            return Err(ModelError::InvalidBatch(
                "a KV cache needs room for at least one token".into(),
            ));
        }
        let too_big = ModelError::CacheAllocation {
            positions: capacity,
        };
        let per_block = config
            .n_layer
            .checked_mul(config.n_head_kv)
            .and_then(|n| n.checked_mul(config.head_dim_k + config.head_dim_v))
            .and_then(|n| n.checked_mul(KEY_BLOCK * std::mem::size_of::<f16>()));
        let bytes = per_block
            .and_then(|n| n.checked_mul(capacity.div_ceil(KEY_BLOCK)))
            .filter(|&n| n <= isize::MAX as usize / 2)
            .ok_or(too_big)?;
        let data = HugePageArena::zeroed(bytes).map_err(|_| ModelError::CacheAllocation {
            positions: capacity,
        })?;
        Ok(KvCache {
            capacity,
            len: 0,
            n_layer: config.n_layer,
            n_head_kv: config.n_head_kv,
            head_dim_k: config.head_dim_k,
            head_dim_v: config.head_dim_v,
            data,
        })
    }

    /// f16 values per layer and head in one block: keys, then values.
    fn head_block_len(&self) -> usize {
        (self.head_dim_k + self.head_dim_v) * KEY_BLOCK
    }

    /// Where the keys of `layer`, `head` for block `block` start (f16 index).
    fn head_block_start(&self, layer: usize, head: usize, block: usize) -> usize {
        ((block * self.n_layer + layer) * self.n_head_kv + head) * self.head_block_len()
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
        self.data.len()
    }

    /// Makes this cache hold the first `len` positions of `src` (the same model's cache of
    /// another sequence): what prefilling the same tokens would have written, bit for bit,
    /// since a token's keys and values depend only on the tokens before it (batch invariance).
    /// Whole blocks are copied: positions past `len` in the last one are not read before they
    /// are written again. Fails, changing nothing, if the shapes differ or `len` is more than
    /// `src` holds or this cache can hold.
    pub fn copy_prefix_from(&mut self, src: &KvCache, len: usize) -> Result<(), ModelError> {
        let same_shape = self.n_layer == src.n_layer
            && self.n_head_kv == src.n_head_kv
            && self.head_dim_k == src.head_dim_k
            && self.head_dim_v == src.head_dim_v;
        if !same_shape || len > src.len || len > self.capacity {
            return Err(ModelError::InvalidBatch(format!(
                "cannot copy {len} positions from a cache holding {} into one of {} positions{}",
                src.len,
                self.capacity,
                if same_shape { "" } else { " of another shape" }
            )));
        }
        let n = self.head_block_start(0, 0, len.div_ceil(KEY_BLOCK));
        self.data.f16s_mut()[..n].copy_from_slice(&src.data.f16s()[..n]);
        self.len = len;
        Ok(())
    }

    /// Whether this cache was made for a model of this shape.
    pub(crate) fn fits(&self, config: &ModelConfig) -> bool {
        self.n_layer == config.n_layer
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
        debug_assert!(pos < self.capacity);
        let (dk, dv) = (self.head_dim_k, self.head_dim_v);
        let (block, column) = (pos / KEY_BLOCK, pos % KEY_BLOCK);
        for h in 0..self.n_head_kv {
            let start = self.head_block_start(layer, h, block);
            let head = &mut self.data.f16s_mut()[start..start + (dk + dv) * KEY_BLOCK];
            let (keys, values) = head.split_at_mut(dk * KEY_BLOCK);
            for (d, &x) in k[h * dk..(h + 1) * dk].iter().enumerate() {
                keys[d * KEY_BLOCK + column] = f16::from_f32(x);
            }
            crate::ops::f32_to_f16(
                &v[h * dv..(h + 1) * dv],
                &mut values[column * dv..(column + 1) * dv],
            );
        }
    }

    /// Keys of one KV head for the block of positions `block·KEY_BLOCK..(block+1)·KEY_BLOCK`,
    /// transposed: `[head_dim_k][KEY_BLOCK]`. Only columns of written positions are meaningful.
    pub(crate) fn key_block(&self, layer: usize, head: usize, block: usize) -> &[f16] {
        let start = self.head_block_start(layer, head, block);
        &self.data.f16s()[start..start + self.head_dim_k * KEY_BLOCK]
    }

    /// Values of one KV head for positions `range` (all written, within one block of
    /// [`KEY_BLOCK`] positions), `head_dim_v` values each.
    pub(crate) fn values(
        &self,
        layer: usize,
        head: usize,
        range: std::ops::Range<usize>,
    ) -> &[f16] {
        let block = range.start / KEY_BLOCK;
        debug_assert!(range.is_empty() || (range.end - 1) / KEY_BLOCK == block);
        let values = self.head_block_start(layer, head, block) + self.head_dim_k * KEY_BLOCK;
        let dv = self.head_dim_v;
        let (first, last) = (
            range.start % KEY_BLOCK,
            range.start % KEY_BLOCK + range.len(),
        );
        &self.data.f16s()[values + first * dv..values + last * dv]
    }
}

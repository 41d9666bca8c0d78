//! Causal (and, on sliding-window layers, windowed) or, for encoders, bidirectional
//! grouped-query attention of a batch's
//! tokens against their own sequences' f16 caches, in f32.
//!
//! Work is split into units of (KV head, sequence, tile of up to [`QUERY_TILE`] consecutive
//! tokens). A unit handles every query head that shares its KV head, for every token of its
//! tile. Keys are visited in blocks of [`KEY_BLOCK`] positions with a running (online)
//! softmax, so memory does not grow with the context. Within a block, the tile's tokens that
//! see the same keys go through the kernels as one block of rows, so each load of keys and
//! values serves many queries; on x86 the kernels widen the f16 cache in registers as they
//! read it, elsewhere each block is widened once per unit.
//!
//! Batch invariance: key blocks are aligned to absolute positions and each query only ever
//! touches its own valid positions within a block, so the sequence of floating-point
//! operations for a query depends on the query alone, not on which other tokens share its
//! tile, its batch or its thread.

use std::sync::Mutex;

use crate::kernels::{self, ThreadPool};
use crate::ops;

use super::config::ModelConfig;
use super::kv_cache::KEY_BLOCK;
use super::KvCache;

/// Query tokens per unit: enough to amortise widening a key block, few enough that a long
/// prompt still yields units for every thread.
const QUERY_TILE: usize = 16;
/// Below this many multiply-adds (tens of microseconds) attention stays on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// Where one token of the batch comes from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub item: usize,
    pub pos: usize,
    /// One past the last key position the token sees: `pos + 1` in causal attention, the
    /// end of its item's tokens in an encoder's bidirectional attention.
    pub end: usize,
}

#[derive(Debug, Clone, Copy)]
struct Unit {
    kv_head: usize,
    /// The query heads of the KV head's group this unit computes, `h0..h1`: the whole group,
    /// or part of it for a one-token unit split to keep every thread busy.
    h0: usize,
    h1: usize,
    item: usize,
    /// Batch token range `t0..t1` (all of one item).
    t0: usize,
    t1: usize,
    /// Key positions visited, summed over the tile: the unit's share of the work.
    cost: usize,
}

/// Buffers of the attention step, reused across layers and passes.
#[derive(Debug, Default)]
pub(super) struct AttentionScratch {
    /// Output grouped by KV head: `[kv_head][token][group × head_dim_v]`, so that each unit's
    /// output is one contiguous run.
    by_head: Vec<f32>,
    units: Vec<Unit>,
    threads: Vec<Mutex<ThreadBuffers>>,
}

impl AttentionScratch {
    /// Bytes held by the buffers.
    pub(super) fn bytes(&self) -> usize {
        let f32s = self.by_head.capacity()
            + self
                .threads
                .iter()
                .map(|t| {
                    let t = lock(t);
                    t.queries.capacity()
                        + t.keys_t.capacity()
                        + t.values.capacity()
                        + t.scores.capacity()
                        + t.max.capacity()
                        + t.sum.capacity()
                })
                .sum::<usize>();
        f32s * 4 + self.units.capacity() * std::mem::size_of::<Unit>()
    }
}

#[derive(Debug, Default)]
struct ThreadBuffers {
    /// The unit's queries, `[tile token][head][head_dim_k]`: a prompt's tokens' rows side by
    /// side, so that tokens seeing the same keys go through the kernels as one block of rows.
    queries: Vec<f32>,
    /// The key block, widened: `[head_dim][KEY_BLOCK]`, as the cache stores it.
    keys_t: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
    /// Running maximum and sum of the online softmax, per (tile token, head).
    max: Vec<f32>,
    sum: Vec<f32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn grow(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// The key positions token `slot` attends to on a layer with this window.
fn key_range(slot: Slot, window: Option<usize>) -> std::ops::Range<usize> {
    let end = slot.end;
    window.map_or(0, |w| end.saturating_sub(w))..end
}

/// Attention output `[token][n_head × head_dim_v]` for every token in `slots`, whose queries
/// (`[token][n_head × head_dim_k]`, RoPE applied) are `q`. Each item's cache must already
/// hold this layer's keys and values for all of its tokens.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    pool: &ThreadPool,
    cfg: &ModelConfig,
    il: usize,
    caches: &[&KvCache],
    slots: &[Slot],
    q: &[f32],
    out: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    let n_tokens = slots.len();
    let pool_threads = pool.n_threads();
    let group = cfg.group_size();
    let width = group * cfg.head_dim_v;
    let window = cfg.window_for_layer(il);
    if scratch.threads.len() < pool_threads {
        scratch.threads.resize_with(pool_threads, Default::default);
    }

    // Units in (KV head, token) order, so that their outputs tile `by_head` in order.
    scratch.units.clear();
    let mut total_cost = 0;
    for kv_head in 0..cfg.n_head_kv {
        let mut t0 = 0;
        while t0 < n_tokens {
            let item = slots[t0].item;
            let mut t1 = t0 + 1;
            while t1 < n_tokens && t1 - t0 < QUERY_TILE && slots[t1].item == item {
                t1 += 1;
            }
            let cost = slots[t0..t1]
                .iter()
                .map(|&s| key_range(s, window).len())
                .sum::<usize>();
            total_cost += cost;
            scratch.units.push(Unit {
                kv_head,
                h0: 0,
                h1: group,
                item,
                t0,
                t1,
                cost,
            });
            t0 = t1;
        }
    }

    // Small jobs (decode at short contexts) run on the calling thread: handing them to the
    // pool would cost more than the arithmetic.
    let macs = total_cost * group * (cfg.head_dim_k + cfg.head_dim_v);
    let n_threads = if macs < PARALLEL_MIN_MACS {
        1
    } else {
        pool_threads
    };

    // A decode step of a model with few KV heads has fewer units than threads, or a number that
    // does not divide among them (3 KV heads on 2 threads: 2 + 1). Splitting one-token units
    // by query head evens that out; every score and output is computed by the same operations
    // either way (rows are independent in every attention kernel), so results do not change.
    if n_threads > 1 && !scratch.units.len().is_multiple_of(n_threads) {
        let n_units = scratch.units.len();
        let parts = (1..=group)
            .find(|p| (n_units * p).is_multiple_of(n_threads))
            .unwrap_or(group);
        if parts > 1 && scratch.units.iter().all(|u| u.t1 - u.t0 == 1) {
            let whole = std::mem::take(&mut scratch.units);
            for unit in whole {
                for part in 0..parts {
                    let (h0, h1) = (group * part / parts, group * (part + 1) / parts);
                    if h1 > h0 {
                        scratch.units.push(Unit {
                            h0,
                            h1,
                            cost: unit.cost * (h1 - h0) / group,
                            ..unit
                        });
                    }
                }
            }
        }
    }

    // Contiguous runs of units of about equal cost, one per thread.
    let mut bounds = vec![0usize; n_threads + 1];
    let mut acc = 0;
    let mut thread = 1;
    for (u, unit) in scratch.units.iter().enumerate() {
        while thread < n_threads && acc >= total_cost * thread / n_threads {
            bounds[thread] = u;
            thread += 1;
        }
        acc += unit.cost;
    }
    for b in &mut bounds[thread..] {
        *b = scratch.units.len();
    }

    let total_len = cfg.n_head_kv * n_tokens * width;
    let units = &scratch.units[..];
    let offset = |u: usize| -> usize {
        units.get(u).map_or(total_len, |unit| {
            (unit.kv_head * n_tokens + unit.t0) * width + unit.h0 * cfg.head_dim_v
        })
    };
    let mut parts = Vec::with_capacity(n_threads);
    let mut rest: &mut [f32] = grow(&mut scratch.by_head, total_len);
    let mut consumed = 0;
    for i in 0..n_threads {
        let end = offset(bounds[i + 1]);
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(end - consumed);
        parts.push(Mutex::new(part));
        rest = tail;
        consumed = end;
    }

    let threads = &scratch.threads[..];
    let bounds = &bounds[..];
    let work = |thread: usize, _: usize| {
        let (Some(part), Some(bufs)) = (parts.get(thread), threads.get(thread)) else {
            return;
        };
        let mut part = lock(part);
        let mut bufs = lock(bufs);
        let mut written = 0;
        for unit in &units[bounds[thread]..bounds[thread + 1]] {
            let len = (unit.t1 - unit.t0) * (unit.h1 - unit.h0) * cfg.head_dim_v;
            let unit_out = &mut part[written..written + len];
            written += len;
            attend_unit(
                cfg,
                il,
                caches[unit.item],
                unit,
                &slots[unit.t0..unit.t1],
                q,
                window,
                unit_out,
                &mut bufs,
            );
        }
    };
    if n_threads == 1 {
        work(0, 1);
    } else {
        pool.run(&work);
    }

    // Back to `[token][head]` order.
    let by_head = &scratch.by_head[..cfg.n_head_kv * n_tokens * width];
    for (t, row) in out.chunks_exact_mut(cfg.n_head_kv * width).enumerate() {
        for (g, dst) in row.chunks_exact_mut(width).enumerate() {
            dst.copy_from_slice(&by_head[(g * n_tokens + t) * width..][..width]);
        }
    }
}

/// One unit: query heads `h0..h1` of `unit.kv_head`'s group for each token of the tile.
/// `out` is `[tile token][head h0..h1][head_dim_v]`.
#[allow(clippy::too_many_arguments)]
fn attend_unit(
    cfg: &ModelConfig,
    il: usize,
    cache: &KvCache,
    unit: &Unit,
    tile: &[Slot],
    q: &[f32],
    window: Option<usize>,
    out: &mut [f32],
    bufs: &mut ThreadBuffers,
) {
    // The unit's query heads: `heads` consecutive ones from `first_head` of the q vector.
    let heads = unit.h1 - unit.h0;
    let first_head = unit.kv_head * cfg.group_size() + unit.h0;
    let (dk, dv) = (cfg.head_dim_k, cfg.head_dim_v);
    let q_dim = cfg.q_dim();
    let rows = tile.len() * heads;
    let lo = tile
        .iter()
        .map(|&s| key_range(s, window).start)
        .min()
        .unwrap_or(0);
    let hi = tile.iter().map(|s| s.end).max().unwrap_or(0);

    out.fill(0.0);
    let ThreadBuffers {
        queries,
        keys_t,
        values,
        scores,
        max,
        sum,
    } = bufs;
    let max = grow(max, rows);
    max.fill(f32::NEG_INFINITY);
    let sum = grow(sum, rows);
    sum.fill(0.0);
    let scores = grow(scores, rows * KEY_BLOCK);

    // Where the CPU has kernels that widen the f16 cache as they read it, they read it
    // directly; elsewhere each block is widened once for the unit's tokens.
    let read_f16 = kernels::has_f16_attention_kernels();
    let widened = if read_f16 { 0 } else { KEY_BLOCK };
    let values = grow(values, widened * dv);
    let keys_t = grow(keys_t, dk * widened);
    let queries = grow(queries, rows * dk);
    for (t, dst) in (unit.t0..unit.t1).zip(queries.chunks_exact_mut(heads * dk)) {
        dst.copy_from_slice(&q[t * q_dim + first_head * dk..][..heads * dk]);
    }
    let mut block_start = lo / KEY_BLOCK * KEY_BLOCK;
    while block_start < hi {
        let b0 = block_start.max(lo);
        let b1 = (block_start + KEY_BLOCK).min(hi);
        let block_origin = block_start;
        block_start += KEY_BLOCK;
        let block = cache.key_block(il, unit.kv_head, block_origin / KEY_BLOCK);
        let block_values_f16 = cache.values(il, unit.kv_head, b0..b1);
        if !read_f16 {
            // Only the columns up to the last position used, rounded up to eight so that the
            // conversion runs in whole 8-wide steps: decode's last block is often nearly empty.
            let used = (b1 - block_origin).div_ceil(8) * 8;
            if used >= KEY_BLOCK {
                ops::f16_to_f32(block, keys_t);
            } else {
                for (src, dst) in block
                    .chunks_exact(KEY_BLOCK)
                    .zip(keys_t.chunks_exact_mut(KEY_BLOCK))
                {
                    ops::f16_to_f32(&src[..used], &mut dst[..used]);
                }
            }
            ops::f16_to_f32(block_values_f16, &mut values[..(b1 - b0) * dv]);
        }
        // Consecutive tokens that see the same keys of this block (all of them, but in the
        // block holding the tile's own positions) go through the kernels together: their
        // rows share each load of keys and values. Every score and output still gets the
        // operations it gets alone, so the bits do not depend on the grouping.
        let block_range = |slot: Slot| {
            let own = key_range(slot, window);
            (b0.max(own.start), b1.min(own.end))
        };
        let mut run_start = 0;
        while run_start < tile.len() {
            let (r0, r1) = block_range(tile[run_start]);
            let mut run_end = run_start + 1;
            while run_end < tile.len() && block_range(tile[run_end]) == (r0, r1) {
                run_end += 1;
            }
            let (first_row, rows) = (run_start * heads, (run_end - run_start) * heads);
            run_start = run_end;
            if r0 >= r1 {
                continue;
            }
            let n = r1 - r0;
            let scores = &mut scores[..rows * n];
            let queries = &queries[first_row * dk..(first_row + rows) * dk];
            let cols = r0 - block_origin..r1 - block_origin;
            let scale = cfg.attention_scale;
            if read_f16 {
                kernels::scores_transposed_f16(queries, dk, block, KEY_BLOCK, cols, scale, scores);
            } else {
                kernels::scores_transposed(queries, dk, keys_t, KEY_BLOCK, cols, scale, scores);
            }
            let out_rows = &mut out[first_row * dv..(first_row + rows) * dv];
            for (row, (s, oh)) in scores
                .chunks_exact_mut(n)
                .zip(out_rows.chunks_exact_mut(dv))
                .enumerate()
            {
                let row = first_row + row;
                kernels::online_softmax_step(s, &mut max[row], &mut sum[row], oh);
            }
            // `scores` now holds each row's weights. One token's few rows (decode) go one at
            // a time, each with several runs of outputs in flight; a prompt's many rows share
            // each load of values.
            let (v0, v1) = ((r0 - b0) * dv, (r1 - b0) * dv);
            if read_f16 && rows == heads {
                let values = &block_values_f16[v0..v1];
                for (oh, w) in out_rows.chunks_exact_mut(dv).zip(scores.chunks_exact(n)) {
                    kernels::weighted_sum_f16(oh, w, values);
                }
            } else if read_f16 {
                kernels::weighted_sum_rows_f16(out_rows, scores, &block_values_f16[v0..v1], dv);
            } else {
                kernels::weighted_sum_rows(out_rows, scores, &values[v0..v1], dv);
            }
        }
    }
    for (oh, &l) in out.chunks_exact_mut(dv).zip(sum.iter()) {
        ops::scale(oh, 1.0 / l);
    }
}

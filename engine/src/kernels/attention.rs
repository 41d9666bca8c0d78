//! Attention's inner loops: scores of query heads against a block of keys, the online
//! softmax step, and the weighted sum of values, over f32 or (decode) f16 keys and values.
//!
//! Each has a portable body (`*_body`), inlined into the AVX2 variants in `avx2.rs`, so every
//! path computes the same operations in the same order and gives the same bits; the f16
//! kernels in `avx2_attention.rs` widen as they read, with the same arithmetic.
// Dispatch to the AVX2 variants is `unsafe` (target features); each call says why it is sound.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::KernelPath;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
use super::{avx2, avx2_attention};

/// Attention scores of up to a few query heads against a block of keys stored transposed:
/// `out[r][j] = scale · Σ_d q[r][d] · kt[d][cols.start + j]`, where `q` holds `rows` heads of
/// `dim` values and `kt` holds `dim` rows of `stride` key values (one key per column).
///
/// Every score is summed over `d` in order, one product at a time, whichever keys and rows are
/// computed together: the result for a (query, key) pair does not depend on the block or
/// batch it came in. Vectorization runs across keys, eight at a time, with up to four query
/// rows sharing each load of keys.
///
/// Runs as [`scores_transposed_with_path`] compiles it for this CPU (the same
/// arithmetic, so the same bits, in 256-bit registers where AVX2 is available).
pub fn scores_transposed(
    q: &[f32],
    dim: usize,
    kt: &[f32],
    stride: usize,
    cols: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
) {
    let path = KernelPath::best();
    scores_transposed_with_path(path, q, dim, kt, stride, cols, scale, out);
}

/// The body of [`scores_transposed`], inlined into each instruction-set variant.
///
/// Keys go eight at a time in the outer loop and query rows, up to eight at a time, in the
/// inner one: a strip of eight keys (`dim × 32` bytes, 8 KiB at `dim` 256) stays in L1 while
/// every row reads it, where a block of keys (64 KiB) would not. Eight rows keep eight
/// independent sums in flight, enough to hide the adds' latency.
#[inline(always)]
pub(crate) fn scores_transposed_body(
    q: &[f32],
    dim: usize,
    kt: &[f32],
    stride: usize,
    cols: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
) {
    let rows = q.len() / dim.max(1);
    let n = cols.len();
    debug_assert_eq!(out.len(), rows * n);
    let mut j = 0;
    while j + SCORE_KEYS <= n {
        let keys = cols.start + j;
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(8);
            let q = &q[r0 * dim..(r0 + nr) * dim];
            let out = &mut out[r0 * n..];
            match nr {
                1 => score_strip::<1>(q, dim, kt, stride, keys, scale, out, n, j),
                2 => score_strip::<2>(q, dim, kt, stride, keys, scale, out, n, j),
                3 => score_strip::<3>(q, dim, kt, stride, keys, scale, out, n, j),
                4 => score_strip::<4>(q, dim, kt, stride, keys, scale, out, n, j),
                5 => score_strip::<5>(q, dim, kt, stride, keys, scale, out, n, j),
                6 => score_strip::<6>(q, dim, kt, stride, keys, scale, out, n, j),
                7 => score_strip::<7>(q, dim, kt, stride, keys, scale, out, n, j),
                _ => score_strip::<8>(q, dim, kt, stride, keys, scale, out, n, j),
            }
            r0 += nr;
        }
        j += SCORE_KEYS;
    }
    for j in j..n {
        for (r, q) in q.chunks_exact(dim.max(1)).enumerate() {
            let mut acc = 0f32;
            for (d, &qd) in q.iter().enumerate() {
                acc += qd * kt[d * stride + cols.start + j];
            }
            out[r * n + j] = acc * scale;
        }
    }
}

/// Keys per strip of [`scores_transposed_body`]: one 256-bit register of f32.
const SCORE_KEYS: usize = 8;

/// Scores of exactly `R` query rows against the [`SCORE_KEYS`] keys from column `keys` of
/// `kt`, written to `out[r * n + j..]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_strip<const R: usize>(
    q: &[f32],
    dim: usize,
    kt: &[f32],
    stride: usize,
    keys: usize,
    scale: f32,
    out: &mut [f32],
    n: usize,
    j: usize,
) {
    const J: usize = SCORE_KEYS;
    let q: [&[f32]; R] = std::array::from_fn(|r| &q[r * dim..(r + 1) * dim]);
    let mut acc = [[0f32; J]; R];
    for d in 0..dim {
        let k: &[f32; J] = kt[d * stride + keys..][..J].try_into().expect("J keys");
        for (acc, q) in acc.iter_mut().zip(q) {
            let qd = q[d];
            for i in 0..J {
                acc[i] += qd * k[i];
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (o, a) in out[r * n + j..][..J].iter_mut().zip(acc) {
            *o = a * scale;
        }
    }
}

/// `y += Σ_j w[j] · x_j` where `x_j` is the `j`-th run of `y.len()` values in `xs`
/// (attention's weighted sum of values). Four rows at a time, so `y` is loaded and stored once
/// per four rows rather than once per row. Runs as [`weighted_sum_with_path`]
/// compiles it for this CPU (the same arithmetic, so the same bits).
#[inline]
pub fn weighted_sum(y: &mut [f32], w: &[f32], xs: &[f32]) {
    weighted_sum_with_path(KernelPath::best(), y, w, xs);
}

/// The body of [`weighted_sum`], inlined into each instruction-set variant.
#[inline(always)]
pub(crate) fn weighted_sum_body(y: &mut [f32], w: &[f32], xs: &[f32]) {
    let dim = y.len();
    debug_assert_eq!(xs.len(), w.len() * dim);
    let w4 = w.chunks_exact(4);
    let tail_w = w4.remainder();
    let x4 = xs.chunks_exact(4 * dim);
    let tail_x = x4.remainder();
    for (w, x) in w4.zip(x4) {
        let (x0, rest) = x.split_at(dim);
        let (x1, rest) = rest.split_at(dim);
        let (x2, x3) = rest.split_at(dim);
        let (w0, w1, w2, w3) = (w[0], w[1], w[2], w[3]);
        for ((((y, a), b), c), d) in y.iter_mut().zip(x0).zip(x1).zip(x2).zip(x3) {
            *y += w0 * a + w1 * b + w2 * c + w3 * d;
        }
    }
    for (&w, x) in tail_w.iter().zip(tail_x.chunks_exact(dim)) {
        super::math::axpy(y, w, x);
    }
}

/// `ys[r] += Σ_j ws[r][j] · x_j` for each row `r` of `ys` (runs of `dim` values), where `ws`
/// holds each row's `n` weights and `xs` the `n` values `x_j` of `dim` each: the rows of the
/// query heads and tokens that attend to the same keys. Every output gets [`weighted_sum`]'s
/// operations in its order, so the same bits as one row at a time. Runs as
/// [`weighted_sum_rows_with_path`] compiles it for this CPU.
pub fn weighted_sum_rows(ys: &mut [f32], ws: &[f32], xs: &[f32], dim: usize) {
    weighted_sum_rows_with_path(KernelPath::best(), ys, ws, xs, dim);
}

/// The body of [`weighted_sum_rows`], inlined into each instruction-set variant.
///
/// Columns go eight at a time in the outer loop and rows, four at a time, in the inner one:
/// a strip of eight columns of the values (`n × 32` bytes, 2 KiB for a block of 64 keys)
/// stays in L1 while every row reads it, and each load of values serves four rows, where one
/// row at a time re-reads the whole block (64 KiB at `dim` 256) from L2 per row.
#[inline(always)]
pub(crate) fn weighted_sum_rows_body(ys: &mut [f32], ws: &[f32], xs: &[f32], dim: usize) {
    let rows = ys.len() / dim.max(1);
    if rows == 0 {
        return;
    }
    let n = ws.len() / rows;
    debug_assert_eq!(ys.len(), rows * dim);
    debug_assert_eq!(ws.len(), rows * n);
    debug_assert_eq!(xs.len(), n * dim);
    let mut c = 0;
    while c + SUM_COLS <= dim {
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(4);
            let ys = &mut ys[r0 * dim..(r0 + nr) * dim];
            let ws = &ws[r0 * n..(r0 + nr) * n];
            match nr {
                1 => sum_strip::<1>(ys, ws, xs, dim, n, c),
                2 => sum_strip::<2>(ys, ws, xs, dim, n, c),
                3 => sum_strip::<3>(ys, ws, xs, dim, n, c),
                _ => sum_strip::<4>(ys, ws, xs, dim, n, c),
            }
            r0 += nr;
        }
        c += SUM_COLS;
    }
    let fours = n / 4 * 4;
    for i in c..dim {
        for (y, w) in ys.chunks_exact_mut(dim).zip(ws.chunks_exact(n.max(1))) {
            let y = &mut y[i];
            for j in (0..fours).step_by(4) {
                *y += w[j] * xs[j * dim + i]
                    + w[j + 1] * xs[(j + 1) * dim + i]
                    + w[j + 2] * xs[(j + 2) * dim + i]
                    + w[j + 3] * xs[(j + 3) * dim + i];
            }
            for (j, &wj) in w.iter().enumerate().skip(fours) {
                *y += wj * xs[j * dim + i];
            }
        }
    }
}

/// Columns per strip of [`weighted_sum_rows_body`]: one 256-bit register of f32.
const SUM_COLS: usize = 8;

/// [`weighted_sum_rows_body`] for exactly `R` rows and the [`SUM_COLS`] columns from `c`.
#[inline(always)]
fn sum_strip<const R: usize>(
    ys: &mut [f32],
    ws: &[f32],
    xs: &[f32],
    dim: usize,
    n: usize,
    c: usize,
) {
    const C: usize = SUM_COLS;
    let w: [&[f32]; R] = std::array::from_fn(|r| &ws[r * n..(r + 1) * n]);
    let mut y: [[f32; C]; R] =
        std::array::from_fn(|r| ys[r * dim + c..][..C].try_into().expect("C outputs"));
    let fours = n / 4 * 4;
    let mut j = 0;
    while j < fours {
        let a: &[f32; C] = xs[j * dim + c..][..C].try_into().expect("C values");
        let b: &[f32; C] = xs[(j + 1) * dim + c..][..C].try_into().expect("C values");
        let cc: &[f32; C] = xs[(j + 2) * dim + c..][..C].try_into().expect("C values");
        let d: &[f32; C] = xs[(j + 3) * dim + c..][..C].try_into().expect("C values");
        for (y, w) in y.iter_mut().zip(w) {
            let (w0, w1, w2, w3) = (w[j], w[j + 1], w[j + 2], w[j + 3]);
            for i in 0..C {
                y[i] += w0 * a[i] + w1 * b[i] + w2 * cc[i] + w3 * d[i];
            }
        }
        j += 4;
    }
    while j < n {
        let x: &[f32; C] = xs[j * dim + c..][..C].try_into().expect("C values");
        for (y, w) in y.iter_mut().zip(w) {
            let wj = w[j];
            for i in 0..C {
                y[i] += wj * x[i];
            }
        }
        j += 1;
    }
    for (r, y) in y.iter().enumerate() {
        ys[r * dim + c..][..C].copy_from_slice(y);
    }
}

/// One block of online softmax for one query row: turns the block's scores `s` into weights
/// `super::math::exp(s − max)` against the running maximum (raising it, and rescaling the
/// output `oh` and the running `sum` accumulated so far, when the block holds a larger score)
/// and adds them to `sum`. Returns the weights, for the caller's weighted sum of the block's
/// values. Runs as [`online_softmax_step`] compiles it for this CPU (the same bits). A running
/// maximum of −∞ marks a row's first block, whose `sum` and `oh` must be zero: they are left
/// as they are rather than rescaled.
///
/// The block's maximum and the sum of its weights are taken over [`SOFTMAX_LANES`] interleaved
/// lanes (element `i` into lane `i % 8`), then the lanes are added in a fixed tree, so that
/// both vectorize: summed in order, one add at a time, the weights' sum was a chain of
/// dependent adds that cost more than the exponentials and about a quarter of a prompt's
/// attention. The order depends only on the row's own scores, so a query's result still does
/// not depend on its batch.
#[inline(always)]
pub(crate) fn online_softmax_step_body<'s>(
    s: &'s mut [f32],
    max: &mut f32,
    sum: &mut f32,
    oh: &mut [f32],
) -> &'s [f32] {
    const L: usize = SOFTMAX_LANES;
    // `f32::max` ignores NaN and is otherwise exact, so any order gives the same maximum.
    let mut lane_max = [f32::NEG_INFINITY; L];
    let mut chunks = s.chunks_exact(L);
    for chunk in &mut chunks {
        for (m, &v) in lane_max.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    for (m, &v) in lane_max.iter_mut().zip(chunks.remainder()) {
        *m = m.max(v);
    }
    let block_max = lane_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let new_max = max.max(block_max);
    if *max == f32::NEG_INFINITY {
        // The row's first block: nothing accumulated yet (`sum` and `oh` are zero), so there
        // is nothing to rescale.
        *max = new_max;
    } else if new_max > *max {
        // Rescale what was accumulated against the old maximum.
        let factor = super::math::exp(*max - new_max);
        *sum *= factor;
        for v in oh.iter_mut() {
            *v *= factor;
        }
        *max = new_max;
    }
    for v in s.iter_mut() {
        *v = super::math::exp(*v - new_max);
    }
    let mut lane_sum = [0f32; L];
    let mut chunks = s.chunks_exact(L);
    for chunk in &mut chunks {
        for (acc, &v) in lane_sum.iter_mut().zip(chunk) {
            *acc += v;
        }
    }
    for (acc, &v) in lane_sum.iter_mut().zip(chunks.remainder()) {
        *acc += v;
    }
    let [a, b, c, d, e, f, g, h] = lane_sum;
    *sum += ((a + b) + (c + d)) + ((e + f) + (g + h));
    s
}

/// Lanes of [`online_softmax_step_body`]'s maximum and sum: one 256-bit register of f32.
const SOFTMAX_LANES: usize = 8;

/// Whether [`scores_transposed_f16`] and [`weighted_sum_f16`] have a kernel on this CPU that
/// widens as it reads. Where they do not, widening a block once with [`widen_f16`] and using the
/// f32 kernels is faster (the fallbacks here convert value by value).
pub fn has_f16_attention_kernels() -> bool {
    KernelPath::best().runs_avx2()
}

/// [`scores_transposed`] with keys still in f16 (the cache's storage): the same
/// bits as widening them first. For decode steps, where the widened block would serve only one
/// token's query heads.
pub fn scores_transposed_f16(
    q: &[f32],
    dim: usize,
    kt: &[half::f16],
    stride: usize,
    cols: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
) {
    scores_transposed_f16_with_path(KernelPath::best(), q, dim, kt, stride, cols, scale, out);
}

/// [`scores_transposed_f16`] on a chosen path; the scalar twin is each score summed over `d`
/// in order, as every path of [`scores_transposed`] sums it.
#[allow(clippy::too_many_arguments)]
pub fn scores_transposed_f16_with_path(
    path: KernelPath,
    q: &[f32],
    dim: usize,
    kt: &[half::f16],
    stride: usize,
    cols: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
) {
    // Only x86 has kernels of its own for this; elsewhere every path runs the loop below.
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    let _ = path;
    #[cfg(target_arch = "x86_64")]
    if path == KernelPath::Avx512 && path.is_available() {
        // SAFETY: the AVX-512 path is available; the kernel checks the shapes.
        unsafe { avx2_attention::scores_transposed_f16_wide(q, dim, kt, stride, cols, scale, out) };
        return;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if path.runs_avx2() && path.is_available() {
        // SAFETY: AVX2 and F16C are available; the kernel checks the shapes.
        unsafe { avx2_attention::scores_transposed_f16(q, dim, kt, stride, cols, scale, out) };
        return;
    }
    let n = cols.len();
    for (r, q) in q.chunks_exact(dim.max(1)).enumerate() {
        for (j, col) in cols.clone().enumerate() {
            let mut acc = 0f32;
            for (d, &qd) in q.iter().enumerate() {
                acc += qd * crate::quant::f16_bits_to_f32(kt[d * stride + col].to_bits());
            }
            out[r * n + j] = acc * scale;
        }
    }
}

/// [`weighted_sum`] with values still in f16: the same bits as widening first.
pub fn weighted_sum_f16(y: &mut [f32], w: &[f32], xs: &[half::f16]) {
    weighted_sum_f16_with_path(KernelPath::best(), y, w, xs);
}

/// [`weighted_sum_f16`] on a chosen path; the scalar twin follows [`weighted_sum`]'s order
/// per output (rows four at a time, then one at a time).
pub fn weighted_sum_f16_with_path(path: KernelPath, y: &mut [f32], w: &[f32], xs: &[half::f16]) {
    // Only x86 has kernels of its own for this; elsewhere every path runs the loop below.
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    let _ = path;
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if path.runs_avx2() && path.is_available() {
        // SAFETY: AVX2 and F16C are available; the kernel checks the shapes.
        unsafe { avx2_attention::weighted_sum_f16(y, w, xs) };
        return;
    }
    let dim = y.len();
    let x = |j: usize, i: usize| crate::quant::f16_bits_to_f32(xs[j * dim + i].to_bits());
    let fours = w.len() / 4 * 4;
    for (i, y) in y.iter_mut().enumerate() {
        for j in (0..fours).step_by(4) {
            *y += w[j] * x(j, i)
                + w[j + 1] * x(j + 1, i)
                + w[j + 2] * x(j + 2, i)
                + w[j + 3] * x(j + 3, i);
        }
        for (j, &wj) in w.iter().enumerate().skip(fours) {
            *y += wj * x(j, i);
        }
    }
}

/// [`weighted_sum_rows`] with values still in f16: the same bits as widening first.
pub fn weighted_sum_rows_f16(ys: &mut [f32], ws: &[f32], xs: &[half::f16], dim: usize) {
    weighted_sum_rows_f16_with_path(KernelPath::best(), ys, ws, xs, dim);
}

/// [`weighted_sum_rows_f16`] on a chosen path; the scalar twin is [`weighted_sum_f16`]'s
/// row by row.
pub fn weighted_sum_rows_f16_with_path(
    path: KernelPath,
    ys: &mut [f32],
    ws: &[f32],
    xs: &[half::f16],
    dim: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if path == KernelPath::Avx512 && path.is_available() {
        // SAFETY: the AVX-512 path is available; the kernel checks the shapes.
        unsafe { avx2_attention::weighted_sum_rows_f16_wide(ys, ws, xs, dim) };
        return;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if path.runs_avx2() && path.is_available() {
        // SAFETY: AVX2 and F16C are available; the kernel checks the shapes.
        unsafe { avx2_attention::weighted_sum_rows_f16(ys, ws, xs, dim) };
        return;
    }
    let rows = ys.len() / dim.max(1);
    if rows == 0 {
        return;
    }
    let n = ws.len() / rows;
    for (y, w) in ys.chunks_exact_mut(dim).zip(ws.chunks_exact(n.max(1))) {
        weighted_sum_f16_with_path(path, y, w, xs);
    }
}

/// One block of attention's online softmax for one query row (see
/// [`online_softmax_step_body`]), compiled with AVX2 where the CPU has it: the same
/// arithmetic (no FMA contraction, sums in order), so the same bits, eight exponentials at a
/// time instead of four.
pub fn online_softmax_step<'s>(
    s: &'s mut [f32],
    max: &mut f32,
    sum: &mut f32,
    oh: &mut [f32],
) -> &'s [f32] {
    #[cfg(target_arch = "x86_64")]
    if KernelPath::best() == KernelPath::Avx512 {
        // SAFETY: AVX-512 is available (`best` only picks available paths).
        return unsafe { avx512::online_softmax_step(s, max, sum, oh) };
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if KernelPath::best().runs_avx2() {
        // SAFETY: AVX2 is available (`best` only picks available paths).
        return unsafe { avx2::online_softmax_step(s, max, sum, oh) };
    }
    online_softmax_step_body(s, max, sum, oh)
}

/// Attention scores (see [`scores_transposed`]) on a chosen path: the portable body,
/// or the same body inlined into a function built with AVX2 enabled, so results are
/// bit-identical on every path (no FMA contraction happens: Rust never fuses a multiply and an
/// add on its own).
#[allow(clippy::too_many_arguments)]
pub fn scores_transposed_with_path(
    path: KernelPath,
    q: &[f32],
    dim: usize,
    kt: &[f32],
    stride: usize,
    cols: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
) {
    // Only x86 has kernels of its own for this; elsewhere every path runs the loop below.
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    let _ = path;
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if path.runs_avx2() && path.is_available() {
        // SAFETY: AVX2 is available; the body only indexes slices (bounds-checked).
        unsafe { avx2::scores_transposed(q, dim, kt, stride, cols, scale, out) };
        return;
    }
    scores_transposed_body(q, dim, kt, stride, cols, scale, out);
}

/// Attention's weighted sum of values (see [`weighted_sum`]) on a chosen path;
/// bit-identical on every path, as [`scores_transposed_with_path`].
pub fn weighted_sum_with_path(path: KernelPath, y: &mut [f32], w: &[f32], xs: &[f32]) {
    // Only x86 has kernels of its own for this; elsewhere every path runs the loop below.
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    let _ = path;
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if path.runs_avx2() && path.is_available() {
        // SAFETY: AVX2 is available; the body only indexes slices (bounds-checked).
        unsafe { avx2::weighted_sum(y, w, xs) };
        return;
    }
    weighted_sum_body(y, w, xs);
}

/// Attention's weighted sum of several rows (see [`weighted_sum_rows`]) on a chosen path;
/// bit-identical on every path, and to [`weighted_sum`] row by row.
pub fn weighted_sum_rows_with_path(
    path: KernelPath,
    ys: &mut [f32],
    ws: &[f32],
    xs: &[f32],
    dim: usize,
) {
    // Only x86 has kernels of its own for this; elsewhere every path runs the loop below.
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    let _ = path;
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if path.runs_avx2() && path.is_available() {
        // SAFETY: AVX2 is available; the body only indexes slices (bounds-checked).
        unsafe { avx2::weighted_sum_rows(ys, ws, xs, dim) };
        return;
    }
    weighted_sum_rows_body(ys, ws, xs, dim);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    /// Transposes `rows` runs of `dim` values into `dim` runs of `stride` values
    /// (`dst[d][r] = src[r][d]`), for [`scores_transposed`].
    fn transpose_into(src: &[f32], dim: usize, dst: &mut [f32], stride: usize) {
        for (r, row) in src.chunks_exact(dim).enumerate() {
            for (d, &v) in row.iter().enumerate() {
                dst[d * stride + r] = v;
            }
        }
    }

    #[test]
    fn transposed_scores_and_weighted_sum_match_their_one_row_forms() {
        for dim in [1usize, 7, 16, 64] {
            for n_keys in [1usize, 5, 8, 19] {
                let keys: Vec<f32> = (0..n_keys * dim).map(|i| (i as f32 * 0.37).cos()).collect();
                let stride = n_keys + 3;
                let mut kt = vec![0f32; dim * stride];
                transpose_into(&keys, dim, &mut kt, stride);
                for rows in [1, 2, 3, 4, 5, 6, 8, 9, 13] {
                    let q: Vec<f32> = (0..rows * dim).map(|i| (i as f32 * 0.3).sin()).collect();
                    let cols = 1.min(n_keys - 1)..n_keys;
                    let mut out = vec![0f32; rows * cols.len()];
                    scores_transposed(&q, dim, &kt, stride, cols.clone(), 0.5, &mut out);
                    for r in 0..rows {
                        for (j, key) in cols.clone().enumerate() {
                            let qr = &q[r * dim..(r + 1) * dim];
                            let exact = 0.5 * dot(qr, &keys[key * dim..(key + 1) * dim]);
                            let got = out[r * cols.len() + j];
                            assert!(
                                close(got, exact, 1e-5),
                                "dim {dim} keys {n_keys} rows {rows}"
                            );
                            // The same score computed alone is bit-identical.
                            let mut single = [0f32];
                            scores_transposed(qr, dim, &kt, stride, key..key + 1, 0.5, &mut single);
                            assert_eq!(single[0], got);
                        }
                    }
                }
            }
        }
        for n in [1usize, 7, 8, 16, 67] {
            for rows in [1usize, 4, 6] {
                let w: Vec<f32> = (0..rows).map(|j| 0.1 + j as f32).collect();
                let xs: Vec<f32> = (0..rows * n).map(|i| (i as f32 * 0.13).sin()).collect();
                let mut y = vec![0.5f32; n];
                weighted_sum(&mut y, &w, &xs);
                let mut expected = vec![0.5f32; n];
                for (j, &wj) in w.iter().enumerate() {
                    super::super::math::axpy(&mut expected, wj, &xs[j * n..(j + 1) * n]);
                }
                for (a, b) in y.iter().zip(&expected) {
                    assert!(close(*a, *b, 1e-5), "n = {n}, rows = {rows}");
                }
            }
        }
    }
}

//! Decode attention straight from the f16 KV cache, with AVX2 + F16C.
//!
//! `attention::scores_transposed` and `weighted_sum` take f32 keys and values, so attention
//! widens each cache block first. That pays when a prompt's many queries share the block; a
//! decode step has one token (a few query heads), and the separate widening pass, which writes
//! the block out and reads it back, cost as much as the arithmetic. These kernels widen eight
//! values at a time in registers as they read them and otherwise do the very operations of the
//! f32 bodies in the same order (mul then add, no FMA, the same summation order per output),
//! so results are bit-identical: widening f16 to f32 is exact.
//!
//! On the AVX-512 path the weighted sum of many rows takes sixteen columns per 512-bit register
//! ([`weighted_sum_rows_f16_wide`]): each broadcast weight then serves twice the columns, 1.5×
//! the speed of the 256-bit strips in `attention_bench`, 1.05× a 2048-token SmolLM2 prompt.
//! The scores take sixteen keys per register the same way ([`scores_transposed_f16_wide`]; a
//! prompt's rows in runs of 64 keys): 1.27× the 256-bit kernel's prompt scores in
//! `attention_bench` on an Intel Emerald Rapids VM.
//!
//! Every function here is `unsafe` because it must only run where `avx2::available` is true
//! (`avx512::available` for the wide ones).
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

/// Eight f16 at `p`, widened.
#[inline(always)]
unsafe fn widen8(p: *const f16) -> __m256 {
    // SAFETY: the caller guarantees 8 readable values at `p`.
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

/// One f16, widened.
#[inline(always)]
unsafe fn widen1(v: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(v.to_bits()))))
}

/// `out[r][j] = scale · Σ_d q[r][d] · kt[d][cols.start + j]`, as `attention::scores_transposed`
/// computes it, with `kt` in f16.
///
/// # Safety
/// The CPU must support AVX2 and F16C. Shapes are checked (a mismatch panics).
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn scores_transposed_f16(
    q: &[f32],
    dim: usize,
    kt: &[f16],
    stride: usize,
    cols: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
) {
    let (rows, n) = scores_shape(q, dim, kt, stride, &cols, out);
    let args = (q, dim, kt, stride, cols.start, scale);
    scores_from(args, rows, out, n, 0);
}

/// [`scores_transposed_f16`] on AVX-512: sixteen keys per 512-bit register while whole runs of
/// them remain (each broadcast query value and each add then serves twice the keys), then the
/// rest as the AVX2 kernel does it. Every score is still its own lane's chain of a multiply
/// then an add per `d`, in order, so the bits are the same.
///
/// # Safety
/// The CPU must pass `avx512::available`. Shapes are checked (a mismatch panics).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn scores_transposed_f16_wide(
    q: &[f32],
    dim: usize,
    kt: &[f16],
    stride: usize,
    cols: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
) {
    let (rows, n) = scores_shape(q, dim, kt, stride, &cols, out);
    let args = (q, dim, kt, stride, cols.start, scale);
    // Independent chains per row as in the AVX2 kernel, with 32 registers to hold them: one
    // row takes a whole 64-key block at once (four chains), more rows two registers each.
    let mut j = 0;
    match rows {
        0 => {}
        1 => score_rows::<__m512, 1, 4>(args, out, n, &mut j),
        2 => score_rows::<__m512, 2, 2>(args, out, n, &mut j),
        3 => score_rows::<__m512, 3, 2>(args, out, n, &mut j),
        4 => score_rows::<__m512, 4, 2>(args, out, n, &mut j),
        _ => {
            prompt_score_runs::<__m512, 4>(args, rows, out, n, &mut j);
            prompt_score_runs::<__m512, 2>(args, rows, out, n, &mut j);
        }
    }
    scores_from(args, rows, out, n, j);
}

/// `(rows, n)` of a score kernel's inputs, checked: `out` holds `rows × n` scores, `q` whole
/// rows of `dim`, and `kt` every row's columns `cols`.
fn scores_shape(
    q: &[f32],
    dim: usize,
    kt: &[f16],
    stride: usize,
    cols: &std::ops::Range<usize>,
    out: &[f32],
) -> (usize, usize) {
    let rows = q.len() / dim.max(1);
    let n = cols.len();
    assert!(
        out.len() == rows * n
            && q.len() == rows * dim
            && (dim == 0 || (dim - 1) * stride + cols.end <= kt.len())
    );
    (rows, n)
}

/// The AVX2 kernel's scores of all `rows` against the keys from `j` to `n`.
#[inline(always)]
unsafe fn scores_from(args: ScoreArgs<'_>, rows: usize, out: &mut [f32], n: usize, j: usize) {
    let (q, dim, kt, stride, first_col, scale) = args;
    // Each score is a chain of `dim` dependent adds; several runs of keys at once give the CPU
    // independent chains to overlap (as many as the sixteen registers hold).
    let mut j = j;
    match rows {
        0 => {}
        1 => score_rows::<__m256, 1, 4>(args, out, n, &mut j),
        2 => score_rows::<__m256, 2, 4>(args, out, n, &mut j),
        3 => score_rows::<__m256, 3, 3>(args, out, n, &mut j),
        4 => score_rows::<__m256, 4, 2>(args, out, n, &mut j),
        _ => prompt_score_runs::<__m256, 2>(args, rows, out, n, &mut j),
    }
    // What is left of the keys: runs of 8, then the last few (fewer than eight).
    let mut r0 = 0;
    while r0 < rows {
        let nr = (rows - r0).min(4);
        let q = &q[r0 * dim..(r0 + nr) * dim];
        let (args, out) = ((q, dim, kt, stride, first_col, scale), &mut out[r0 * n..]);
        match nr {
            1 => score_rest::<1>(args, out, n, j),
            2 => score_rest::<2>(args, out, n, j),
            3 => score_rest::<3>(args, out, n, j),
            _ => score_rest::<4>(args, out, n, j),
        }
        r0 += nr;
    }
}

/// Scores of exactly `R` rows against the keys from `j` to `n`: runs of eight, then the last
/// keys in one more run of eight ([`score_last_keys`]).
#[inline(always)]
unsafe fn score_rest<const R: usize>(args: ScoreArgs<'_>, out: &mut [f32], n: usize, j: usize) {
    let mut j = j;
    score_rows::<__m256, R, 1>(args, out, n, &mut j);
    if j < n {
        score_last_keys::<R>(args, out, n, j);
    }
}

/// Scores of exactly `R` rows against the last `n − j` keys (fewer than eight), eight keys at
/// a time all the same: one key at a time, each score's chain of `dim` dependent adds ran
/// alone, about a quarter of a SmolLM2 prompt's time in the scores (`perf`).
/// - With eight keys or more in all, the run of the last eight: it scores some keys again,
///   with the same operations, so they get the same bits again.
/// - Otherwise, eight columns of `kt` around the keys, where each row holds them (the KV
///   cache's blocks are 64 columns wide): the lanes of the other columns are dropped.
/// - Otherwise (narrow test inputs), one key at a time.
#[inline(always)]
unsafe fn score_last_keys<const R: usize>(
    args: ScoreArgs<'_>,
    out: &mut [f32],
    n: usize,
    j: usize,
) {
    let (q, dim, kt, stride, first_col, scale) = args;
    if n >= 8 {
        // SAFETY: keys n − 8..n lie within the caller's checked columns.
        score_run::<__m256, R, 1>(args, out, n, n - 8);
        return;
    }
    // n < 8, so j == 0: the run covers columns first_col..first_col + n.
    let start = first_col.min(stride.saturating_sub(8));
    let fits = stride >= 8 && first_col + n <= start + 8;
    if fits && dim > 0 && (dim - 1) * stride + start + 8 <= kt.len() {
        let mut run = [0f32; 8 * 4];
        // SAFETY: row d's columns start..start + 8 end at or before (dim − 1) · stride +
        // start + 8 <= kt.len() (checked just above); `run` holds R ≤ 4 rows of eight.
        score_run::<__m256, R, 1>((q, dim, kt, stride, start, scale), &mut run, 8, 0);
        let lane = first_col - start;
        for r in 0..R {
            // Element by element, up to a fixed eight: a copy of `n` would call `memcpy`.
            for i in 0..8 {
                if i < n {
                    out[r * n + i] = run[r * 8 + lane + i];
                }
            }
        }
        return;
    }
    for j in j..n {
        for r in 0..R {
            let mut acc = 0f32;
            for d in 0..dim {
                acc += q[r * dim + d] * widen1(kt[d * stride + first_col + j]);
            }
            out[r * n + j] = acc * scale;
        }
    }
}

/// A score kernel's inputs: the query rows, `dim`, the f16 keys, their stride, the first key's
/// column and the scale.
type ScoreArgs<'a> = (&'a [f32], usize, &'a [f16], usize, usize, f32);

/// A prompt's rows (more than four), in runs of `2·V::LANES` keys from `*j` while whole runs
/// remain, advancing `*j`: keys in the outer loop and rows, four at a time, in the inner one,
/// so that every row reads each strip of keys (`dim × 2·V::LANES` f16) while it is in L1.
#[inline(always)]
unsafe fn prompt_score_runs<V: F32Lanes, const KB: usize>(
    (q, dim, kt, stride, first_col, scale): ScoreArgs<'_>,
    rows: usize,
    out: &mut [f32],
    n: usize,
    j: &mut usize,
) {
    while *j + KB * V::LANES <= n {
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(4);
            let q = &q[r0 * dim..(r0 + nr) * dim];
            let (args, out) = ((q, dim, kt, stride, first_col, scale), &mut out[r0 * n..]);
            match nr {
                1 => score_run::<V, 1, KB>(args, out, n, *j),
                2 => score_run::<V, 2, KB>(args, out, n, *j),
                3 => score_run::<V, 3, KB>(args, out, n, *j),
                _ => score_run::<V, 4, KB>(args, out, n, *j),
            }
            r0 += nr;
        }
        *j += KB * V::LANES;
    }
}

/// Runs of `V::LANES·KB` keys from `*j` while whole runs remain, advancing `*j`, for exactly
/// `R` rows (bounds checked by the caller).
#[inline(always)]
unsafe fn score_rows<V: F32Lanes, const R: usize, const KB: usize>(
    args: ScoreArgs<'_>,
    out: &mut [f32],
    n: usize,
    j: &mut usize,
) {
    while *j + V::LANES * KB <= n {
        score_run::<V, R, KB>(args, out, n, *j);
        *j += V::LANES * KB;
    }
}

/// Scores of `R` rows against the `V::LANES·KB` keys from `j`: each score summed over `d` in
/// order, one product at a time, as the f32 body does, whatever the register width.
#[inline(always)]
unsafe fn score_run<V: F32Lanes, const R: usize, const KB: usize>(
    (q, dim, kt, stride, first_col, scale): ScoreArgs<'_>,
    out: &mut [f32],
    n: usize,
    j: usize,
) {
    let (qp, kp) = (q.as_ptr(), kt.as_ptr());
    let mut acc = [[V::zero(); KB]; R];
    for d in 0..dim {
        let base = kp.add(d * stride + first_col + j);
        let mut k = [V::zero(); KB];
        for (b, k) in k.iter_mut().enumerate() {
            // SAFETY: d · stride + first_col + j + LANES·KB <= kt.len() (checked by the caller).
            *k = V::widen(base.add(V::LANES * b));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: r · dim + d < q.len().
            let qd = V::splat(qp.add(r * dim + d));
            for (acc, k) in acc.iter_mut().zip(&k) {
                *acc = acc.add(qd.mul(*k));
            }
        }
    }
    let scale = [scale];
    for (r, acc) in acc.iter().enumerate() {
        for (b, acc) in acc.iter().enumerate() {
            let dst = out[r * n + j + V::LANES * b..][..V::LANES].as_mut_ptr();
            // SAFETY: `dst` is one register's writable f32, `scale` one readable f32.
            acc.mul(V::splat(scale.as_ptr())).store(dst);
        }
    }
}

/// `y += Σ_j w[j] · x_j` over f16 rows `x_j` of `y.len()` values, as `attention::weighted_sum`
/// computes it: four rows at a time (`((w0·a + w1·b) + w2·c) + w3·d` added to `y`), then the
/// remaining rows one at a time.
///
/// # Safety
/// The CPU must support AVX2 and F16C. Shapes are checked (a mismatch panics).
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn weighted_sum_f16(y: &mut [f32], w: &[f32], xs: &[f16]) {
    let dim = y.len();
    assert_eq!(xs.len(), w.len() * dim);
    let fours = w.len() / 4 * 4;
    let mut i = 0;
    // Each output is a chain of dependent adds over the rows; four runs of eight outputs at
    // once give the CPU independent chains to overlap.
    weighted_run::<4>(y, w, xs, fours, &mut i);
    weighted_run::<1>(y, w, xs, fours, &mut i);
    for (i, y) in y.iter_mut().enumerate().skip(i) {
        one_output(y, w, xs, dim, i);
    }
}

/// Output `i` of a weighted sum over f16 rows of `dim` values, alone: four rows at a time
/// (`((w0·a + w1·b) + w2·c) + w3·d` added to `y`), then the rest one at a time.
#[inline(always)]
unsafe fn one_output(y: &mut f32, w: &[f32], xs: &[f16], dim: usize, i: usize) {
    let fours = w.len() / 4 * 4;
    let mut j = 0;
    while j < fours {
        let (a, b) = (widen1(xs[j * dim + i]), widen1(xs[(j + 1) * dim + i]));
        let (c, d) = (widen1(xs[(j + 2) * dim + i]), widen1(xs[(j + 3) * dim + i]));
        *y += w[j] * a + w[j + 1] * b + w[j + 2] * c + w[j + 3] * d;
        j += 4;
    }
    for (j, &wj) in w.iter().enumerate().skip(fours) {
        *y += wj * widen1(xs[j * dim + i]);
    }
}

/// [`weighted_sum_f16`] for runs of `8·IB` outputs from `*i` while whole runs remain,
/// advancing `*i`, each output with `attention::weighted_sum`'s operations in its order.
#[inline(always)]
unsafe fn weighted_run<const IB: usize>(
    y: &mut [f32],
    w: &[f32],
    xs: &[f16],
    fours: usize,
    i: &mut usize,
) {
    let dim = y.len();
    let xp = xs.as_ptr();
    while *i + 8 * IB <= dim {
        let yp = y[*i..*i + 8 * IB].as_mut_ptr();
        let mut acc = [_mm256_setzero_ps(); IB];
        for (b, acc) in acc.iter_mut().enumerate() {
            // SAFETY: `yp` is 8·IB readable f32.
            *acc = _mm256_loadu_ps(yp.add(8 * b));
        }
        // SAFETY (all loads below): row j has `dim` values from `j · dim`, and
        // `*i + 8·IB <= dim`, so every load is within `xs`.
        let mut j = 0;
        while j < fours {
            let base = xp.add(j * dim + *i);
            let (w0, w1) = (_mm256_set1_ps(w[j]), _mm256_set1_ps(w[j + 1]));
            let (w2, w3) = (_mm256_set1_ps(w[j + 2]), _mm256_set1_ps(w[j + 3]));
            for (b, acc) in acc.iter_mut().enumerate() {
                let at = base.add(8 * b);
                let mut t = _mm256_mul_ps(w0, widen8(at));
                t = _mm256_add_ps(t, _mm256_mul_ps(w1, widen8(at.add(dim))));
                t = _mm256_add_ps(t, _mm256_mul_ps(w2, widen8(at.add(2 * dim))));
                t = _mm256_add_ps(t, _mm256_mul_ps(w3, widen8(at.add(3 * dim))));
                *acc = _mm256_add_ps(*acc, t);
            }
            j += 4;
        }
        for (j, &wj) in w.iter().enumerate().skip(fours) {
            let wj = _mm256_set1_ps(wj);
            for (b, acc) in acc.iter_mut().enumerate() {
                let x = widen8(xp.add(j * dim + *i + 8 * b));
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(wj, x));
            }
        }
        for (b, acc) in acc.iter().enumerate() {
            // SAFETY: `yp` is 8·IB writable f32.
            _mm256_storeu_ps(yp.add(8 * b), *acc);
        }
        *i += 8 * IB;
    }
}

/// `ys[r] += Σ_j ws[r][j] · x_j` for each row `r` of `ys` (runs of `dim` values) over f16 rows
/// `x_j`, as `attention::weighted_sum_rows` computes it (each output with `weighted_sum`'s
/// operations in its order). Eight columns at a time in the outer loop and rows, four at a
/// time, in the inner one: each widened load of values serves four rows, and a strip of eight
/// columns (`n × 16` bytes) stays in L1 while every row reads it.
///
/// # Safety
/// The CPU must support AVX2 and F16C. Shapes are checked (a mismatch panics).
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn weighted_sum_rows_f16(ys: &mut [f32], ws: &[f32], xs: &[f16], dim: usize) {
    let Some((rows, n)) = weighted_sum_shape(ys, ws, xs, dim) else {
        return;
    };
    sum_columns_from(ys, ws, xs, dim, rows, n, 0);
}

/// The rows and keys of a weighted sum of many rows, `None` when there are no rows; panics
/// unless `ys`, `ws` and `xs` hold whole rows of them.
fn weighted_sum_shape(ys: &[f32], ws: &[f32], xs: &[f16], dim: usize) -> Option<(usize, usize)> {
    let rows = ys.len() / dim.max(1);
    if rows == 0 {
        return None;
    }
    let n = ws.len() / rows;
    assert!(ys.len() == rows * dim && ws.len() == rows * n && xs.len() == n * dim);
    Some((rows, n))
}

/// [`weighted_sum_rows_f16`] for the columns from `c` (shapes checked by the caller): strips of
/// eight, then one column at a time.
#[inline(always)]
unsafe fn sum_columns_from(
    ys: &mut [f32],
    ws: &[f32],
    xs: &[f16],
    dim: usize,
    rows: usize,
    n: usize,
    c: usize,
) {
    let c = strips_from::<__m256>(ys, ws, xs, dim, rows, n, c);
    for i in c..dim {
        for (y, w) in ys.chunks_exact_mut(dim).zip(ws.chunks_exact(n.max(1))) {
            one_output(&mut y[i], w, xs, dim, i);
        }
    }
}

/// Strips of `V`'s width from column `c` while whole ones fit, rows four at a time (shapes
/// checked by the caller); returns the first column left.
#[inline(always)]
unsafe fn strips_from<V: F32Lanes>(
    ys: &mut [f32],
    ws: &[f32],
    xs: &[f16],
    dim: usize,
    rows: usize,
    n: usize,
    mut c: usize,
) -> usize {
    while c + V::LANES <= dim {
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(4);
            let (ys, ws) = (&mut ys[r0 * dim..], &ws[r0 * n..(r0 + nr) * n]);
            match nr {
                1 => sum_strip::<V, 1>(ys, ws, xs, dim, n, c),
                2 => sum_strip::<V, 2>(ys, ws, xs, dim, n, c),
                3 => sum_strip::<V, 3>(ys, ws, xs, dim, n, c),
                _ => sum_strip::<V, 4>(ys, ws, xs, dim, n, c),
            }
            r0 += nr;
        }
        c += V::LANES;
    }
    c
}

/// A register of f32 lanes for [`sum_strip`]: 256-bit on AVX2, 512-bit on AVX-512. The methods
/// are `unsafe` as the intrinsics are: the caller runs them where the instruction set is
/// available, with pointers valid for one register's lanes.
trait F32Lanes: Copy {
    /// Columns per register.
    const LANES: usize;
    /// As many f16 at `p` as the register has lanes, widened.
    unsafe fn widen(p: *const f16) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `*p` in every lane.
    unsafe fn splat(p: *const f32) -> Self;
    /// Zero in every lane.
    unsafe fn zero() -> Self;
    unsafe fn mul(self, other: Self) -> Self;
    unsafe fn add(self, other: Self) -> Self;
}

impl F32Lanes for __m256 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn widen(p: *const f16) -> Self {
        widen8(p)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self)
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        _mm256_broadcast_ss(&*p)
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn mul(self, other: Self) -> Self {
        _mm256_mul_ps(self, other)
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        _mm256_add_ps(self, other)
    }
}

#[cfg(target_arch = "x86_64")]
impl F32Lanes for __m512 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn widen(p: *const f16) -> Self {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self)
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        _mm512_set1_ps(*p)
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn mul(self, other: Self) -> Self {
        _mm512_mul_ps(self, other)
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        _mm512_add_ps(self, other)
    }
}

/// [`weighted_sum_rows_f16`] for exactly `R` rows (`ws` holds their `n` weights each) and the
/// `V::LANES` columns from `c`, eight or sixteen (bounds checked by the caller). Each
/// lane performs `attention::weighted_sum`'s operations for its column, whatever the width.
#[inline(always)]
unsafe fn sum_strip<V: F32Lanes, const R: usize>(
    ys: &mut [f32],
    ws: &[f32],
    xs: &[f16],
    dim: usize,
    n: usize,
    c: usize,
) {
    let (yp, wp, xp) = (ys.as_mut_ptr(), ws.as_ptr(), xs.as_ptr().add(c));
    // SAFETY: row r's outputs from c, one register's worth, lie within `ys`.
    let mut acc: [V; R] = std::array::from_fn(|r| V::load(yp.add(r * dim + c)));
    // SAFETY (all loads below): value row j has `dim` values from `j · dim`,
    // one register's columns from c lie within `dim` and j < n, so every load is within `xs`; weight (r, j) is at
    // r · n + j < ws.len().
    let fours = n / 4 * 4;
    let mut j = 0;
    while j < fours {
        let at = xp.add(j * dim);
        let (a, b) = (V::widen(at), V::widen(at.add(dim)));
        let (x2, x3) = (V::widen(at.add(2 * dim)), V::widen(at.add(3 * dim)));
        for (r, acc) in acc.iter_mut().enumerate() {
            let w = wp.add(r * n + j);
            let mut t = V::splat(w).mul(a);
            t = t.add(V::splat(w.add(1)).mul(b));
            t = t.add(V::splat(w.add(2)).mul(x2));
            t = t.add(V::splat(w.add(3)).mul(x3));
            *acc = acc.add(t);
        }
        j += 4;
    }
    while j < n {
        let x = V::widen(xp.add(j * dim));
        for (r, acc) in acc.iter_mut().enumerate() {
            *acc = acc.add(V::splat(wp.add(r * n + j)).mul(x));
        }
        j += 1;
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: as the loads above.
        acc.store(yp.add(r * dim + c));
    }
}

/// [`weighted_sum_rows_f16`] on AVX-512: strips of sixteen columns in 512-bit registers (each
/// broadcast weight serves twice the columns), then the rest as the AVX2 kernel does them.
/// Every lane performs the same operations in the same order, so the bits are the same.
///
/// # Safety
/// The CPU must pass `avx512::available`. Shapes are checked (a mismatch panics).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn weighted_sum_rows_f16_wide(
    ys: &mut [f32],
    ws: &[f32],
    xs: &[f16],
    dim: usize,
) {
    let Some((rows, n)) = weighted_sum_shape(ys, ws, xs, dim) else {
        return;
    };
    let c = strips_from::<__m512>(ys, ws, xs, dim, rows, n, 0);
    // The last columns (fewer than sixteen) as the AVX2 kernel does them.
    sum_columns_from(ys, ws, xs, dim, rows, n, c);
}

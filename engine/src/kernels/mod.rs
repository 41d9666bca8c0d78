//! Compute kernels over quantized weights used in place.
//!
//! The contract the models are written against:
//! - [`WeightMatrix`]: a 2-D weight in GGUF layout (`rows` rows of `cols` elements, each row a
//!   run of `ty` blocks), borrowed from the file mapping. Never dequantized as a whole.
//! - [`matmul`]: `y[t][r] = Σ_c W[r][c] · x[t][c]` for `n_tokens` activation rows at once
//!   (mat-vec when `n_tokens == 1`), split across a [`ThreadPool`].
//!
//! # How the quantized kernels compute
//!
//! Like ggml, the activations are quantized once per call to 8 bits per 32 values (an f32
//! scale per chunk, see `decoded::QuantizedActivations`) and every weight block is used in place
//! as small integers: integer dot products (`vpdpbusd`, `maddubs`, `sdot`) do the bulk of the work,
//! which is what makes prefill compute-bound rather than float-bound. Each weight type only has
//! to *decode* its blocks into one common form (`decoded`: 32 small integers with per-16 scales
//! and offsets), so one integer kernel serves all twelve block types:
//!
//! - **Mat-mat** (`n_tokens > 1`): a block of rows (~192 KB decoded) is decoded once into a
//!   per-thread buffer, then L2-sized blocks of tokens sweep across it. On x86 (`lanes`) eight
//!   rows share each register, row `r` in lane `r`, and sweeps of up to four tokens reuse each
//!   decoded chunk; each chunk's products are summed in integers and scaled once. The portable
//!   and NEON paths run a 4-row × 2-token tile over row-major decoded chunks. The decode is paid
//!   once per weight per call.
//! - **Mat-vec** (`n_tokens` ≤ 8: decode steps of one or a few sequences): nothing is reused,
//!   so on x86 models keep their quantized matrices (every block type, where the row count
//!   is a multiple of eight) in an interleaved layout ([`ArenaWeights`]: eight rows' blocks
//!   side by side), whose records are unpacked in registers and consumed at once, with
//!   software prefetch, streaming the weights once — accumulating every output in exactly the
//!   tile's order, so a token's result is bit-identical whichever kernel computed it and a
//!   sequence's logits cannot depend on what else is in its batch. (Other matrices decode
//!   eight rows' GGUF blocks into L1 and transpose them in registers; the portable and scalar
//!   paths use the mat-mat loops for every token count.)
//!
//! The numerics differ from an exact f32 dot product only by the activation rounding: each
//! activation moves by at most half a quantization step `dx/2 = max|x_chunk|/254`, so
//! `|fast − exact| ≤ Σ_chunks (dx/2)·Σ|w|` plus f32 summation error. The weights' own values are
//! used exactly. [`matmul_reference`] keeps the exact-f32 computation for tests.
//!
//! F32, F16 and BF16 weights are not quantized further: rows are widened to f32 in the buffer
//! and multiplied in f32 with FMA.
//!
//! # Paths
//!
//! [`KernelPath`]: `Avx512` (x86-64 with AVX-512 F/BW/VL/VNNI besides AVX2: VNNI's
//! `vpdpbusd` in the quantized kernels of `lanes`, a two-tokens-per-register float tile; see
//! `avx512`), `Avx2` (x86-64 with AVX2, FMA, F16C: `maddubs` in the same `lanes` kernels),
//! `Neon` (arm64 with the dot product extension: `sdot` in the quantized tiles, see `neon`;
//! the portable kernels for the rest, and the portable path's bits), all chosen at run time
//! with detection cached, `Portable` (plain Rust with fixed-width lane arrays that the compiler
//! vectorizes for any target, e.g. NEON on arm64), and `Scalar` (straightforward loops: the
//! twin the others are tested against). [`matmul`] uses [`KernelPath::best`]; `EGPU_KERNELS=scalar|portable|neon|avx2|avx512`
//! overrides it (for benchmarks and bisecting numerical differences). The two x86 paths give
//! the same bits (their integer sums are exact, their float operations the same). The x86
//! quantized kernels sum each block in integers before scaling it, the portable ones scale
//! each half, so x86 and the other paths agree within the summation-error bound, not bit for
//! bit; within a path every kernel gives the same bits for a token (batch invariance).
//!
//! # Threads
//!
//! Output rows are split into parts of whole tiles that the [`ThreadPool`]'s threads claim as
//! they come free (a few parts per thread, so that a thread slowed by other processes on a
//! shared machine delays little). Every output value is computed by one thread with the same
//! sequence of operations whatever the split, so results are bit-identical for any thread
//! count. Small matmuls run on the calling thread alone: below some work the hand-off costs
//! more than it saves.
//!
//! `unsafe` here: calls into the `avx2` module (guarded by run-time detection) and writes of
//! output values from several threads at disjoint indices (`SharedOutput`).
#![allow(unsafe_code)]

mod arena;
pub mod attention;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod avx2;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod avx2_attention;
#[cfg(target_arch = "x86_64")]
mod avx2_interleaved;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod decoded;
mod interleaved;
#[cfg(target_arch = "x86_64")]
mod lanes;
pub mod math;
#[cfg(target_arch = "aarch64")]
mod neon;
mod pool;
mod portable;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::sync::{Mutex, OnceLock};

use crate::gguf::{GgufFile, TensorInfo};
use crate::quant::{dequantize_to_f32, GgmlType};
pub(crate) use arena::copy_rows_into;
pub use arena::{arena_layout, copy_to_arena_at_load, ArenaWeights, HugePageArena};
pub use attention::{
    has_f16_attention_kernels, online_softmax_step, scores_transposed, scores_transposed_f16,
    scores_transposed_f16_with_path, scores_transposed_with_path, weighted_sum_f16,
    weighted_sum_f16_with_path, weighted_sum_rows, weighted_sum_rows_f16,
    weighted_sum_rows_f16_with_path, weighted_sum_rows_with_path, weighted_sum_with_path,
};
use decoded::{DecodedChunk, QuantizedActivations, CHUNK};
pub(crate) use interleaved::{can_interleave, interleave_into};
pub use pool::ThreadPool;

/// Errors from setting up a kernel call. Shape errors here are programming errors in a model
/// or a malformed model file, reported instead of panicking.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("tensor {tensor:?}: {ty} is not supported by the compute kernels")]
    UnsupportedType { tensor: String, ty: GgmlType },
    #[error("tensor {tensor:?}: expected a 2-D weight, got dims {dims:?}")]
    NotAMatrix { tensor: String, dims: Vec<u64> },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("kernel path {0:?} is not available on this CPU")]
    PathUnavailable(KernelPath),
}

/// How a weight matrix's blocks are arranged in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// GGUF's: row after row, each a run of blocks.
    Rows,
    /// Eight rows' blocks interleaved, for the decode mat-vec ([`ArenaWeights`]).
    Interleaved8,
}

/// A weight matrix: borrowed from the mapping, or from the model's arena
/// ([`ArenaWeights::matrix`]), in either layout.
#[derive(Debug, Clone, Copy)]
pub struct WeightMatrix<'a> {
    pub ty: GgmlType,
    /// Output features (ggml `ne[1]`).
    pub rows: usize,
    /// Input features (ggml `ne[0]`), a multiple of the type's block size.
    pub cols: usize,
    pub data: &'a [u8],
    pub layout: Layout,
}

impl<'a> WeightMatrix<'a> {
    /// The 2-D tensor `info` of `file` (a 1-D tensor is one row).
    pub fn from_tensor(file: &'a GgufFile, info: &TensorInfo) -> Result<Self, KernelError> {
        let (cols, rows) = match info.dims.as_slice() {
            [c] => (*c, 1),
            [c, r] => (*c, *r),
            _ => {
                return Err(KernelError::NotAMatrix {
                    tensor: info.name.clone(),
                    dims: info.dims.clone(),
                })
            }
        };
        if !crate::quant::can_dequantize(info.ggml_type) {
            return Err(KernelError::UnsupportedType {
                tensor: info.name.clone(),
                ty: info.ggml_type,
            });
        }
        Ok(WeightMatrix::rows(
            info.ggml_type,
            rows as usize,
            cols as usize,
            file.tensor_data(info),
        ))
    }

    /// A matrix in GGUF layout.
    pub fn rows(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Self {
        WeightMatrix {
            ty,
            rows,
            cols,
            data,
            layout: Layout::Rows,
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// The blocks of row `r` of a [`Layout::Rows`] matrix (for either layout, use
    /// [`WeightMatrix::row_blocks`]).
    pub fn row(&self, r: usize) -> &'a [u8] {
        debug_assert_eq!(self.layout, Layout::Rows);
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// The blocks of row `r` in GGUF form, whatever the layout: borrowed for [`Layout::Rows`],
    /// gathered into `buf` for [`Layout::Interleaved8`].
    pub fn row_blocks<'b>(&'b self, r: usize, buf: &'b mut Vec<u8>) -> &'b [u8] {
        match self.layout {
            Layout::Rows => self.row(r),
            Layout::Interleaved8 => {
                let n = self.row_bytes();
                buf.resize(n, 0);
                let n_chunks = self.cols / self.ty.block_size();
                interleaved::row_blocks(self.ty, self.data, n_chunks, r, buf);
                buf
            }
        }
    }

    /// Row `r` dequantized to f32 (embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if r >= self.rows || out.len() != self.cols {
            return Err(KernelError::Shape(format!(
                "row {r} of {}×{} into {} values",
                self.rows,
                self.cols,
                out.len()
            )));
        }
        let mut buf = Vec::new();
        dequantize_to_f32(self.ty, self.row_blocks(r, &mut buf), out)
            .map_err(|e| KernelError::Shape(e.to_string()))
    }
}

/// Which implementation of the kernels runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Straightforward loops; the twin every faster path is tested against.
    Scalar,
    /// Plain Rust written for the compiler's auto-vectorizer; runs on any target.
    Portable,
    /// arm64 NEON with the `sdot` byte dot product for the quantized tiles (`neon`), the
    /// portable kernels for the rest; the portable path's bits exactly.
    Neon,
    /// x86-64 AVX2 + FMA + F16C intrinsics.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL, VNNI) for the integer dot products and the float tile, AVX2
    /// for the rest.
    Avx512,
}

impl KernelPath {
    /// Every path, fastest last.
    pub const ALL: [KernelPath; 5] = [
        KernelPath::Scalar,
        KernelPath::Portable,
        KernelPath::Neon,
        KernelPath::Avx2,
        KernelPath::Avx512,
    ];

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            KernelPath::Scalar | KernelPath::Portable => true,
            #[cfg(target_arch = "aarch64")]
            KernelPath::Neon => neon::available(),
            #[cfg(not(target_arch = "aarch64"))]
            KernelPath::Neon => false,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => avx2::available(),
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx2 => false,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => avx512::available(),
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx512 => false,
        }
    }

    /// Whether the path runs the AVX2 kernels (the AVX-512 path runs them for everything but
    /// the integer dot products). Only meaningful for an available path.
    fn runs_avx2(self) -> bool {
        matches!(self, KernelPath::Avx2 | KernelPath::Avx512)
    }

    /// The paths this CPU can run.
    pub fn available() -> Vec<KernelPath> {
        Self::ALL.into_iter().filter(|p| p.is_available()).collect()
    }

    /// The path [`matmul`] uses: `$EGPU_KERNELS` (`scalar`, `portable`, `neon`, `avx2` or `avx512`) when set to an
    /// available path, else the fastest available one. Decided once per process.
    pub fn best() -> KernelPath {
        static BEST: OnceLock<KernelPath> = OnceLock::new();
        *BEST.get_or_init(|| {
            let wanted = std::env::var("EGPU_KERNELS").ok().and_then(|name| {
                Self::ALL
                    .into_iter()
                    .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
            });
            let path = match wanted {
                Some(path) if path.is_available() => path,
                _ => Self::available()
                    .last()
                    .copied()
                    .unwrap_or(KernelPath::Scalar),
            };
            path
        })
    }

    /// The prefill tile kernel this path runs, for benchmarks (`egpu_bench`).
    pub fn tile_kernel(self) -> &'static str {
        match self {
            KernelPath::Avx2 => "avx2-rows-in-lanes",
            KernelPath::Avx512 => "avx512-rows-in-lanes",
            _ => self.name(),
        }
    }

    /// Lower-case name, as `$EGPU_KERNELS` spells it.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Portable => "portable",
            KernelPath::Neon => "neon",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512 => "avx512",
        }
    }
}

/// Whether a model should keep its weights of type `ty` interleaved ([`ArenaWeights`]):
/// where the AVX2 or AVX-512 mat-vec runs, which is what the layout is for. Other paths would only gather
/// every row back. `EGPU_WEIGHT_LAYOUT=rows` keeps GGUF's layout (to compare the two).
pub fn interleave_at_load(ty: GgmlType) -> bool {
    static ROWS_ONLY: OnceLock<bool> = OnceLock::new();
    let rows_only = *ROWS_ONLY.get_or_init(|| {
        std::env::var("EGPU_WEIGHT_LAYOUT").is_ok_and(|v| v.trim().eq_ignore_ascii_case("rows"))
    });
    !rows_only && KernelPath::best().runs_avx2() && interleaved::has_interleaved_form(ty)
}

/// Whether [`matmul`] supports weights of type `ty`.
pub fn is_supported(ty: GgmlType) -> bool {
    decoded::is_block_quantized(ty) || is_float(ty)
}

fn is_float(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// `y[t*rows + r] = Σ_c W[r][c] · x[t*cols + c]` for `t < n_tokens`, on the fastest path.
///
/// Quantized weights are multiplied by 8-bit-quantized activations (see the module docs for the
/// error this adds); float weights in f32.
pub fn matmul(
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    matmul_with_path(pool, w, x, n_tokens, y, KernelPath::best())
}

/// [`matmul`] on a chosen path (tests and benchmarks compare them).
pub fn matmul_with_path(
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    path: KernelPath,
) -> Result<(), KernelError> {
    check_shapes(w, x, n_tokens, y)?;
    if !path.is_available() {
        return Err(KernelError::PathUnavailable(path));
    }
    if n_tokens == 0 || w.rows == 0 {
        return Ok(());
    }
    if decoded::is_block_quantized(w.ty) {
        with_scratch(&ACTIVATIONS, |acts| {
            quantize_activations(pool, path, x, n_tokens, w.cols, acts);
            run_quantized(pool, path, w, acts, n_tokens, y);
        });
    } else if is_float(w.ty) {
        run_float(pool, path, w, x, n_tokens, y);
    } else {
        return Err(KernelError::UnsupportedType {
            tensor: String::new(),
            ty: w.ty,
        });
    }
    Ok(())
}

/// [`matmul`] of several weights by the same activations — a layer's Q, K and V projections,
/// or its gate and up projections — quantizing the activations once instead of once per weight:
/// `ys[i][t*rows_i + r] = Σ_c W_i[r][c] · x[t*cols + c]`. Every weight must have `cols`
/// columns; types may differ. Results are identical to separate [`matmul`] calls.
pub fn matmul_shared_input(
    pool: &ThreadPool,
    ws: &[&WeightMatrix],
    x: &[f32],
    n_tokens: usize,
    ys: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    let path = KernelPath::best();
    if ws.len() != ys.len() {
        return Err(KernelError::Shape(format!(
            "{} weights but {} outputs",
            ws.len(),
            ys.len()
        )));
    }
    for (w, y) in ws.iter().zip(ys.iter_mut()) {
        check_shapes(w, x, n_tokens, y)?;
        if !is_supported(w.ty) {
            return Err(KernelError::UnsupportedType {
                tensor: String::new(),
                ty: w.ty,
            });
        }
    }
    if n_tokens == 0 {
        return Ok(());
    }
    let cols = ws.first().map_or(0, |w| w.cols);
    let any_quantized = ws.iter().any(|w| decoded::is_block_quantized(w.ty));
    with_scratch(&ACTIVATIONS, |acts| {
        if any_quantized {
            quantize_activations(pool, path, x, n_tokens, cols, acts);
        }
        #[cfg(target_arch = "x86_64")]
        if path.runs_avx2()
            && n_tokens <= MAX_MATVEC_TOKENS
            && ws.iter().all(|w| w.layout == Layout::Interleaved8)
        {
            run_interleaved_together(pool, path, ws, acts, n_tokens, ys);
            return;
        }
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            if w.rows == 0 {
                continue;
            }
            if decoded::is_block_quantized(w.ty) {
                run_quantized(pool, path, w, acts, n_tokens, y);
            } else {
                run_float(pool, path, w, x, n_tokens, y);
            }
        }
    });
    Ok(())
}

/// Decode mat-vecs of several interleaved matrices by the same activations as one job, whose
/// parts span all their row groups: a small matrix (a K or V projection) then shares the
/// threads instead of running on one while the others wait, and the pool is handed one job
/// instead of several. Each output is computed exactly as by a separate call.
#[cfg(target_arch = "x86_64")]
fn run_interleaved_together(
    pool: &ThreadPool,
    path: KernelPath,
    ws: &[&WeightMatrix],
    acts: &QuantizedActivations,
    n_tokens: usize,
    ys: &mut [&mut [f32]],
) {
    let outs: Vec<SharedOutput> = ys.iter_mut().map(|y| SharedOutput::new(y)).collect();
    let mut first_group = Vec::with_capacity(ws.len() + 1);
    let mut total = 0;
    for w in ws {
        first_group.push(total);
        total += w.rows / interleaved::GROUP_ROWS;
    }
    first_group.push(total);
    let work = ws.iter().map(|w| w.rows * w.cols * n_tokens).sum();
    let n_parts = parts_for(pool, work, total);
    pool.run_parts(n_parts, &|part, n_parts| {
        let mine = split(total, n_parts, part);
        for (i, (w, out)) in ws.iter().zip(&outs).enumerate() {
            let (lo, hi) = (first_group[i], first_group[i + 1]);
            let (start, end) = (mine.start.max(lo), mine.end.min(hi));
            if start >= end {
                continue;
            }
            // SAFETY: only the rows of this part's groups of matrix i are written, and parts
            // are disjoint (`split` is a partition).
            let store = |t: usize, r: usize, v: f32| unsafe { out.write(t * w.rows + r, v) };
            // SAFETY: `path` is available and runs AVX2 (the caller checked); `w` is
            // interleaved with consistent shape (`check_shapes`), `acts` holds the tokens.
            unsafe { lanes_matvec(path, w, start - lo..end - lo, acts, n_tokens, store) };
        }
    });
}

/// The decode mat-vec of `path`'s instruction set (`lanes`) over the eight-row groups `groups`
/// of `w`, for tokens `0..n_tokens` of `acts`: from the records where `w` is interleaved,
/// else decoding GGUF's blocks as it goes.
///
/// # Safety
/// `path` must be available and run AVX2 ([`KernelPath::runs_avx2`]); otherwise as
/// `lanes::matvec_avx2` or `lanes::matvec_rows_avx2`, by layout.
#[cfg(target_arch = "x86_64")]
unsafe fn lanes_matvec(
    path: KernelPath,
    w: &WeightMatrix,
    groups: std::ops::Range<usize>,
    acts: &QuantizedActivations,
    n_tokens: usize,
    store: impl FnMut(usize, usize, f32),
) {
    let (g, n) = (groups, n_tokens);
    // SAFETY (every arm): the instruction set is available (the caller's contract); the rest
    // is the caller's too.
    unsafe {
        match (path, w.layout) {
            (KernelPath::Avx512, Layout::Interleaved8) => {
                lanes::matvec_vnni(w, g, acts, 0, n, store)
            }
            (KernelPath::Avx512, Layout::Rows) => lanes::matvec_rows_vnni(w, g, acts, 0, n, store),
            (_, Layout::Interleaved8) => lanes::matvec_avx2(w, g, acts, 0, n, store),
            (_, Layout::Rows) => lanes::matvec_rows_avx2(w, g, acts, 0, n, store),
        }
    }
}

/// The exact-f32 reference: each weight row dequantized bit-exactly (`crate::quant`) and
/// multiplied in f32 with sequential sums. Slow; for tests and benchmarks.
pub fn matmul_reference(
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    check_shapes(w, x, n_tokens, y)?;
    if !crate::quant::can_dequantize(w.ty) {
        return Err(KernelError::UnsupportedType {
            tensor: String::new(),
            ty: w.ty,
        });
    }
    let out = SharedOutput::new(y);
    let units = w.rows;
    let n_parts = parts_for(pool, usize::MAX, units);
    pool.run_parts(n_parts, &|part, n_parts| {
        let mut row = vec![0f32; w.cols];
        let mut blocks = Vec::new();
        for r in split(units, n_parts, part) {
            if dequantize_to_f32(w.ty, w.row_blocks(r, &mut blocks), &mut row).is_err() {
                return;
            }
            for t in 0..n_tokens {
                let xt = &x[t * w.cols..(t + 1) * w.cols];
                // SAFETY: row r belongs to this part alone (`split` is a partition).
                unsafe { out.write(t * w.rows + r, portable::dot_f32_scalar(&row, xt)) };
            }
        }
    });
    Ok(())
}

fn check_shapes(
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let block = w.ty.block_size();
    let whole_blocks = block > 0 && w.cols.is_multiple_of(block);
    let data_ok = whole_blocks
        && w.rows
            .checked_mul(w.row_bytes())
            .is_some_and(|n| n == w.data.len());
    if !data_ok {
        return Err(KernelError::Shape(format!(
            "{}×{} {} weight: {} bytes of data (need whole {}-element blocks, {} bytes a row)",
            w.rows,
            w.cols,
            w.ty,
            w.data.len(),
            block,
            w.row_bytes()
        )));
    }
    let x_ok = n_tokens.checked_mul(w.cols) == Some(x.len());
    let y_ok = n_tokens.checked_mul(w.rows) == Some(y.len());
    if !(x_ok && y_ok) {
        return Err(KernelError::Shape(format!(
            "{}×{} weight, {} tokens: x has {} values, y has {}",
            w.rows,
            w.cols,
            n_tokens,
            x.len(),
            y.len()
        )));
    }
    Ok(())
}

/// Rows per tile: decoded together, so each activation chunk loaded serves this many rows.
const TILE_ROWS: usize = 4;
/// Tokens per tile: each decoded weight chunk held in a register serves this many tokens.
/// 4 × 2 keeps the eight accumulators and the operands within sixteen vector registers (NEON
/// has 32, but the portable loops are written for the narrowest target).
const TILE_TOKENS: usize = 2;
// `for_tile_shape!` lists the shapes up to 4 × 2.
const _: () = assert!(TILE_ROWS == 4 && TILE_TOKENS == 2);
/// Below this many multiply-adds per thread, splitting a matmul costs more than it saves.
const MIN_WORK_PER_THREAD: usize = 64 * 1024;
/// Bytes of decoded weights, and separately of quantized activations, that a mat-mat keeps
/// hot at a time (see `run_quantized`): two of these fit a 1 MB L2 with room to spare.
const L2_BLOCK_BYTES: usize = 192 * 1024;
/// The most tokens the x86 paths send through the interleaved mat-vec (decode steps of up to
/// eight sequences, in sweeps of eight (AVX-512) or four (AVX2) over records unpacked in
/// registers); beyond, the prefill tile over groups unpacked once per call costs less.
#[cfg(target_arch = "x86_64")]
const MAX_MATVEC_TOKENS: usize = 8;
/// Parts per thread a shared matmul is split into.
const PARTS_PER_THREAD: usize = 4;

/// Per-thread buffers, kept between calls so that a decode step allocates nothing.
#[derive(Default)]
struct Scratch {
    chunks: Vec<DecodedChunk>,
    offsets: Vec<[f32; 2]>,
    floats: Vec<f32>,
    /// One row in GGUF form, gathered from an interleaved matrix.
    row_blocks: Vec<u8>,
}

/// What [`run_quantized_in_lanes`] decodes a block of row groups into.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct LanesScratch {
    /// The block's groups in the layout of `lanes`' prefill tile.
    q: Vec<u8>,
    scales: Vec<avx2_interleaved::Lanes8>,
    offsets: Vec<avx2_interleaved::Lanes8>,
    /// One row decoded, on its way into the lanes.
    row_chunks: Vec<DecodedChunk>,
    row_offsets: Vec<[f32; 2]>,
    /// One row in GGUF form, gathered from an interleaved matrix.
    row_blocks: Vec<u8>,
    /// Two groups' outputs (the second for AVX-512's pairs) for a block of tokens.
    tile: Vec<[f32; interleaved::GROUP_ROWS]>,
    /// AVX-512: the block's groups packed in pairs (`lanes::pack_pair`); `q`, `scales` and
    /// `offsets` then hold only the two groups on their way into a pair.
    pairs: Vec<lanes::PairChunk>,
}

thread_local! {
    static ACTIVATIONS: RefCell<QuantizedActivations> = RefCell::default();
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static LANES_SCRATCH: RefCell<LanesScratch> = RefCell::default();
}

/// Runs `f` on this thread's buffer `key`, or on a fresh one if it is already in use (a nested
/// call), so that reentrancy costs an allocation rather than a panic.
fn with_scratch<T: Default, R>(
    key: &'static std::thread::LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut f = Some(f);
    let result = key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => f.take().map(|f| f(&mut buffer)),
        Err(_) => None,
    });
    match (result, f) {
        (Some(r), _) => r,
        (None, Some(f)) => f(&mut T::default()),
        // `f` was taken only when it ran and produced a result.
        (None, None) => unreachable!("scratch closure consumed without a result"),
    }
}

/// The `i`-th of `parts` nearly equal contiguous ranges of `0..n`.
fn split(n: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    (n * i / parts)..(n * (i + 1) / parts)
}

/// Into how many parts to split `work` multiply-adds over `units` row tiles: 1 (run on the
/// caller, no hand-off) when the work is too small to share, else a few per useful thread, so
/// that a thread slowed by other processes holds up little (see `pool`).
fn parts_for(pool: &ThreadPool, work: usize, units: usize) -> usize {
    let threads = (work / MIN_WORK_PER_THREAD).clamp(1, pool.n_threads());
    if threads == 1 {
        1
    } else {
        (threads * PARTS_PER_THREAD).min(units.max(1))
    }
}

/// `y`, written by several threads at disjoint indices.
struct SharedOutput {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: `SharedOutput` is only a pointer to an exclusively borrowed `[f32]`; the writers
// guarantee (see `write`) that no two threads touch the same element.
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    fn new(y: &mut [f32]) -> SharedOutput {
        SharedOutput {
            ptr: y.as_mut_ptr(),
            len: y.len(),
        }
    }

    /// Stores `value` at `index` (bounds-checked).
    ///
    /// # Safety
    /// No other thread may access `index` during the `pool.run` this is called in, and the
    /// slice given to `new` must still be exclusively borrowed for that run.
    unsafe fn write(&self, index: usize, value: f32) {
        assert!(index < self.len, "output index {index} out of {}", self.len);
        // SAFETY: in bounds (checked), and exclusive to this thread per the contract above.
        unsafe { self.ptr.add(index).write(value) };
    }

    /// A pointer to `index`, after checking that `n` runs of `width` values from `index`,
    /// `stride` apart, lie in the output: for a kernel that stores them itself.
    ///
    /// # Safety
    /// As [`Self::write`], for every index of the runs, for as long as the pointer is used.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_at(&self, index: usize, stride: usize, n: usize, width: usize) -> *mut f32 {
        let fits = match n.checked_sub(1) {
            None => true,
            Some(last) => last
                .checked_mul(stride)
                .and_then(|v| v.checked_add(index))
                .and_then(|v| v.checked_add(width))
                .is_some_and(|end| end <= self.len),
        };
        assert!(
            fits,
            "output runs {index}+({n}-1)×{stride}..+{width} out of {}",
            self.len
        );
        // SAFETY: `index <= self.len` where any run is stored (checked above); with none the
        // pointer is never written through.
        unsafe { self.ptr.add(index.min(self.len)) }
    }

    /// Stores the first `n_rows` values of each of `tile`'s rows, row `j` at
    /// `first + j · stride` (bounds-checked): a prefill tile's outputs for one group of rows, a
    /// row per token.
    ///
    /// # Safety
    /// As [`Self::write`], for every index written.
    #[cfg(target_arch = "x86_64")]
    unsafe fn write_group_rows(
        &self,
        first: usize,
        stride: usize,
        tile: &[[f32; interleaved::GROUP_ROWS]],
        n_rows: usize,
    ) {
        const G: usize = interleaved::GROUP_ROWS;
        assert!(n_rows <= G, "a group has {G} rows, not {n_rows}");
        // SAFETY: as this function's contract; `rows_at` checks that every run lies in the
        // output.
        let rows = unsafe { self.rows_at(first, stride, tile.len(), n_rows) };
        for (j, row) in tile.iter().enumerate() {
            // SAFETY: run `j` is in bounds (checked by `rows_at`), exclusive to this thread per
            // the contract, and `tile` cannot overlap the exclusively borrowed output. A whole
            // group is one store of known length, where a `memcpy` call of 32 bytes per row cost
            // 5% of a prompt.
            unsafe {
                let at = rows.add(j * stride);
                if n_rows == G {
                    at.cast::<[f32; G]>().write_unaligned(*row);
                } else {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), at, n_rows);
                }
            }
        }
    }
}

/// Quantizes `x` into `acts`, splitting tokens across the pool when there are many.
fn quantize_activations(
    pool: &ThreadPool,
    path: KernelPath,
    x: &[f32],
    n_tokens: usize,
    cols: usize,
    acts: &mut QuantizedActivations,
) {
    acts.reset(n_tokens, cols);
    let nc = acts.n_chunks;
    let quantize = |x: &[f32], q: &mut [[i8; CHUNK]], d: &mut [f32], s: &mut [[f32; 2]]| {
        match path {
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            // SAFETY: `path` is available (checked by the caller); lengths agree by construction.
            KernelPath::Avx2 | KernelPath::Avx512 => unsafe { avx2::quantize_tokens(x, q, d, s) },
            _ => decoded::quantize_tokens_scalar(x, q, d, s),
        }
    };
    let active = parts_for(pool, n_tokens * cols * 8, n_tokens);
    if active <= 1 {
        quantize(x, &mut acts.q, &mut acts.d, &mut acts.half_sums);
        acts.sum_halves();
        return;
    }
    // Hand each thread its own token range of the buffers: it quantizes its tokens and sums
    // their halves.
    fn take_front<'a, T>(rest: &mut &'a mut [T], n: usize) -> &'a mut [T] {
        let (front, back) = std::mem::take(rest).split_at_mut(n);
        *rest = back;
        front
    }
    let (mut q, mut d, mut s) = (&mut acts.q[..], &mut acts.d[..], &mut acts.half_sums[..]);
    let (mut c, mut n1, mut n2) = (
        &mut acts.chunk_sums[..],
        &mut acts.neg128_chunk_q_sums[..],
        &mut acts.neg128_half_q_sums[..],
    );
    let mut parts = Vec::with_capacity(active);
    for i in 0..active {
        let tokens = split(n_tokens, active, i);
        let n = tokens.len() * nc;
        let x_part = &x[tokens.start * cols..tokens.end * cols];
        let outputs = (
            take_front(&mut q, n),
            take_front(&mut d, n),
            take_front(&mut s, n),
        );
        let sums = (
            take_front(&mut c, n),
            take_front(&mut n1, n),
            take_front(&mut n2, n),
        );
        parts.push(Mutex::new((x_part, outputs, sums)));
    }
    pool.run_parts(active, &|i, _| {
        if let Some(part) = parts.get(i) {
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            let (x, (q, d, s), (c, n1, n2)) = &mut *part;
            quantize(x, q, d, s);
            decoded::sum_halves(q, s, (c, n1, n2));
        }
    });
}

/// Decodes one weight row on `path`.
fn decode_row(
    path: KernelPath,
    ty: GgmlType,
    row: &[u8],
    chunks: &mut [DecodedChunk],
    offsets: &mut [[f32; 2]],
) {
    match path {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        // SAFETY: `path` is available; `chunks`/`offsets` have one entry per 32 elements.
        KernelPath::Avx2 | KernelPath::Avx512 => unsafe {
            avx2::decode_row(ty, row, chunks, offsets)
        },
        _ => decoded::decode_row_scalar(ty, row, chunks, offsets),
    }
}

/// Output of one tile, sized for the largest tile.
type TileOut = [[f32; TILE_TOKENS]; TILE_ROWS];

/// Expands `$body` for the tile shape `(rm, rn)`, `1 ≤ rm ≤ TILE_ROWS`, `1 ≤ rn ≤ TILE_TOKENS`,
/// with `$m`/`$n` bound as constants.
macro_rules! for_tile_shape {
    ($rm:expr, $rn:expr, |$m:ident, $n:ident| $body:block) => {
        match ($rm, $rn) {
            (1, 1) => {
                const $m: usize = 1;
                const $n: usize = 1;
                $body
            }
            (1, 2) => {
                const $m: usize = 1;
                const $n: usize = 2;
                $body
            }
            (2, 1) => {
                const $m: usize = 2;
                const $n: usize = 1;
                $body
            }
            (2, 2) => {
                const $m: usize = 2;
                const $n: usize = 2;
                $body
            }
            (3, 1) => {
                const $m: usize = 3;
                const $n: usize = 1;
                $body
            }
            (3, 2) => {
                const $m: usize = 3;
                const $n: usize = 2;
                $body
            }
            (4, 1) => {
                const $m: usize = 4;
                const $n: usize = 1;
                $body
            }
            _ => {
                const $m: usize = 4;
                const $n: usize = 2;
                $body
            }
        }
    };
}

/// A tile of `rm` decoded rows × `rn` tokens from `t0`, into `out`.
#[allow(clippy::too_many_arguments)]
fn quantized_tile(
    path: KernelPath,
    signed: bool,
    with_offsets: bool,
    rm: usize,
    rn: usize,
    w: &[DecodedChunk],
    offsets: &[[f32; 2]],
    acts: &QuantizedActivations,
    t0: usize,
    out: &mut TileOut,
) {
    for_tile_shape!(rm, rn, |RM, RN| {
        let mut o = [[0f32; RN]; RM];
        match path {
            // `run_quantized` sends the x86 paths to `run_quantized_in_lanes` before any
            // row-major tile: their order of operations is `lanes`'.
            KernelPath::Avx2 | KernelPath::Avx512 => {
                unreachable!("the x86 paths have no row-major tile")
            }
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `path` is available; `w`, `offsets` and `acts` hold the tile's rows and
            // tokens (the driver's tiling guarantees it; `tile` re-checks).
            KernelPath::Neon => unsafe {
                neon::tile::<RM, RN>(with_offsets, w, offsets, acts, t0, &mut o)
            },
            _ => portable::tile_portable::<RM, RN>(
                signed,
                with_offsets,
                w,
                offsets,
                acts,
                t0,
                &mut o,
            ),
        }
        for (dst, src) in out.iter_mut().zip(&o) {
            dst[..RN].copy_from_slice(src);
        }
    });
}

fn run_quantized(
    pool: &ThreadPool,
    path: KernelPath,
    w: &WeightMatrix,
    acts: &QuantizedActivations,
    n_tokens: usize,
    y: &mut [f32],
) {
    let (rows, nc) = (w.rows, acts.n_chunks);
    let signed = decoded::is_signed(w.ty);
    let with_offsets = decoded::has_offset(w.ty);
    let units = rows.div_ceil(TILE_ROWS);
    let n_parts = parts_for(pool, rows * w.cols * n_tokens, units);
    let out = SharedOutput::new(y);
    #[cfg(target_arch = "x86_64")]
    if path.runs_avx2() && n_tokens <= MAX_MATVEC_TOKENS {
        let groups = rows.div_ceil(interleaved::GROUP_ROWS);
        let n_parts = parts_for(pool, rows * w.cols * n_tokens, groups);
        pool.run_parts(n_parts, &|part, n_parts| {
            // SAFETY: only the rows of this part's groups are written, and the groups of
            // different parts are disjoint (`split` is a partition).
            let store = |t: usize, r: usize, v: f32| unsafe { out.write(t * w.rows + r, v) };
            // SAFETY: `path` is available and runs AVX2; `w` is block-quantized with
            // consistent shape (`check_shapes`; interleaved ones built by `ArenaWeights`),
            // `acts` holds the tokens.
            unsafe {
                let groups = split(groups, n_parts, part);
                lanes_matvec(path, w, groups, acts, n_tokens, store)
            };
        });
        return;
    }
    // The x86 paths' other products (prefill) run with rows in lanes too, for their order of
    // operations.
    #[cfg(target_arch = "x86_64")]
    if path.runs_avx2() {
        run_quantized_in_lanes(pool, path, w, acts, n_tokens, y);
        return;
    }
    // Cache blocking: a block of rows is decoded once into the buffer, then token blocks sweep
    // across it, row tile by row tile. Both blocks are sized to share L2 (about 1 MB on the
    // CPUs this targets), so neither the decoded weights nor the activations of long prompts
    // are re-read from further away once per row tile.
    let act_bytes_per_token = nc * (CHUNK + 4 + 8);
    let tokens_per_block = (L2_BLOCK_BYTES / act_bytes_per_token.max(1) / TILE_TOKENS).max(1);
    let tokens_per_block = tokens_per_block * TILE_TOKENS;
    // A decoded block is reused once per token block. When one token block holds every token
    // (decode steps, short prompts) nothing is reused, and a block of one row tile keeps the
    // decoded rows in L1 from their decode to their use, instead of a round trip through L2.
    let units_per_block = if n_tokens <= tokens_per_block {
        1
    } else {
        let decoded_bytes_per_row = nc * (std::mem::size_of::<DecodedChunk>() + 8);
        (L2_BLOCK_BYTES / decoded_bytes_per_row.max(1) / TILE_ROWS).max(1)
    };
    pool.run_parts(n_parts, &|part, n_parts| {
        with_scratch(&SCRATCH, |scratch| {
            let part_units = split(units, n_parts, part);
            let block_units = units_per_block.min(part_units.len());
            scratch
                .chunks
                .resize(block_units * TILE_ROWS * nc, DecodedChunk::ZERO);
            scratch
                .offsets
                .resize(block_units * TILE_ROWS * nc, [0.0; 2]);
            for first_unit in part_units.clone().step_by(block_units.max(1)) {
                let block = first_unit..(first_unit + block_units).min(part_units.end);
                let block_r0 = block.start * TILE_ROWS;
                let block_r1 = (block.end * TILE_ROWS).min(rows);
                for r in block_r0..block_r1 {
                    let at = (r - block_r0) * nc..(r - block_r0 + 1) * nc;
                    let (chunks, offsets) =
                        (&mut scratch.chunks[at.clone()], &mut scratch.offsets[at]);
                    let row = w.row_blocks(r, &mut scratch.row_blocks);
                    decode_row(path, w.ty, row, chunks, offsets);
                }
                for tb in (0..n_tokens).step_by(tokens_per_block) {
                    let tokens = tb..(tb + tokens_per_block).min(n_tokens);
                    for r0 in (block_r0..block_r1).step_by(TILE_ROWS) {
                        let rm = TILE_ROWS.min(block_r1 - r0);
                        let at = (r0 - block_r0) * nc..(r0 - block_r0 + rm) * nc;
                        let (chunks, offsets) = (&scratch.chunks[at.clone()], &scratch.offsets[at]);
                        for t0 in tokens.clone().step_by(TILE_TOKENS) {
                            let rn = TILE_TOKENS.min(tokens.end - t0);
                            let mut tile = [[0f32; TILE_TOKENS]; TILE_ROWS];
                            if path == KernelPath::Scalar {
                                for (k, tile_row) in tile.iter_mut().enumerate().take(rm) {
                                    for (j, value) in tile_row.iter_mut().enumerate().take(rn) {
                                        let xs = (t0 + j) * nc..(t0 + j + 1) * nc;
                                        *value = portable::dot_scalar(
                                            signed,
                                            &chunks[k * nc..(k + 1) * nc],
                                            &offsets[k * nc..(k + 1) * nc],
                                            &acts.q[xs.clone()],
                                            &acts.d[xs.clone()],
                                            &acts.half_sums[xs],
                                        );
                                    }
                                }
                            } else {
                                quantized_tile(
                                    path,
                                    signed,
                                    with_offsets,
                                    rm,
                                    rn,
                                    chunks,
                                    offsets,
                                    acts,
                                    t0,
                                    &mut tile,
                                );
                            }
                            for (k, tile_row) in tile.iter().enumerate().take(rm) {
                                for (j, &value) in tile_row.iter().enumerate().take(rn) {
                                    // SAFETY: rows r0..r0 + rm belong to this part alone.
                                    unsafe { out.write((t0 + j) * rows + r0 + k, value) };
                                }
                            }
                        }
                    }
                }
            }
        });
    });
}

/// [`run_quantized`] on the x86 paths, wherever the interleaved mat-vec does not apply: blocks
/// of eight-row groups are unpacked once into the layout of `lanes`' prefill tile (from the
/// interleaved records, or decoded row by row from GGUF's layout), then sweeps of tokens cross
/// them with per-block integer sums (the same bits as the mat-vec, see `lanes`). A last group
/// past the matrix's rows is padded with zero rows, whose outputs are dropped.
#[cfg(target_arch = "x86_64")]
fn run_quantized_in_lanes(
    pool: &ThreadPool,
    path: KernelPath,
    w: &WeightMatrix,
    acts: &QuantizedActivations,
    n_tokens: usize,
    y: &mut [f32],
) {
    use avx2_interleaved::{Lanes8, DECODED_GROUP_BYTES};
    const G: usize = interleaved::GROUP_ROWS;
    let (rows, nc) = (w.rows, acts.n_chunks);
    let kind = lanes::chunk_kind_of(w.ty);
    // AVX-512's tile takes two groups at a time (`lanes::tile_pair_vnni`), so its threads
    // share out pairs of groups: a unit is `unit_groups` groups (the last may have fewer).
    let n_groups = rows.div_ceil(G);
    let paired = path == KernelPath::Avx512;
    let unit_groups = if paired { 2 } else { 1 };
    let units = n_groups.div_ceil(unit_groups);
    let n_parts = parts_for(pool, rows * w.cols * n_tokens, units);
    let out = SharedOutput::new(y);
    // Blocks sized as `run_quantized`'s: a block of decoded groups and a block of tokens'
    // activations share L2.
    let bytes_per_group = nc * (DECODED_GROUP_BYTES + 4 * std::mem::size_of::<Lanes8>());
    let groups_per_block =
        (L2_BLOCK_BYTES / bytes_per_group.max(1) / unit_groups).max(1) * unit_groups;
    let act_bytes_per_token = nc * (CHUNK + 4 + 8);
    let tokens_per_block = (L2_BLOCK_BYTES / act_bytes_per_token.max(1) / 2).max(1) * 2;
    pool.run_parts(n_parts, &|part, n_parts| {
        with_scratch(&LANES_SCRATCH, |scratch| {
            let LanesScratch {
                q,
                scales,
                offsets,
                row_chunks,
                row_offsets,
                row_blocks,
                tile,
                pairs,
            } = scratch;
            let part_units = split(units, n_parts, part);
            let part_groups =
                part_units.start * unit_groups..(part_units.end * unit_groups).min(n_groups);
            let block_groups = groups_per_block.min(part_groups.len()).max(1);
            // AVX-512 unpacks two groups at a time on their way into the block's pairs.
            let unpacked_groups = if paired { 2 } else { block_groups };
            q.resize(unpacked_groups * nc * DECODED_GROUP_BYTES, 0);
            scales.resize(unpacked_groups * 2 * nc, Lanes8::default());
            offsets.resize(unpacked_groups * 2 * nc, Lanes8::default());
            if paired {
                pairs.resize(block_groups.div_ceil(2) * nc, lanes::PairChunk::ZERO);
            }
            row_chunks.resize(nc, DecodedChunk::ZERO);
            row_offsets.resize(nc, [0.0; 2]);
            let tile_len = tokens_per_block.min(n_tokens);
            tile.resize(2 * tile_len, [0.0; G]);
            // Group k of the unpacked ones: its quants, and its halves' scales and offsets.
            let q_at = |k: usize| k * nc * DECODED_GROUP_BYTES..(k + 1) * nc * DECODED_GROUP_BYTES;
            let halves_at = |k: usize| k * 2 * nc..(k + 1) * 2 * nc;
            let pair_at = |p: usize| p * nc..(p + 1) * nc;
            for first_group in part_groups.clone().step_by(block_groups) {
                let block = first_group..(first_group + block_groups).min(part_groups.end);
                // Unpacks group `g` of the matrix into the buffers of one unpacked group (a group
                // of zeros past the block's end: the partner of a last odd group on AVX-512).
                let mut unpack_into =
                    |g: usize, q: &mut [u8], scales: &mut [Lanes8], offsets: &mut [Lanes8]| {
                        if g >= block.end {
                            q.fill(0);
                            scales.fill(Lanes8::default());
                            offsets.fill(Lanes8::default());
                        } else if w.layout == Layout::Interleaved8 {
                            // SAFETY: an x86 path is available (the caller's contract); `w` is
                            // interleaved (so its rows are whole groups) and `g` one of them.
                            unsafe { lanes::unpack_group(w, g, (q, scales, offsets)) };
                        } else {
                            for r in 0..G {
                                if g * G + r < rows {
                                    let row = w.row_blocks(g * G + r, row_blocks);
                                    decode_row(path, w.ty, row, row_chunks, row_offsets);
                                } else {
                                    row_chunks.fill(DecodedChunk::ZERO);
                                    row_offsets.fill([0.0; 2]);
                                }
                                avx2_interleaved::scatter_decoded_row(
                                    r,
                                    row_chunks,
                                    row_offsets,
                                    q,
                                    scales,
                                    offsets,
                                );
                            }
                        }
                    };
                if paired {
                    for (p, g) in block.clone().step_by(2).enumerate() {
                        for (k, g) in [(0, g), (1, g + 1)] {
                            let (q, s, o) = (
                                &mut q[q_at(k)],
                                &mut scales[halves_at(k)],
                                &mut offsets[halves_at(k)],
                            );
                            unpack_into(g, q, s, o);
                        }
                        let group =
                            |k: usize| (&q[q_at(k)], &scales[halves_at(k)], &offsets[halves_at(k)]);
                        // SAFETY: AVX-512 is available (`paired` only on its path); both
                        // groups hold nc chunks, and the pair its nc entries.
                        unsafe {
                            lanes::pack_pair(kind, (group(0), group(1)), nc, &mut pairs[pair_at(p)])
                        };
                    }
                } else {
                    for (k, g) in block.clone().enumerate() {
                        let (q, s, o) = (
                            &mut q[q_at(k)],
                            &mut scales[halves_at(k)],
                            &mut offsets[halves_at(k)],
                        );
                        unpack_into(g, q, s, o);
                    }
                }
                for tb in (0..n_tokens).step_by(tokens_per_block) {
                    let tokens = tb..(tb + tokens_per_block).min(n_tokens);
                    let (tile_a, tile_b) = tile.split_at_mut(tile_len);
                    let n = tokens.len();
                    let (tile_a, tile_b) = (&mut tile_a[..n], &mut tile_b[..n]);
                    // Group k of the block: AVX-512's pairs take two at a time.
                    let groups = if paired { 2 } else { 1 };
                    let mut k = 0;
                    while k < block.len() {
                        let t = tokens.clone();
                        let g = block.start + k;
                        if g + groups <= block.end && (g + groups) * G <= rows {
                            // Whole groups put their rows straight into `y`.
                            // SAFETY: `path` is available and runs AVX2 (the caller's
                            // contract), AVX-512 where `paired`; the groups (or pair) hold nc
                            // chunks and `acts` the block's tokens. Their rows belong to this
                            // part alone (`split` is a partition), and `rows_at` checks that
                            // they lie in `y` for every token.
                            unsafe {
                                let first = tokens.start * rows + g * G;
                                let first = out.rows_at(first, rows, n, groups * G);
                                if paired {
                                    let pair = &pairs[pair_at(k / 2)];
                                    let dst = lanes::PairOutputs::Rows {
                                        first,
                                        stride: rows,
                                    };
                                    lanes::tile_pair_vnni(kind, pair, acts, t, dst);
                                } else {
                                    let group = (
                                        &q[q_at(k)],
                                        &scales[halves_at(k)],
                                        &offsets[halves_at(k)],
                                    );
                                    let dst = lanes::GroupOutputs::Rows {
                                        first,
                                        stride: rows,
                                    };
                                    lanes::tile_decoded_avx2(kind, group, acts, t, dst);
                                }
                            }
                            k += groups;
                            continue;
                        }
                        // A pair with a padded group, or a group past the matrix's last row:
                        // through the buffers, keeping the rows that exist.
                        // SAFETY: as above, for the buffers.
                        unsafe {
                            if paired {
                                let pair = &pairs[pair_at(k / 2)];
                                let out = lanes::PairOutputs::Split(&mut *tile_a, &mut *tile_b);
                                lanes::tile_pair_vnni(kind, pair, acts, t, out);
                            } else {
                                let group =
                                    (&q[q_at(k)], &scales[halves_at(k)], &offsets[halves_at(k)]);
                                let out = lanes::GroupOutputs::Buffer(&mut *tile_a);
                                lanes::tile_decoded_avx2(kind, group, acts, t, out);
                            }
                        };
                        for (i, tile) in [&*tile_a, &*tile_b].into_iter().enumerate().take(groups) {
                            let g = block.start + k + i;
                            if g >= block.end {
                                break;
                            }
                            // The group's rows that exist (a last group may be padded).
                            let n_rows = G.min(rows - g * G);
                            let first = tokens.start * rows + g * G;
                            // SAFETY: the rows of this part's groups belong to it alone
                            // (`split` is a partition).
                            unsafe { out.write_group_rows(first, rows, tile, n_rows) };
                        }
                        k += groups;
                    }
                }
            }
        });
    });
}

/// Work whose loops the compiler vectorizes (plain code over slices, lanes kept as arrays),
/// to be compiled for AVX2 where the CPU has it: `run` inlined into a function with the target
/// feature. The results are the same either way as long as `run` fixes its order of operations
/// (no feature here allows contracting a multiply and an add). The sampler's passes over a
/// vocabulary are such work; a trait keeps this room free of the sampler's types.
pub(crate) trait Vectorized {
    type Output;
    /// Must be `#[inline(always)]`, or it is compiled for the baseline CPU only.
    fn run(self) -> Self::Output;
}

/// Runs `work` compiled for AVX2 where the CPU has it, for the baseline otherwise.
pub(crate) fn run_vectorized<W: Vectorized>(work: W) -> W::Output {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if KernelPath::best().runs_avx2() {
        // SAFETY: AVX2 is available (`best` only picks available paths).
        return unsafe { avx2::run_vectorized(work) };
    }
    work.run()
}

/// Widens f16 values (the KV cache) to f32: `dst[i] = src[i]` for `i < min(len)`, exactly, on
/// the fastest path (F16C eight at a time, in one call, rather than the `half` crate's
/// per-eight-values calls, which cost long-context decode noticeably).
pub fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    widen_f16_with_path(KernelPath::best(), src, dst);
}

/// [`widen_f16`] on a chosen path (the test compares them).
pub fn widen_f16_with_path(path: KernelPath, src: &[half::f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    // Only x86 has kernels of its own for this; elsewhere every path runs the loop below.
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    let _ = path;
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if path.runs_avx2() && path.is_available() {
        // SAFETY: `f16` is two bytes without padding, so the first `n` values are `2n`
        // initialized bytes, read in the CPU's (little-endian) order as `widen_row` expects.
        let bytes = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), 2 * n) };
        // SAFETY: AVX2 and F16C are available; `bytes` holds `n` 2-byte values for `n` outputs.
        unsafe { avx2::widen_row(GgmlType::F16, bytes, &mut dst[..n]) };
        return;
    }
    for (d, s) in dst[..n].iter_mut().zip(&src[..n]) {
        *d = crate::quant::f16_bits_to_f32(s.to_bits());
    }
}

/// Widens one float weight row to f32.
fn widen_row(path: KernelPath, ty: GgmlType, row: &[u8], dst: &mut [f32]) {
    match (path, ty) {
        (_, GgmlType::F32) => {
            for (v, b) in dst.iter_mut().zip(row.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        // SAFETY: `path` is available; `row` is `dst.len()` 2-byte values.
        (KernelPath::Avx2 | KernelPath::Avx512, _) => unsafe { avx2::widen_row(ty, row, dst) },
        _ => {
            // Lengths match by construction, so this cannot fail.
            let _ = dequantize_to_f32(ty, row, dst);
        }
    }
}

/// Float weights (F32, F16, BF16) by f32 activations. A part's rows are widened to f32 a
/// chunk at a time (at most [`FLOAT_CHUNK_ROWS`], so the chunk stays in L2), and the chunk meets
/// the tokens a block at a time (as many as keep the block's activations in L1), so that
/// neither the widened weights nor the activations stream from further away once per row tile.
/// Every output is one tile's dot product whatever the blocking, so the bits do not depend on it.
fn run_float(
    pool: &ThreadPool,
    path: KernelPath,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    let (rows, cols) = (w.rows, w.cols);
    let units = rows.div_ceil(TILE_ROWS);
    let n_parts = parts_for(pool, rows * cols * n_tokens, units);
    let out = SharedOutput::new(y);
    let chunk_units = (FLOAT_CHUNK_ROWS / TILE_ROWS).max(1);
    // A multiple of eight (the AVX-512 tile), at least eight.
    let token_block = (FLOAT_BLOCK_BYTES / (4 * cols.max(1)) / 8 * 8).max(8);
    pool.run_parts(n_parts, &|part, n_parts| {
        with_scratch(&SCRATCH, |scratch| {
            let part_units = split(units, n_parts, part);
            let mut first = part_units.start;
            while first < part_units.end {
                let last = (first + chunk_units).min(part_units.end);
                let r0 = first * TILE_ROWS;
                let chunk_rows = (last * TILE_ROWS).min(rows) - r0;
                scratch.floats.resize(chunk_rows * cols, 0.0);
                for k in 0..chunk_rows {
                    let dst = &mut scratch.floats[k * cols..(k + 1) * cols];
                    widen_row(path, w.ty, w.row(r0 + k), dst);
                }
                for t_first in (0..n_tokens).step_by(token_block) {
                    let t_end = (t_first + token_block).min(n_tokens);
                    for unit in first..last {
                        let u0 = unit * TILE_ROWS;
                        let rm = TILE_ROWS.min(rows - u0);
                        let wf = &scratch.floats[(u0 - r0) * cols..(u0 - r0 + rm) * cols];
                        float_unit(path, wf, x, cols, rows, u0, rm, t_first..t_end, &out);
                    }
                }
                first = last;
            }
        });
    });
}

/// Rows a float matmul widens at a time (see [`run_float`]).
const FLOAT_CHUNK_ROWS: usize = 64;
/// Activation bytes a float matmul's token block holds (see [`run_float`]): well inside L1.
const FLOAT_BLOCK_BYTES: usize = 24 << 10;

/// One row tile of a float matmul (`rm` widened rows `wf`, output rows `u0..u0 + rm`) by
/// tokens `tokens`: the AVX-512 tile eight tokens at a time where it runs, then the two-token
/// tile of the path.
#[allow(clippy::too_many_arguments)]
fn float_unit(
    path: KernelPath,
    wf: &[f32],
    x: &[f32],
    cols: usize,
    rows: usize,
    u0: usize,
    rm: usize,
    tokens: std::ops::Range<usize>,
    out: &SharedOutput,
) {
    #[allow(unused_mut)]
    let mut first_token = tokens.start;
    #[cfg(target_arch = "x86_64")]
    if path == KernelPath::Avx512 {
        const T: usize = avx512::F32_TILE_TOKENS;
        while tokens.end - first_token >= T {
            let t0 = first_token;
            let mut tile = [[0f32; T]; TILE_ROWS];
            macro_rules! run {
                ($rm:literal) => {{
                    let mut o = [[0f32; T]; $rm];
                    // SAFETY: the CPU has AVX-512 (`path`); `wf` holds $rm rows and `x` tokens
                    // t0..t0 + T (`tile_f32` re-checks).
                    unsafe { avx512::tile_f32::<$rm>(wf, x, cols, t0, &mut o) };
                    tile[..$rm].copy_from_slice(&o);
                }};
            }
            match rm {
                1 => run!(1),
                2 => run!(2),
                3 => run!(3),
                _ => run!(4),
            }
            for (k, tile_row) in tile.iter().enumerate().take(rm) {
                for (j, &value) in tile_row.iter().enumerate() {
                    // SAFETY: rows u0..u0 + rm belong to this part alone.
                    unsafe { out.write((t0 + j) * rows + u0 + k, value) };
                }
            }
            first_token += T;
        }
    }
    for t0 in (first_token..tokens.end).step_by(TILE_TOKENS) {
        let rn = TILE_TOKENS.min(tokens.end - t0);
        let mut tile = [[0f32; TILE_TOKENS]; TILE_ROWS];
        for_tile_shape!(rm, rn, |RM, RN| {
            let mut o = [[0f32; RN]; RM];
            match path {
                KernelPath::Scalar => {
                    for (k, o_row) in o.iter_mut().enumerate() {
                        for (j, v) in o_row.iter_mut().enumerate() {
                            let xt = &x[(t0 + j) * cols..(t0 + j + 1) * cols];
                            let wr = &wf[k * cols..(k + 1) * cols];
                            *v = portable::dot_f32_scalar(wr, xt);
                        }
                    }
                }
                #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
                // SAFETY: `path` is available; `wf` holds RM rows and `x` tokens t0..t0 + RN
                // (`tile_f32` re-checks).
                KernelPath::Avx2 | KernelPath::Avx512 => unsafe {
                    avx2::tile_f32::<RM, RN>(wf, x, cols, t0, &mut o)
                },
                _ => portable::tile_f32_portable::<RM, RN>(wf, x, cols, t0, &mut o),
            }
            for (dst, src) in tile.iter_mut().zip(&o) {
                dst[..RN].copy_from_slice(src);
            }
        });
        for (k, tile_row) in tile.iter().enumerate().take(rm) {
            for (j, &value) in tile_row.iter().enumerate().take(rn) {
                // SAFETY: rows u0..u0 + rm belong to this part alone.
                unsafe { out.write((t0 + j) * rows + u0 + k, value) };
            }
        }
    }
}

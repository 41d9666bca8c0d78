//! Compute kernels over quantized weights used in place.
//!
//! The contract the models are written against:
//! - [`WeightMatrix`]: a 2-D weight in GGUF layout (`rows` rows of `cols` elements, each row a
//!   run of `ty` blocks), borrowed from the file mapping. Never dequantized as a whole.
//! - [`matmul`]: `y[t][r] = Σ_c W[r][c] · x[t][c]` for `n_tokens` activation rows at once
//!   (mat-vec when `n_tokens == 1`), split across a [`ThreadPool`].
//!
//! This first implementation dequantizes one weight row at a time into a small buffer and
//! takes exact f32 dot products: correct for every dequantizable type, and the reference the
//! fast paths are checked against.

use crate::gguf::{GgufFile, TensorInfo};
use crate::quant::{dequantize_to_f32, GgmlType};

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
}

/// A weight matrix in GGUF layout, borrowed from the mapping.
#[derive(Debug, Clone, Copy)]
pub struct WeightMatrix<'a> {
    pub ty: GgmlType,
    /// Output features (ggml `ne[1]`).
    pub rows: usize,
    /// Input features (ggml `ne[0]`), a multiple of the type's block size.
    pub cols: usize,
    pub data: &'a [u8],
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
        Ok(WeightMatrix {
            ty: info.ggml_type,
            rows: rows as usize,
            cols: cols as usize,
            data: file.tensor_data(info),
        })
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// The blocks of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
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
        dequantize_to_f32(self.ty, self.row(r), out).map_err(|e| KernelError::Shape(e.to_string()))
    }
}

/// Worker threads for the kernels, sized once (`--threads`).
#[derive(Debug)]
pub struct ThreadPool {
    n_threads: usize,
}

impl ThreadPool {
    pub fn new(n_threads: usize) -> ThreadPool {
        ThreadPool {
            n_threads: n_threads.max(1),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(thread_index, n_threads)` on every thread and returns when all are done.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.n_threads;
        std::thread::scope(|s| {
            for i in 1..n {
                s.spawn(move || f(i, n));
            }
            f(0, n);
        });
    }
}

/// `y[t*rows + r] = Σ_c W[r][c] · x[t*cols + c]` for `t < n_tokens`.
pub fn matmul(
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    if x.len() != n_tokens * w.cols || y.len() != n_tokens * w.rows {
        return Err(KernelError::Shape(format!(
            "{}×{} weight, {} tokens: x has {} values, y has {}",
            w.rows,
            w.cols,
            n_tokens,
            x.len(),
            y.len()
        )));
    }
    let n_threads = pool.n_threads();
    let chunk = w.rows.div_ceil(n_threads);
    let results: Vec<std::sync::Mutex<Vec<f32>>> =
        (0..n_threads).map(|_| Default::default()).collect();
    pool.run(&|i, _| {
        let (r0, r1) = ((i * chunk).min(w.rows), ((i + 1) * chunk).min(w.rows));
        let mut row = vec![0f32; w.cols];
        let mut local = vec![0f32; (r1 - r0) * n_tokens];
        for r in r0..r1 {
            if dequantize_to_f32(w.ty, w.row(r), &mut row).is_err() {
                return;
            }
            for t in 0..n_tokens {
                let xt = &x[t * w.cols..(t + 1) * w.cols];
                local[(r - r0) * n_tokens + t] = row.iter().zip(xt).map(|(a, b)| a * b).sum();
            }
        }
        *results[i].lock().unwrap_or_else(|e| e.into_inner()) = local;
    });
    for (i, local) in results.into_iter().enumerate() {
        let local = local.into_inner().unwrap_or_else(|e| e.into_inner());
        let r0 = (i * chunk).min(w.rows);
        for (k, v) in local.into_iter().enumerate() {
            let (r, t) = (r0 + k / n_tokens, k % n_tokens);
            y[t * w.rows + r] = v;
        }
    }
    Ok(())
}

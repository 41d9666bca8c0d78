//! The batched forward pass shared by every supported architecture. The architectures differ
//! only in what [`ModelConfig`] and the weights say: norm kind, RoPE style, QK-norm, post-norms,
//! FFN kind, biases, fused QKV, sliding windows, embedding scale, learned positions.

use crate::kernels::{matmul, matmul_reference, matmul_shared_input, ThreadPool, WeightMatrix};
use crate::ops;

use super::attention::{attention, AttentionScratch, Slot};
use super::config::{FfnKind, ModelConfig, NormKind};
use super::weights::{Linear, Norm, QkvWeights};
use super::{BatchItem, KvCache, Logits, LogitsWanted, Model, ModelError};

/// Working buffers of a forward pass, sized for the largest batch seen so far and reused.
#[derive(Debug, Default)]
pub struct Scratch {
    /// Residual stream, `[token][n_embd]`.
    x: Vec<f32>,
    /// Normalised residual (input of the projections), `[token][n_embd]`.
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Output of a fused QKV projection before it is split.
    qkv: Vec<f32>,
    /// Attention output, `[token][n_head × head_dim_v]`.
    attn: Vec<f32>,
    /// Output of the attention and FFN down projections, `[token][n_embd]`.
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// `cos` then `sin` per token, for full-attention and sliding-window layers.
    rope: [Vec<f32>; 2],
    /// Which item and position each token of the batch is.
    slots: Vec<Slot>,
    /// Tokens that get logits.
    out_tokens: Vec<usize>,
    attention: AttentionScratch,
}

impl Scratch {
    /// Bytes held by the buffers: they grow with the number of tokens in a pass (about
    /// `4 × (3·n_embd + q + k + v + attn + 2·n_ff)` bytes per token), so the chunk size the
    /// caller feeds bounds them.
    pub fn bytes(&self) -> usize {
        let f32s: usize = [
            &self.x,
            &self.xn,
            &self.q,
            &self.k,
            &self.v,
            &self.qkv,
            &self.attn,
            &self.proj,
            &self.gate,
            &self.up,
            &self.rope[0],
            &self.rope[1],
        ]
        .iter()
        .map(|b| b.capacity())
        .sum();
        f32s * 4
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.out_tokens.capacity() * std::mem::size_of::<usize>()
            + self.attention.bytes()
    }
}

/// What a pass returns for its wanted rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// The next-token logits.
    Logits,
    /// The final hidden states (embeddings).
    Hidden,
}

/// `buf[..len]`, growing `buf` first if it is shorter.
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

impl Model {
    /// Runs one step for every item of `batch`: appends each item's tokens to its cache and
    /// returns the logits each item asked for.
    ///
    /// The batch is checked before anything is computed: an invalid one (context overflow, a
    /// token out of range, a gap before `start_pos`, a cache of another model) is an error
    /// that leaves every cache as it was.
    pub fn forward(
        &self,
        pool: &ThreadPool,
        scratch: &mut Scratch,
        batch: &mut [BatchItem],
    ) -> Result<Logits, ModelError> {
        self.forward_to(pool, scratch, batch, Output::Logits)
    }

    /// As [`Model::forward`], but each wanted row is the token's final hidden state (after the
    /// output norm, before the output projection: what llama.cpp returns as a token's
    /// embedding), `n_embd` values per row where `forward` gives `n_vocab` (so
    /// [`Logits::n_vocab`] is `n_embd` here).
    pub fn forward_hidden(
        &self,
        pool: &ThreadPool,
        scratch: &mut Scratch,
        batch: &mut [BatchItem],
    ) -> Result<Logits, ModelError> {
        self.forward_to(pool, scratch, batch, Output::Hidden)
    }

    fn forward_to(
        &self,
        pool: &ThreadPool,
        scratch: &mut Scratch,
        batch: &mut [BatchItem],
        output: Output,
    ) -> Result<Logits, ModelError> {
        let cfg = &self.config;
        self.check_batch(batch)?;
        if output == Output::Logits && !cfg.has_lm_head {
            return Err(ModelError::Unsupported(format!(
                "{} models have no LM head: they embed text, they do not continue it",
                cfg.arch.name()
            )));
        }

        scratch.slots.clear();
        scratch.out_tokens.clear();
        let mut items = Vec::with_capacity(batch.len());
        for (i, item) in batch.iter().enumerate() {
            let first = scratch.slots.len();
            let item_end = item.start_pos + item.tokens.len();
            scratch.slots.extend((0..item.tokens.len()).map(|j| Slot {
                item: i,
                pos: item.start_pos + j,
                end: if cfg.causal {
                    item.start_pos + j + 1
                } else {
                    item_end
                },
            }));
            let last = scratch.slots.len();
            let first_row = scratch.out_tokens.len();
            match item.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => scratch.out_tokens.push(last - 1),
                LogitsWanted::All => scratch.out_tokens.extend(first..last),
            }
            items.push((first_row, scratch.out_tokens.len() - first_row));
        }
        let n_tokens = scratch.slots.len();

        self.embed(batch, scratch)?;
        self.rope_tables(scratch);
        for il in 0..cfg.n_layer {
            self.layer(pool, scratch, batch, il, n_tokens)?;
        }
        let values = self.output(pool, scratch, output)?;

        for item in batch.iter_mut() {
            item.cache.set_len(item.start_pos + item.tokens.len());
        }
        Ok(Logits {
            n_vocab: match output {
                Output::Logits => cfg.n_vocab,
                Output::Hidden => cfg.n_embd,
            },
            values,
            items,
        })
    }

    fn check_batch(&self, batch: &[BatchItem]) -> Result<(), ModelError> {
        let cfg = &self.config;
        if batch.is_empty() {
            return Err(ModelError::InvalidBatch("no items".into()));
        }
        for (i, item) in batch.iter().enumerate() {
            if !item.cache.fits(cfg) {
                return Err(ModelError::InvalidBatch(format!(
                    "item {i}: its KV cache was made for a model of another shape"
                )));
            }
            if item.tokens.is_empty() {
                return Err(ModelError::InvalidBatch(format!("item {i} has no tokens")));
            }
            if !cfg.causal && item.start_pos != 0 {
                // Every token of an encoder's text sees every other: a text fed in pieces
                // would leave the earlier pieces blind to the later ones.
                return Err(ModelError::InvalidBatch(format!(
                    "item {i} starts at position {}: a {} model reads a whole text in one pass",
                    item.start_pos,
                    cfg.arch.name()
                )));
            }
            if item.start_pos > item.cache.len() {
                return Err(ModelError::InvalidBatch(format!(
                    "item {i} starts at position {} but its cache holds only {}",
                    item.start_pos,
                    item.cache.len()
                )));
            }
            let needed = item.start_pos + item.tokens.len();
            if needed > item.cache.capacity() {
                return Err(ModelError::ContextOverflow {
                    needed,
                    capacity: item.cache.capacity(),
                });
            }
            if self.weights.position_embd.is_some() && needed > cfg.context_length {
                // Learned positions exist only up to the trained context.
                return Err(ModelError::ContextOverflow {
                    needed,
                    capacity: cfg.context_length,
                });
            }
            if let Some(&token) = item.tokens.iter().find(|&&t| t as usize >= cfg.n_vocab) {
                return Err(ModelError::InvalidToken {
                    token,
                    n_vocab: cfg.n_vocab,
                });
            }
        }
        Ok(())
    }

    /// Token embeddings (one row looked up per token), scaled and with learned positions and
    /// BERT's token type added, then normalised, where the architecture says so.
    fn embed(&self, batch: &[BatchItem], scratch: &mut Scratch) -> Result<(), ModelError> {
        let cfg = &self.config;
        let n_tokens = scratch.slots.len();
        let x = sized(&mut scratch.x, n_tokens * cfg.n_embd);
        let table = self.weights.token_embedding_matrix(&self.file)?;
        let positions = match &self.weights.position_embd {
            Some(info) => Some(WeightMatrix::from_tensor(&self.file, info)?),
            None => None,
        };
        let staged = sized(&mut scratch.proj, cfg.n_embd);
        for (row, slot) in x.chunks_exact_mut(cfg.n_embd).zip(&scratch.slots) {
            let item = &batch[slot.item];
            let token = item.tokens[slot.pos - item.start_pos];
            table.dequantize_row(token as usize, row)?;
            if let Some(s) = cfg.embedding_scale {
                ops::scale(row, s);
            }
            if let Some(positions) = &positions {
                positions.dequantize_row(slot.pos, staged)?;
                ops::add_assign(row, staged);
            }
            if let Some(token_type) = &self.weights.token_type0 {
                ops::add_assign(row, token_type);
            }
        }
        if let Some(norm) = &self.weights.embedding_norm {
            normalize_rows_in_place(cfg, norm, x);
        }
        Ok(())
    }

    /// `cos` and `sin` of every token's rotation angles, once per pass rather than per layer.
    fn rope_tables(&self, scratch: &mut Scratch) {
        let n_tokens = scratch.slots.len();
        for (table, freqs) in scratch.rope.iter_mut().zip([&self.rope, &self.rope_swa]) {
            let Some(freqs) = freqs else { continue };
            let half = freqs.inv_freq.len();
            let table = sized(table, n_tokens * 2 * half);
            for (row, slot) in table.chunks_exact_mut(2 * half).zip(&scratch.slots) {
                let (cos, sin) = row.split_at_mut(half);
                freqs.cos_sin(slot.pos, cos, sin);
            }
        }
    }

    fn layer(
        &self,
        pool: &ThreadPool,
        scratch: &mut Scratch,
        batch: &mut [BatchItem],
        il: usize,
        n_tokens: usize,
    ) -> Result<(), ModelError> {
        let cfg = &self.config;
        let w = &self.weights.layers[il];
        let embd = cfg.n_embd;
        let (q_dim, k_dim, v_dim) = (cfg.q_dim(), cfg.k_dim(), cfg.v_dim());

        // Attention block. Pre-LN models project the normalised residual; post-LN encoders
        // project the residual itself and normalise after the add.
        let x = sized(&mut scratch.x, n_tokens * embd);
        let xn = sized(&mut scratch.xn, n_tokens * embd);
        if cfg.norm_after_residual {
            xn.copy_from_slice(x);
        } else {
            let pieces = x.chunks(embd).zip(xn.chunks_mut(embd));
            in_row_parts(pool, n_tokens, embd, pieces, &|rows| {
                for (x, xn) in rows {
                    normalize_rows(cfg, &w.attn_norm, x, xn);
                }
            });
        }

        let q = sized(&mut scratch.q, n_tokens * q_dim);
        let k = sized(&mut scratch.k, n_tokens * k_dim);
        let v = sized(&mut scratch.v, n_tokens * v_dim);
        match &w.qkv {
            QkvWeights::Separate {
                q: wq,
                k: wk,
                v: wv,
            } => {
                self.linears_shared_input(pool, &[wq, wk, wv], xn, n_tokens, &mut [q, k, v])?;
            }
            QkvWeights::Fused(wqkv) => {
                let width = q_dim + k_dim + v_dim;
                let qkv = sized(&mut scratch.qkv, n_tokens * width);
                self.linear(pool, wqkv, xn, n_tokens, qkv)?;
                for (t, row) in qkv.chunks_exact(width).enumerate() {
                    let (rq, rest) = row.split_at(q_dim);
                    let (rk, rv) = rest.split_at(k_dim);
                    q[t * q_dim..][..q_dim].copy_from_slice(rq);
                    k[t * k_dim..][..k_dim].copy_from_slice(rk);
                    v[t * v_dim..][..v_dim].copy_from_slice(rv);
                }
            }
        }

        // Per token: QK-norm of every head, then RoPE (the tables hold one row per token).
        let rope = cfg.rope_for_layer(il).map(|rope| {
            let is_swa = cfg.window_for_layer(il).is_some();
            let half = rope.n_rot / 2;
            (
                rope.style,
                half,
                &scratch.rope[usize::from(is_swa)][..n_tokens * 2 * half],
            )
        });
        if w.q_norm.is_some() || rope.is_some() {
            let pieces = q.chunks_exact_mut(q_dim).zip(k.chunks_exact_mut(k_dim));
            in_row_parts(pool, n_tokens, q_dim + k_dim, pieces.enumerate(), &|rows| {
                for (t, (qt, kt)) in rows {
                    if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
                        for head in qt.chunks_exact_mut(cfg.head_dim_k) {
                            ops::rms_norm_in_place(head, qn, cfg.norm_eps);
                        }
                        for head in kt.chunks_exact_mut(cfg.head_dim_k) {
                            ops::rms_norm_in_place(head, kn, cfg.norm_eps);
                        }
                    }
                    if let Some((style, half, table)) = rope {
                        let (cos, sin) = table[t * 2 * half..][..2 * half].split_at(half);
                        for head in qt.chunks_exact_mut(cfg.head_dim_k) {
                            ops::apply_rope(head, style, cos, sin);
                        }
                        for head in kt.chunks_exact_mut(cfg.head_dim_k) {
                            ops::apply_rope(head, style, cos, sin);
                        }
                    }
                }
            });
        }

        for (t, slot) in scratch.slots.iter().enumerate() {
            batch[slot.item].cache.write(
                il,
                slot.pos,
                &k[t * k_dim..][..k_dim],
                &v[t * v_dim..][..v_dim],
            );
        }

        let attn = sized(&mut scratch.attn, n_tokens * cfg.attn_out_dim());
        let caches: Vec<&KvCache> = batch.iter().map(|item| &*item.cache).collect();
        attention(
            pool,
            cfg,
            il,
            &caches,
            &scratch.slots,
            q,
            attn,
            &mut scratch.attention,
        );

        let proj = sized(&mut scratch.proj, n_tokens * embd);
        self.linear(pool, &w.attn_out, attn, n_tokens, proj)?;
        // The residual add, with the norms around it, and the feed-forward block's input.
        let pieces = x.chunks_exact_mut(embd).zip(proj.chunks_exact_mut(embd));
        let pieces = pieces.zip(xn.chunks_exact_mut(embd));
        in_row_parts(pool, n_tokens, embd, pieces, &|rows| {
            for ((x, proj), xn) in rows {
                if let Some(post) = &w.post_attn_norm {
                    normalize_rows_in_place(cfg, post, proj);
                }
                ops::add_assign(x, proj);
                if cfg.norm_after_residual {
                    normalize_rows_in_place(cfg, &w.attn_norm, x);
                    xn.copy_from_slice(x);
                } else {
                    normalize_rows(cfg, &w.ffn_norm, x, xn);
                }
            }
        });
        let ff = cfg.n_ff;
        let up = sized(&mut scratch.up, n_tokens * ff);
        let hidden: &[f32] = match (cfg.ffn, &w.ffn_gate) {
            (FfnKind::GeluErf, _) => {
                self.linear(pool, &w.ffn_up, xn, n_tokens, up)?;
                ops::gelu_erf_in_place(up);
                up
            }
            (FfnKind::Gelu, _) | (_, None) => {
                self.linear(pool, &w.ffn_up, xn, n_tokens, up)?;
                ops::gelu_in_place(up);
                up
            }
            (kind, Some(wg)) => {
                let gate = sized(&mut scratch.gate, n_tokens * ff);
                self.linears_shared_input(
                    pool,
                    &[&w.ffn_up, wg],
                    xn,
                    n_tokens,
                    &mut [&mut *up, &mut *gate],
                )?;
                let glu = if kind == FfnKind::GeGlu {
                    ops::geglu
                } else {
                    ops::swiglu
                };
                elementwise_pairs(pool, gate, up, glu);
                gate
            }
        };
        self.linear(pool, &w.ffn_down, hidden, n_tokens, proj)?;
        let pieces = x.chunks_exact_mut(embd).zip(proj.chunks_exact_mut(embd));
        in_row_parts(pool, n_tokens, embd, pieces, &|rows| {
            for (x, proj) in rows {
                if let Some(post) = &w.post_ffn_norm {
                    normalize_rows_in_place(cfg, post, proj);
                }
                ops::add_assign(x, proj);
                if cfg.norm_after_residual {
                    normalize_rows_in_place(cfg, &w.ffn_norm, x);
                }
            }
        });
        Ok(())
    }

    /// Final norm and LM head for the tokens that want logits.
    fn output(
        &self,
        pool: &ThreadPool,
        scratch: &mut Scratch,
        output: Output,
    ) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.config;
        let n_out = scratch.out_tokens.len();
        if n_out == 0 {
            return Ok(Vec::new());
        }
        let embd = cfg.n_embd;
        let gathered = sized(&mut scratch.proj, n_out * embd);
        for (dst, &t) in gathered.chunks_exact_mut(embd).zip(&scratch.out_tokens) {
            dst.copy_from_slice(&scratch.x[t * embd..][..embd]);
        }
        let normed: &[f32] = match &self.weights.output_norm {
            Some(norm) => {
                let normed = sized(&mut scratch.xn, n_out * embd);
                normalize_rows(cfg, norm, gathered, normed);
                normed
            }
            None => gathered,
        };
        let head = match (output, &self.weights.output) {
            (Output::Hidden, _) => return Ok(normed.to_vec()),
            (Output::Logits, Some(head)) => head,
            // Refused before the pass, in `forward_to`.
            (Output::Logits, None) => return Ok(Vec::new()),
        };
        let mut logits = vec![0f32; n_out * cfg.n_vocab];
        self.linear(pool, head, normed, n_out, &mut logits)?;
        Ok(logits)
    }
}

impl Model {
    /// `y = W·x (+ bias)` for `n_tokens` rows.
    fn linear(
        &self,
        pool: &ThreadPool,
        w: &Linear,
        x: &[f32],
        n_tokens: usize,
        y: &mut [f32],
    ) -> Result<(), ModelError> {
        let m = w.matrix(&self.file);
        if self.exact_matmuls {
            matmul_reference(pool, &m, x, n_tokens, y)?;
        } else {
            matmul(pool, &m, x, n_tokens, y)?;
        }
        if let Some(bias) = &w.bias {
            for row in y.chunks_exact_mut(m.rows) {
                ops::add_assign(row, bias);
            }
        }
        Ok(())
    }
}

impl Model {
    /// [`Model::linear`] for several weights applied to the same input (Q, K and V; gate and
    /// up): one kernel call, which quantizes the input once and, for decode steps, runs the
    /// matrices as one job (`kernels::matmul_shared_input`). Results equal separate calls.
    fn linears_shared_input(
        &self,
        pool: &ThreadPool,
        ws: &[&Linear],
        x: &[f32],
        n_tokens: usize,
        ys: &mut [&mut [f32]],
    ) -> Result<(), ModelError> {
        if self.exact_matmuls {
            for (w, y) in ws.iter().zip(ys.iter_mut()) {
                self.linear(pool, w, x, n_tokens, y)?;
            }
            return Ok(());
        }
        let matrices: Vec<_> = ws.iter().map(|w| w.matrix(&self.file)).collect();
        let refs: Vec<_> = matrices.iter().collect();
        matmul_shared_input(pool, &refs, x, n_tokens, ys)?;
        for ((w, m), y) in ws.iter().zip(&matrices).zip(ys.iter_mut()) {
            if let Some(bias) = &w.bias {
                for row in y.chunks_exact_mut(m.rows) {
                    ops::add_assign(row, bias);
                }
            }
        }
        Ok(())
    }
}

fn normalize_rows(cfg: &ModelConfig, norm: &Norm, x: &[f32], out: &mut [f32]) {
    let n = norm.weight.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        match cfg.norm {
            NormKind::Rms => ops::rms_norm(xr, &norm.weight, cfg.norm_eps, or),
            NormKind::Layer => {
                ops::layer_norm(xr, &norm.weight, norm.bias.as_deref(), cfg.norm_eps, or)
            }
        }
    }
}

fn normalize_rows_in_place(cfg: &ModelConfig, norm: &Norm, x: &mut [f32]) {
    let n = norm.weight.len();
    for row in x.chunks_exact_mut(n) {
        match cfg.norm {
            NormKind::Rms => ops::rms_norm_in_place(row, &norm.weight, cfg.norm_eps),
            NormKind::Layer => {
                ops::layer_norm_in_place(row, &norm.weight, norm.bias.as_deref(), cfg.norm_eps)
            }
        }
    }
}

/// Runs `f` over `rows` (one item per token row, `values_per_row` values each), split into
/// parts across the pool when a prompt's worth of values pays for the hand-off, as
/// [`elementwise_pairs`] splits its work; a decode step's few rows run on the caller. Between
/// the matmuls of a layer the norms, residual adds and RoPE otherwise ran on one thread while
/// the others waited: 5–8% of a 512-token prompt's time on one thread. Row-wise work, so how
/// it is split changes no bits.
fn in_row_parts<T: Send>(
    pool: &ThreadPool,
    n_rows: usize,
    values_per_row: usize,
    rows: impl Iterator<Item = T>,
    f: &(dyn Fn(&mut dyn Iterator<Item = T>) + Sync),
) {
    const MIN_PER_THREAD: usize = 64 * 1024;
    let parts = (n_rows * values_per_row / MIN_PER_THREAD)
        .clamp(1, pool.n_threads())
        .min(n_rows.max(1));
    let mut rows = rows;
    if parts <= 1 {
        f(&mut rows);
        return;
    }
    let pieces: Vec<std::sync::Mutex<Vec<T>>> = (0..parts)
        .map(|i| {
            let n = n_rows * (i + 1) / parts - n_rows * i / parts;
            std::sync::Mutex::new(rows.by_ref().take(n).collect())
        })
        .collect();
    pool.run_parts(parts, &|i, _| {
        if let Some(piece) = pieces.get(i) {
            let items = std::mem::take(&mut *piece.lock().unwrap_or_else(|e| e.into_inner()));
            f(&mut items.into_iter());
        }
    });
}

/// `f(gate part, up part)` over matching parts of `gate` and `up`, split across the pool when a
/// prompt's worth of elements pays for the hand-off (a decode step's few thousand do not): a
/// gated unit over a 512-token prompt is otherwise a few percent of prefill on one thread while
/// the others wait. Element-wise, so how it is split changes no bits.
fn elementwise_pairs(pool: &ThreadPool, gate: &mut [f32], up: &[f32], f: fn(&mut [f32], &[f32])) {
    const MIN_PER_THREAD: usize = 64 * 1024;
    let parts = (gate.len() / MIN_PER_THREAD).clamp(1, pool.n_threads());
    if parts <= 1 {
        f(gate, up);
        return;
    }
    let size = gate.len().div_ceil(parts);
    let pieces: Vec<std::sync::Mutex<(&mut [f32], &[f32])>> = gate
        .chunks_mut(size)
        .zip(up.chunks(size))
        .map(std::sync::Mutex::new)
        .collect();
    pool.run_parts(pieces.len(), &|i, _| {
        if let Some(piece) = pieces.get(i) {
            let mut piece = piece.lock().unwrap_or_else(|e| e.into_inner());
            let (gate, up) = &mut *piece;
            f(gate, up);
        }
    });
}

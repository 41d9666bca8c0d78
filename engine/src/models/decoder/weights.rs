//! Finding and checking a model's tensors. Weight matrices are copied at load into one arena
//! with huge pages, interleaved where the decode mat-vec wants that layout
//! ([`Weights::move_to_arena`]), or stay in the file mapping where the arena would gain
//! nothing (only their table entries are kept); the small vectors (norm weights, biases, RoPE
//! factors) are dequantized to f32 once at load.

use std::sync::Arc;

use crate::gguf::{GgufFile, TensorInfo};
use crate::kernels::{
    arena_layout, can_interleave, copy_rows_into, copy_to_arena_at_load, interleave_at_load,
    interleave_into, ArenaWeights, HugePageArena, Layout, WeightMatrix,
};

use super::config::{Arch, FfnKind, ModelConfig, NormKind};
use super::ModelError;

/// A weight matrix used in place, with an optional bias added to each output row.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub weight: TensorInfo,
    pub bias: Option<Vec<f32>>,
    /// The weight's copy in the model's arena (interleaved, or in GGUF's layout), when it was
    /// moved there at load; the mapping's copy is then not read again.
    pub in_arena: Option<Arc<ArenaWeights>>,
}

impl Linear {
    pub fn new(weight: TensorInfo, bias: Option<Vec<f32>>) -> Linear {
        Linear {
            weight,
            bias,
            in_arena: None,
        }
    }

    pub fn matrix<'a>(&'a self, file: &'a GgufFile) -> WeightMatrix<'a> {
        if let Some(w) = &self.in_arena {
            return w.matrix();
        }
        let (cols, rows) = self.weight.rows();
        WeightMatrix::rows(
            self.weight.ggml_type,
            rows as usize,
            cols as usize,
            file.tensor_data(&self.weight),
        )
    }
}

/// Normalisation weights (and bias, for LayerNorm).
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

// One value per layer: the size difference between the variants costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum QkvWeights {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// One matrix whose output rows are all of Q, then K, then V (GPT-2's `attn_qkv`).
    Fused(Linear),
}

#[derive(Debug, Clone)]
pub(crate) struct LayerWeights {
    /// Normalises the attention block's input, or, where the config says
    /// `norm_after_residual` (BERT's `attn_output_norm`), the residual after its add.
    pub attn_norm: Norm,
    pub qkv: QkvWeights,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub attn_out: Linear,
    pub post_attn_norm: Option<Norm>,
    /// As `attn_norm`, for the FFN block (BERT's `layer_output_norm`).
    pub ffn_norm: Norm,
    pub ffn_gate: Option<Linear>,
    pub ffn_up: Linear,
    pub ffn_down: Linear,
    pub post_ffn_norm: Option<Norm>,
}

#[derive(Debug, Clone)]
pub(crate) struct Weights {
    pub token_embd: TensorInfo,
    /// Learned absolute positions (GPT-2, BERT), one row per position.
    pub position_embd: Option<TensorInfo>,
    /// BERT's embedding of token type 0 ("sentence A"), added to every token.
    pub token_type0: Option<Vec<f32>>,
    /// BERT's LayerNorm of the summed embeddings (`token_embd_norm`).
    pub embedding_norm: Option<Norm>,
    /// The final norm before the LM head (absent in post-LN encoders, whose last layer ends
    /// in a norm).
    pub output_norm: Option<Norm>,
    /// The LM head: `output.weight`, or the token embeddings when they are tied; none for
    /// models that only embed.
    pub output: Option<Linear>,
    /// LLaMA 3.1's per-frequency RoPE divisors (`rope_freqs.weight`).
    pub rope_freqs: Option<Vec<f32>>,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    /// Every weight matrix the layers and the LM head multiply by.
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        let layers = self.layers.iter_mut().flat_map(|l| {
            let qkv: Vec<&mut Linear> = match &mut l.qkv {
                QkvWeights::Separate { q, k, v } => vec![q, k, v],
                QkvWeights::Fused(qkv) => vec![qkv],
            };
            qkv.into_iter()
                .chain([&mut l.attn_out, &mut l.ffn_up, &mut l.ffn_down])
                .chain(l.ffn_gate.as_mut())
        });
        layers.chain(self.output.as_mut())
    }

    /// Moves the weight matrices out of the file mapping into one [`HugePageArena`], each
    /// matrix in the interleaved layout where this CPU's kernels use it for its type
    /// ([`interleave_at_load`]), else as it is in the file ([`copy_to_arena_at_load`]). The
    /// arena has huge pages where the OS has them, which is what lets decode stream the
    /// weights at the memory's speed (see `kernels::arena`).
    ///
    /// One matrix at a time, the mapping's pages of each are released as they are copied:
    /// resident memory stays about the file's size, not twice it. Results do not change (the
    /// kernels are bit-identical on both layouts). If the arena cannot be mapped the weights
    /// stay where they are.
    pub fn move_to_arena(&mut self, file: &GgufFile) {
        let copy_rows = copy_to_arena_at_load();
        let todo: Vec<(&mut Linear, WeightMatrix, Layout)> = self
            .linears_mut()
            .filter(|linear| linear.in_arena.is_none())
            .filter_map(|linear| {
                let rows = WeightMatrix::from_tensor(file, &linear.weight).ok()?;
                let layout = if interleave_at_load(rows.ty) && can_interleave(&rows) {
                    Layout::Interleaved8
                } else if copy_rows {
                    Layout::Rows
                } else {
                    return None;
                };
                Some((linear, rows, layout))
            })
            .collect();
        // A tied LM head appears once (`output`), so no matrix is copied twice.
        let (ranges, total) = arena_layout(todo.iter().map(|(_, rows, _)| rows.data.len()));
        if total == 0 {
            return;
        }
        let Ok(mut arena) = HugePageArena::zeroed(total) else {
            return;
        };
        for ((linear, rows, layout), range) in todo.iter().zip(&ranges) {
            // Release in steps of about a megabyte: one `madvise` per eight rows would be
            // thousands of calls for an embedding table.
            const RELEASE_STEP: usize = 1 << 20;
            let mut released = 0;
            let release = |consumed: std::ops::Range<usize>| {
                if consumed.end - released >= RELEASE_STEP || consumed.end == rows.data.len() {
                    file.release_tensor_pages(&linear.weight, released..consumed.end);
                    released = consumed.end;
                }
            };
            let out = &mut arena.bytes_mut()[range.clone()];
            match layout {
                Layout::Interleaved8 => interleave_into(rows, out, release),
                Layout::Rows => copy_rows_into(rows, out, RELEASE_STEP, release),
            }
        }
        let arena = Arc::new(arena);
        for ((linear, rows, layout), range) in todo.into_iter().zip(ranges) {
            let copy = ArenaWeights::in_arena(&rows, layout, Arc::clone(&arena), range);
            linear.in_arena = Some(Arc::new(copy));
        }
    }

    /// The token embedding table: the LM head's arena copy when they are tied and it
    /// was moved there (so the released pages of the mapping stay released).
    pub fn token_embedding_matrix<'a>(
        &'a self,
        file: &'a GgufFile,
    ) -> Result<WeightMatrix<'a>, crate::kernels::KernelError> {
        if let Some(output) = &self.output {
            if output.weight.name == self.token_embd.name && output.in_arena.is_some() {
                return Ok(output.matrix(file));
            }
        }
        WeightMatrix::from_tensor(file, &self.token_embd)
    }
}

/// The token embedding table and the vocabulary size it implies.
pub(crate) fn token_embedding(file: &GgufFile) -> Result<(TensorInfo, usize), ModelError> {
    let info = file
        .tensor("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
    match info.dims.as_slice() {
        [_, n_vocab] => {
            let n_vocab = *n_vocab as usize;
            Ok((info.clone(), n_vocab))
        }
        dims => Err(ModelError::TensorShape {
            name: info.name.clone(),
            expected: "2 dimensions [n_embd, n_vocab]".into(),
            found: dims.to_vec(),
        }),
    }
}

struct Loader<'a> {
    file: &'a GgufFile,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.file.tensor(name)
    }

    /// A `rows × cols` matrix (ggml dims `[cols, rows]`) in a type the kernels handle.
    fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<TensorInfo, ModelError> {
        let info = self
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        if info.dims != [cols as u64, rows as u64] {
            return Err(ModelError::TensorShape {
                name: name.to_owned(),
                expected: format!("[{cols}, {rows}]"),
                found: info.dims.clone(),
            });
        }
        WeightMatrix::from_tensor(self.file, info)?;
        Ok(info.clone())
    }

    fn optional_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, ModelError> {
        let Some(info) = self.info(name) else {
            return Ok(None);
        };
        if info.n_elements != len as u64 {
            return Err(ModelError::TensorShape {
                name: name.to_owned(),
                expected: format!("[{len}]"),
                found: info.dims.clone(),
            });
        }
        let values =
            self.file
                .dequantize_f32(name)
                .map_err(|_| ModelError::UnsupportedTensorType {
                    name: name.to_owned(),
                    ty: info.ggml_type,
                })?;
        Ok(Some(values))
    }

    /// Row 0 of `token_types.weight` (`[n_embd, n_types]`), if the file has the table:
    /// egpu, like llama.cpp, embeds every token as "sentence A".
    fn token_type0(&self, n_embd: usize) -> Result<Option<Vec<f32>>, ModelError> {
        const NAME: &str = "token_types.weight";
        let Some(info) = self.info(NAME) else {
            return Ok(None);
        };
        if info.dims.len() != 2 || info.dims[0] != n_embd as u64 || info.dims[1] == 0 {
            return Err(ModelError::TensorShape {
                name: NAME.to_owned(),
                expected: format!("[{n_embd}, n_types]"),
                found: info.dims.clone(),
            });
        }
        let mut row = vec![0f32; n_embd];
        WeightMatrix::from_tensor(self.file, info)?.dequantize_row(0, &mut row)?;
        Ok(Some(row))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        self.optional_vector(name, len)?
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))
    }

    fn linear(&self, prefix: &str, cols: usize, rows: usize) -> Result<Linear, ModelError> {
        Ok(Linear::new(
            self.matrix(&format!("{prefix}.weight"), cols, rows)?,
            self.optional_vector(&format!("{prefix}.bias"), rows)?,
        ))
    }

    fn norm(&self, prefix: &str, len: usize, kind: NormKind) -> Result<Norm, ModelError> {
        Ok(Norm {
            weight: self.vector(&format!("{prefix}.weight"), len)?,
            bias: match kind {
                NormKind::Layer => self.optional_vector(&format!("{prefix}.bias"), len)?,
                NormKind::Rms => None,
            },
        })
    }
}

impl Weights {
    pub fn load(file: &GgufFile, cfg: &ModelConfig) -> Result<Weights, ModelError> {
        let l = Loader { file };
        let (token_embd, _) = token_embedding(file)?;
        let token_embd = l.matrix(&token_embd.name, cfg.n_embd, cfg.n_vocab)?;
        let position_embd = match cfg.arch {
            Arch::Gpt2 | Arch::Bert => {
                Some(l.matrix("position_embd.weight", cfg.n_embd, cfg.context_length)?)
            }
            _ => None,
        };
        let output = if !cfg.has_lm_head {
            None
        } else if l.info("output.weight").is_some() {
            Some(l.linear("output", cfg.n_embd, cfg.n_vocab)?)
        } else {
            // Tied embeddings: the LM head is the token embedding table.
            Some(Linear::new(token_embd.clone(), None))
        };
        let (token_type0, embedding_norm) = if cfg.arch.is_encoder() {
            (
                l.token_type0(cfg.n_embd)?,
                Some(l.norm("token_embd_norm", cfg.n_embd, cfg.norm)?),
            )
        } else {
            (None, None)
        };
        let rope_freqs = match &cfg.rope {
            Some(rope) => l.optional_vector("rope_freqs.weight", rope.n_rot / 2)?,
            None => None,
        };
        let layers = (0..cfg.n_layer)
            .map(|il| Self::layer(&l, cfg, il))
            .collect::<Result<_, _>>()?;
        let output_norm = if cfg.norm_after_residual {
            None
        } else {
            Some(l.norm("output_norm", cfg.n_embd, cfg.norm)?)
        };
        Ok(Weights {
            output_norm,
            token_embd,
            position_embd,
            token_type0,
            embedding_norm,
            output,
            rope_freqs,
            layers,
        })
    }

    fn layer(l: &Loader, cfg: &ModelConfig, il: usize) -> Result<LayerWeights, ModelError> {
        let p = |name: &str| format!("blk.{il}.{name}");
        let (embd, ff) = (cfg.n_embd, cfg.n_ff);
        let qkv = if l.info(&p("attn_qkv.weight")).is_some() {
            QkvWeights::Fused(l.linear(
                &p("attn_qkv"),
                embd,
                cfg.q_dim() + cfg.k_dim() + cfg.v_dim(),
            )?)
        } else {
            QkvWeights::Separate {
                q: l.linear(&p("attn_q"), embd, cfg.q_dim())?,
                k: l.linear(&p("attn_k"), embd, cfg.k_dim())?,
                v: l.linear(&p("attn_v"), embd, cfg.v_dim())?,
            }
        };
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(l.vector(&p("attn_q_norm.weight"), cfg.head_dim_k)?),
                Some(l.vector(&p("attn_k_norm.weight"), cfg.head_dim_k)?),
            )
        } else {
            (None, None)
        };
        let (post_attn_norm, post_ffn_norm) = if cfg.post_norms {
            (
                Some(l.norm(&p("post_attention_norm"), embd, cfg.norm)?),
                Some(l.norm(&p("post_ffw_norm"), embd, cfg.norm)?),
            )
        } else {
            (None, None)
        };
        let ffn_gate = match cfg.ffn {
            FfnKind::SwiGlu | FfnKind::GeGlu => Some(l.linear(&p("ffn_gate"), embd, ff)?),
            FfnKind::Gelu | FfnKind::GeluErf => None,
        };
        let (attn_norm, ffn_norm) = if cfg.norm_after_residual {
            ("attn_output_norm", "layer_output_norm")
        } else {
            ("attn_norm", "ffn_norm")
        };
        Ok(LayerWeights {
            attn_norm: l.norm(&p(attn_norm), embd, cfg.norm)?,
            qkv,
            q_norm,
            k_norm,
            attn_out: l.linear(&p("attn_output"), cfg.attn_out_dim(), embd)?,
            post_attn_norm,
            ffn_norm: l.norm(&p(ffn_norm), embd, cfg.norm)?,
            ffn_gate,
            ffn_up: l.linear(&p("ffn_up"), embd, ff)?,
            ffn_down: l.linear(&p("ffn_down"), ff, embd)?,
            post_ffn_norm,
        })
    }
}

//! The Marian encoder-decoder (Helsinki-NLP opus-mt), run from the GGUF [`crate::convert::marian`]
//! writes, computing what transformers' `MarianMTModel` computes.
//!
//! - **Encoder:** token embeddings (scaled by √d_model when `scale_embedding`) plus sinusoidal
//!   positions, then post-norm layers: `h = LN(h + SelfAttn(h))`, `h = LN(h + FFN(h))`.
//! - **Decoder:** the same embeddings and positions from the decoder start token, then
//!   `h = LN(h + CausalSelfAttn(h))`, `h = LN(h + CrossAttn(h, encoder))`, `h = LN(h + FFN(h))`;
//!   logits are `h · embeddingsᵀ + final_logits_bias`.
//! - **Decoding** ([`MarianModel::translate`]): greedy or beam search as the model's
//!   `generation_config.json` asks, with transformers' logits processors for these models
//!   (forbidden tokens, the end token forced at the last position) and its beam bookkeeping; see
//!   [`beam`].
//!
//! A batch of sentences is translated together: every decoder step runs all live hypotheses of
//! all sentences through each weight matrix at once. Each sentence is encoded on its own, so
//! nothing is padded and no sentence's numbers depend on another's.

mod beam;

use std::sync::Arc;

use crate::gguf::{GgufFile, Metadata, TensorInfo};
use crate::kernels::{matmul, ThreadPool, WeightMatrix};
use crate::ops::{gelu, gelu_erf, layer_norm, silu, softmax};

pub use beam::{EarlyStopping, Hypothesis, SearchSettings};

/// A thread pool, lent for one pass at a time: egpud shares one device between models, which
/// take turns pass by pass. A bare [`ThreadPool`] lends itself.
pub trait PoolAccess {
    fn with_pool(&self, f: &mut dyn FnMut(&ThreadPool));
}

impl PoolAccess for ThreadPool {
    fn with_pool(&self, f: &mut dyn FnMut(&ThreadPool)) {
        f(self)
    }
}

/// Runs `f` on a pool from `pools`.
fn on_pool<T>(
    pools: &dyn PoolAccess,
    f: impl FnOnce(&ThreadPool) -> Result<T, MarianError>,
) -> Result<T, MarianError> {
    let mut f = Some(f);
    let mut out = None;
    pools.with_pool(&mut |pool| {
        if let Some(f) = f.take() {
            out = Some(f(pool));
        }
    });
    out.unwrap_or(Err(MarianError::NoPool))
}

/// Errors loading or running a Marian model.
#[derive(Debug, thiserror::Error)]
pub enum MarianError {
    #[error("not a Marian GGUF: general.architecture is {0:?}")]
    NotMarian(String),
    #[error("missing metadata key {0}")]
    MissingKey(String),
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name} has dims {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("activation {0:?} is not implemented (swish, silu, relu, gelu, gelu_new are)")]
    UnsupportedActivation(String),
    #[error("kernel: {0}")]
    Kernel(#[from] crate::kernels::KernelError),
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    TokenOutOfRange { id: u32, n_vocab: usize },
    #[error("the source has {len} tokens; this model's positions end at {max}")]
    SourceTooLong { len: usize, max: usize },
    #[error("the source is empty")]
    EmptySource,
    #[error("no thread pool was lent for the pass")]
    NoPool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Relu,
    /// The exact (erf) GELU: transformers' `"gelu"`, its default for Marian.
    Gelu,
    /// The tanh approximation: `"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`.
    GeluTanh,
}

/// Hyper-parameters, from `marian.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct MarianConfig {
    pub d_model: usize,
    pub n_vocab: usize,
    pub encoder_layers: usize,
    pub encoder_heads: usize,
    pub decoder_layers: usize,
    pub decoder_heads: usize,
    /// Positions the sinusoidal table covers; sources and outputs are at most this long.
    pub max_positions: usize,
    pub norm_eps: f32,
    pub activation: Activation,
    pub embed_scale: f32,
    pub decoder_start: u32,
    pub eos: u32,
    pub pad: u32,
}

impl MarianConfig {
    pub fn from_metadata(meta: &Metadata) -> Result<MarianConfig, MarianError> {
        let arch = meta.architecture().unwrap_or("");
        if arch != "marian" {
            return Err(MarianError::NotMarian(arch.to_owned()));
        }
        let int = |key: &str| {
            meta.get_u64(key)
                .map(|v| v as usize)
                .ok_or_else(|| MarianError::MissingKey(key.to_owned()))
        };
        let d_model = int("marian.embedding_length")?;
        let activation = match meta.get_str("marian.activation").unwrap_or("swish") {
            "swish" | "silu" => Activation::Silu,
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            other => return Err(MarianError::UnsupportedActivation(other.to_owned())),
        };
        let n_vocab = meta
            .get_str_array("tokenizer.ggml.tokens")
            .map(<[String]>::len)
            .ok_or_else(|| MarianError::MissingKey("tokenizer.ggml.tokens".into()))?;
        let scale = meta.get_bool("marian.scale_embedding").unwrap_or(false);
        Ok(MarianConfig {
            d_model,
            n_vocab,
            encoder_layers: int("marian.encoder.block_count")?,
            encoder_heads: int("marian.encoder.attention.head_count")?,
            decoder_layers: int("marian.block_count")?,
            decoder_heads: int("marian.attention.head_count")?,
            max_positions: int("marian.context_length")?,
            norm_eps: meta
                .get_f32("marian.attention.layer_norm_epsilon")
                .unwrap_or(1e-5),
            activation,
            embed_scale: if scale { (d_model as f32).sqrt() } else { 1.0 },
            decoder_start: int("marian.decoder_start_token_id")? as u32,
            eos: int("tokenizer.ggml.eos_token_id")? as u32,
            pad: int("tokenizer.ggml.padding_token_id")? as u32,
        })
    }
}

#[derive(Debug, Clone)]
struct Linear {
    weight: TensorInfo,
    bias: Vec<f32>,
}

#[derive(Debug, Clone)]
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm: Norm,
}

#[derive(Debug, Clone)]
struct Layer {
    attn: Attention,
    up: Linear,
    down: Linear,
    ffn_norm: Norm,
}

/// A loaded Marian model. Weights stay in the GGUF mapping.
#[derive(Debug)]
pub struct MarianModel {
    file: Arc<GgufFile>,
    config: MarianConfig,
    settings: SearchSettings,
    embeddings: TensorInfo,
    output: Option<TensorInfo>,
    output_bias: Vec<f32>,
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
    /// Each decoder layer's attention over the source.
    cross: Vec<Attention>,
    /// `max_positions × d_model` sinusoidal table.
    positions: Vec<f32>,
}

/// A source sentence after the encoder: the keys and values every decoder layer's cross-attention
/// reads, computed once.
#[derive(Debug, Clone)]
pub struct EncodedSource {
    len: usize,
    /// Per decoder layer: `len × d_model` keys, then values.
    cross_kv: Vec<(Vec<f32>, Vec<f32>)>,
}

/// One decoder hypothesis's self-attention cache.
#[derive(Debug, Clone, Default)]
pub struct DecoderCache {
    /// Per layer: keys and values of every fed token, `t × d_model` each.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl DecoderCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.capacity() + v.capacity()) * 4)
            .sum()
    }
}

/// One row of a decoder step: a hypothesis, the token it feeds and the source it reads.
#[derive(Debug)]
pub struct StepRow<'a> {
    pub cache: &'a mut DecoderCache,
    pub token: u32,
    pub source: &'a EncodedSource,
}

impl MarianModel {
    pub fn load(file: Arc<GgufFile>) -> Result<MarianModel, MarianError> {
        let meta = file.metadata();
        let config = MarianConfig::from_metadata(meta)?;
        let settings = SearchSettings::from_metadata(meta, &config);
        let (d, v) = (config.d_model as u64, config.n_vocab as u64);
        let tensor = |name: &str, dims: &[u64]| -> Result<TensorInfo, MarianError> {
            let info = file
                .tensor(name)
                .ok_or_else(|| MarianError::MissingTensor(name.to_owned()))?;
            if info.dims != dims {
                return Err(MarianError::TensorShape {
                    name: name.to_owned(),
                    found: info.dims.clone(),
                    expected: dims.to_vec(),
                });
            }
            WeightMatrix::from_tensor(&file, info)?;
            Ok(info.clone())
        };
        let vector = |name: &str, n: u64| -> Result<Vec<f32>, MarianError> {
            let info = tensor(name, &[n])?;
            let mut out = vec![0.0; n as usize];
            WeightMatrix::from_tensor(&file, &info)?.dequantize_row(0, &mut out)?;
            Ok(out)
        };
        let linear = |name: &str, cols: u64, rows: u64| -> Result<Linear, MarianError> {
            Ok(Linear {
                weight: tensor(&format!("{name}.weight"), &[cols, rows])?,
                bias: vector(&format!("{name}.bias"), rows)?,
            })
        };
        let norm = |name: &str| -> Result<Norm, MarianError> {
            Ok(Norm {
                weight: vector(&format!("{name}.weight"), d)?,
                bias: vector(&format!("{name}.bias"), d)?,
            })
        };
        let attention = |prefix: &str| -> Result<Attention, MarianError> {
            Ok(Attention {
                q: linear(&format!("{prefix}_q"), d, d)?,
                k: linear(&format!("{prefix}_k"), d, d)?,
                v: linear(&format!("{prefix}_v"), d, d)?,
                o: linear(&format!("{prefix}_o"), d, d)?,
                norm: norm(&format!("{prefix}_norm"))?,
            })
        };
        let layers = |side: &str, n: usize, ffn_key: &str| {
            let ffn = meta
                .get_u64(ffn_key)
                .ok_or_else(|| MarianError::MissingKey(ffn_key.to_owned()))?;
            (0..n)
                .map(|i| {
                    let p = format!("{side}.blk.{i}.");
                    Ok(Layer {
                        attn: attention(&format!("{p}attn"))?,
                        up: linear(&format!("{p}ffn_up"), d, ffn)?,
                        down: linear(&format!("{p}ffn_down"), ffn, d)?,
                        ffn_norm: norm(&format!("{p}ffn_norm"))?,
                    })
                })
                .collect::<Result<Vec<_>, MarianError>>()
        };
        let encoder = layers(
            "enc",
            config.encoder_layers,
            "marian.encoder.feed_forward_length",
        )?;
        let decoder = layers("dec", config.decoder_layers, "marian.feed_forward_length")?;
        let cross = (0..config.decoder_layers)
            .map(|i| attention(&format!("dec.blk.{i}.cross_attn")))
            .collect::<Result<Vec<_>, MarianError>>()?;
        let output = match file.tensor("output.weight") {
            Some(_) => Some(tensor("output.weight", &[d, v])?),
            None => None,
        };
        Ok(MarianModel {
            embeddings: tensor("token_embd.weight", &[d, v])?,
            output,
            output_bias: vector("output_bias", v)?,
            encoder,
            decoder,
            cross,
            positions: sinusoidal_positions(config.max_positions, config.d_model),
            settings,
            config,
            file,
        })
    }

    pub fn config(&self) -> &MarianConfig {
        &self.config
    }

    /// The decoding settings from the model's `generation_config.json`.
    pub fn search_settings(&self) -> &SearchSettings {
        &self.settings
    }

    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    fn matrix(&self, info: &TensorInfo) -> WeightMatrix<'_> {
        let (cols, rows) = info.rows();
        WeightMatrix::rows(
            info.ggml_type,
            rows as usize,
            cols as usize,
            self.file.tensor_data(info),
        )
    }

    fn linear(
        &self,
        pool: &ThreadPool,
        lin: &Linear,
        x: &[f32],
        n: usize,
    ) -> Result<Vec<f32>, MarianError> {
        let w = self.matrix(&lin.weight);
        let mut y = vec![0.0; n * w.rows];
        matmul(pool, &w, x, n, &mut y)?;
        for row in y.chunks_exact_mut(w.rows) {
            for (v, b) in row.iter_mut().zip(&lin.bias) {
                *v += b;
            }
        }
        Ok(y)
    }

    /// Embeddings (scaled) plus the sinusoidal position of each token.
    fn embed(&self, tokens: &[u32], positions: &[usize]) -> Result<Vec<f32>, MarianError> {
        let d = self.config.d_model;
        let table = self.matrix(&self.embeddings);
        let mut x = vec![0.0; tokens.len() * d];
        for ((row, &token), &pos) in x.chunks_exact_mut(d).zip(tokens).zip(positions) {
            if token as usize >= self.config.n_vocab {
                return Err(MarianError::TokenOutOfRange {
                    id: token,
                    n_vocab: self.config.n_vocab,
                });
            }
            table.dequantize_row(token as usize, row)?;
            let position = &self.positions[pos * d..(pos + 1) * d];
            for (v, p) in row.iter_mut().zip(position) {
                *v = *v * self.config.embed_scale + p;
            }
        }
        Ok(x)
    }

    /// Residual add then LayerNorm, row by row: `x = LN(x + delta)`.
    fn add_norm(&self, x: &mut [f32], delta: &[f32], norm: &Norm) {
        let d = self.config.d_model;
        let mut sum = vec![0.0; d];
        for (row, delta) in x.chunks_exact_mut(d).zip(delta.chunks_exact(d)) {
            for ((s, a), b) in sum.iter_mut().zip(row.iter()).zip(delta) {
                *s = a + b;
            }
            layer_norm(
                &sum,
                &norm.weight,
                Some(&norm.bias),
                self.config.norm_eps,
                row,
            );
        }
    }

    fn feed_forward(
        &self,
        pool: &ThreadPool,
        layer: &Layer,
        x: &mut [f32],
        n: usize,
    ) -> Result<(), MarianError> {
        let mut hidden = self.linear(pool, &layer.up, x, n)?;
        match self.config.activation {
            Activation::Silu => hidden.iter_mut().for_each(|v| *v = silu(*v)),
            Activation::Relu => hidden.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Gelu => hidden.iter_mut().for_each(|v| *v = gelu_erf(*v)),
            Activation::GeluTanh => hidden.iter_mut().for_each(|v| *v = gelu(*v)),
        }
        let out = self.linear(pool, &layer.down, &hidden, n)?;
        self.add_norm(x, &out, &layer.ffn_norm);
        Ok(())
    }

    /// Runs the encoder over one source sentence (its ids, ending with `</s>`).
    pub fn encode(&self, pool: &ThreadPool, source: &[u32]) -> Result<EncodedSource, MarianError> {
        let n = source.len();
        if n == 0 {
            return Err(MarianError::EmptySource);
        }
        if n > self.config.max_positions {
            return Err(MarianError::SourceTooLong {
                len: n,
                max: self.config.max_positions,
            });
        }
        let d = self.config.d_model;
        let positions: Vec<usize> = (0..n).collect();
        let mut x = self.embed(source, &positions)?;
        for layer in &self.encoder {
            let q = self.linear(pool, &layer.attn.q, &x, n)?;
            let k = self.linear(pool, &layer.attn.k, &x, n)?;
            let v = self.linear(pool, &layer.attn.v, &x, n)?;
            let mut mixed = vec![0.0; n * d];
            for (i, out) in mixed.chunks_exact_mut(d).enumerate() {
                attend(
                    &q[i * d..(i + 1) * d],
                    &k,
                    &v,
                    n,
                    self.config.encoder_heads,
                    out,
                );
            }
            let projected = self.linear(pool, &layer.attn.o, &mixed, n)?;
            self.add_norm(&mut x, &projected, &layer.attn.norm);
            self.feed_forward(pool, layer, &mut x, n)?;
        }
        let mut cross_kv = Vec::with_capacity(self.cross.len());
        for cross in &self.cross {
            cross_kv.push((
                self.linear(pool, &cross.k, &x, n)?,
                self.linear(pool, &cross.v, &x, n)?,
            ));
        }
        Ok(EncodedSource { len: n, cross_kv })
    }

    /// A fresh decoder cache (nothing fed yet).
    pub fn new_decoder_cache(&self) -> DecoderCache {
        DecoderCache {
            layers: vec![(Vec::new(), Vec::new()); self.decoder.len()],
            len: 0,
        }
    }

    /// Feeds one token to each row's hypothesis and returns the next-token logits, `rows ×
    /// n_vocab`.
    pub fn decode_step(
        &self,
        pool: &ThreadPool,
        rows: &mut [StepRow<'_>],
    ) -> Result<Vec<f32>, MarianError> {
        let n = rows.len();
        let d = self.config.d_model;
        if n == 0 {
            return Ok(Vec::new());
        }
        for row in rows.iter() {
            if row.cache.len >= self.config.max_positions {
                return Err(MarianError::SourceTooLong {
                    len: row.cache.len + 1,
                    max: self.config.max_positions,
                });
            }
        }
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let positions: Vec<usize> = rows.iter().map(|r| r.cache.len).collect();
        let mut x = self.embed(&tokens, &positions)?;
        for (l, (layer, cross)) in self.decoder.iter().zip(&self.cross).enumerate() {
            let q = self.linear(pool, &layer.attn.q, &x, n)?;
            let k = self.linear(pool, &layer.attn.k, &x, n)?;
            let v = self.linear(pool, &layer.attn.v, &x, n)?;
            let mut mixed = vec![0.0; n * d];
            for (i, row) in rows.iter_mut().enumerate() {
                let (keys, values) = &mut row.cache.layers[l];
                keys.extend_from_slice(&k[i * d..(i + 1) * d]);
                values.extend_from_slice(&v[i * d..(i + 1) * d]);
                let len = keys.len() / d;
                attend(
                    &q[i * d..(i + 1) * d],
                    keys,
                    values,
                    len,
                    self.config.decoder_heads,
                    &mut mixed[i * d..(i + 1) * d],
                );
            }
            let projected = self.linear(pool, &layer.attn.o, &mixed, n)?;
            self.add_norm(&mut x, &projected, &layer.attn.norm);

            let q = self.linear(pool, &cross.q, &x, n)?;
            for (i, row) in rows.iter().enumerate() {
                let (keys, values) = &row.source.cross_kv[l];
                attend(
                    &q[i * d..(i + 1) * d],
                    keys,
                    values,
                    row.source.len,
                    self.config.decoder_heads,
                    &mut mixed[i * d..(i + 1) * d],
                );
            }
            let projected = self.linear(pool, &cross.o, &mixed, n)?;
            self.add_norm(&mut x, &projected, &cross.norm);
            self.feed_forward(pool, layer, &mut x, n)?;
        }
        for row in rows.iter_mut() {
            row.cache.len += 1;
        }
        let head = self.matrix(self.output.as_ref().unwrap_or(&self.embeddings));
        let mut logits = vec![0.0; n * self.config.n_vocab];
        matmul(pool, &head, &x, n, &mut logits)?;
        for row in logits.chunks_exact_mut(self.config.n_vocab) {
            for (v, b) in row.iter_mut().zip(&self.output_bias) {
                *v += b;
            }
        }
        Ok(logits)
    }

    /// Bytes of weights in the mapping.
    pub fn weight_bytes(&self) -> u64 {
        self.file.tensor_bytes()
    }
}

/// Multi-head attention of one query row over `len` key/value rows (`len × d` each), with
/// transformers' `1/√head_dim` scaling of the query.
fn attend(query: &[f32], keys: &[f32], values: &[f32], len: usize, heads: usize, out: &mut [f32]) {
    let d = query.len();
    let hd = d / heads;
    let scale = (hd as f32).powf(-0.5);
    let mut scores = vec![0.0f32; len];
    out.fill(0.0);
    for h in 0..heads {
        let q: Vec<f32> = query[h * hd..(h + 1) * hd]
            .iter()
            .map(|v| v * scale)
            .collect();
        for (t, s) in scores.iter_mut().enumerate() {
            let k = &keys[t * d + h * hd..t * d + (h + 1) * hd];
            *s = q.iter().zip(k).map(|(a, b)| a * b).sum();
        }
        softmax(&mut scores);
        let o = &mut out[h * hd..(h + 1) * hd];
        for (t, &p) in scores.iter().enumerate() {
            let v = &values[t * d + h * hd..t * d + (h + 1) * hd];
            for (acc, x) in o.iter_mut().zip(v) {
                *acc += p * x;
            }
        }
    }
}

/// Memory a translation of `batch` sentences holds besides the weights, at most: every beam's
/// self-attention cache at the longest output and each sentence's cross-attention keys and
/// values at the longest source (f32), then `(caches, scratch)` where scratch is every beam's
/// logits and log-probabilities plus its activations.
pub fn batch_memory(config: &MarianConfig, settings: &SearchSettings, batch: u64) -> (u64, u64) {
    let (d, layers) = (config.d_model as u64, config.decoder_layers as u64);
    let beams = settings.num_beams.max(1) as u64;
    let max_length = settings.max_length as u64;
    let per_sentence = 2 * 4 * d * layers * (beams * max_length + config.max_positions as u64);
    let scratch = batch * beams * (config.n_vocab as u64 * 8 + 16 * d * 4);
    (per_sentence.saturating_mul(batch), scratch)
}

/// transformers' `MarianSinusoidalPositionalEmbedding`: for position `p` and `k < d/2`,
/// column `k` is `sin(p / 10000^(2k/d))` and column `d/2 + k` its cosine (not interleaved),
/// computed in f64 and rounded to f32.
fn sinusoidal_positions(n_positions: usize, d: usize) -> Vec<f32> {
    let half = d.div_ceil(2);
    let mut table = vec![0.0f32; n_positions * d];
    for p in 0..n_positions {
        let row = &mut table[p * d..(p + 1) * d];
        for j in 0..d {
            let angle = p as f64 / 10000f64.powf((2 * (j / 2)) as f64 / d as f64);
            if j % 2 == 0 {
                row[j / 2] = angle.sin() as f32;
            } else {
                row[half + j / 2] = angle.cos() as f32;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_sines_then_cosines() {
        let t = sinusoidal_positions(3, 4);
        // p = 2: frequencies 1 and 1/100.
        let row = &t[8..12];
        assert!((row[0] - 2f32.sin()).abs() < 1e-7);
        assert!((row[1] - 0.02f32.sin()).abs() < 1e-7);
        assert!((row[2] - 2f32.cos()).abs() < 1e-7);
        assert!((row[3] - 0.02f32.cos()).abs() < 1e-7);
        assert!(t[..4] == [0.0, 0.0, 1.0, 1.0]);
    }
}

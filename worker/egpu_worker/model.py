"""Decoder-only transformers over quantized GGUF weights, several sequences ("slots") per step.

Architectures (general.architecture) and their semantics follow egpu's native engine (engine/src/models/decoder/):
  llama   RMSNorm, normal RoPE (adjacent pairs (x[2i], x[2i+1])), SwiGLU; LLaMA 3.1 rope_freqs.weight divides
          each RoPE frequency; linear RoPE scaling
  qwen2   llama with NeoX RoPE (halves (x[i], x[i + n_rot/2])) and q/k/v biases
  qwen3   NeoX RoPE, per-head RMS QK-norm, head_dim from attention.key_length (n_head * head_dim may differ
          from n_embd), no biases
  gemma3  embeddings scaled by sqrt(n_embd), QK-norm, post-attention and post-FFN RMSNorms, GeGLU (tanh GELU),
          5 of every 6 layers with a sliding window and their own RoPE base (rope.freq_base_swa, default 1e4),
          norm weights used as stored (the GGUF converter has already added Gemma's +1), no logit softcap
  gpt2    LayerNorm with bias, learned absolute positions, fused attn_qkv with bias, GELU MLP, biased linears
  bert    an encoder (embeddings only, for egpud's Embed): learned positions plus token type 0, LayerNorm of the
          embeddings, bidirectional attention over the whole text, LayerNorm after each residual add (post-LN),
          exact (erf) GELU MLP, biased linears, no LM head; a text is one pass from position 0
Common: theta_i = pos * freq_scale * base^(-2i/n_rot) / factor_i from f64; grouped-query attention (query head h
reads KV head h // (n_head / n_head_kv)); any linear with a `.bias` tensor adds it; the LM head is tied to the
token embeddings when the file has no `output.weight`.

Weights: each GGUF tensor's bytes are one uint8 buffer on the device; each matrix is a lazy dequantizing view
of its bytes (egpu_worker.quant) that tinygrad fuses into the matmul. Activations, norms, RoPE and softmax are
f32; the KV cache is f16 on the device. quant.dequantize ends in a cast to f16, but with f32 activations the
matmul casts back to f32 and tinygrad 0.14 folds the f32->f16->f32 pair away (checked: a cast round trip of
3.14159265 stays 3.1415927), so the weights enter the matmul exactly as dequantized in f32. Measured against
transformers float64 on the engine's tiny fixtures, the f16 KV cache is what remains: max abs logit diff
0.0009-0.0085 with it, 0.000006-0.00005 with an f32 cache (experiment, not kept).

The API is the one egpud's scheduler drives (through serve.py): `load_model(path, ctx, slots)` owns a KV cache of
`ctx` positions for each of `slots` sequences, and `step(items)` feeds each item's tokens to its slot at its
`start_pos` and returns the logits it asked for.

* All single-token items of a step (decode) run as ONE forward with the rows batched: a TinyJit per batch size
  B, with every row's token, slot and position passed as bound symbolic Variables, so one captured graph serves
  every step of that size. The projections see (B, n_embd), so each weight is read once per step for all rows.
* Attention is per row but in one set of kernels: every row reads its slot's cache over positions
  0..n_kv-1, where n_kv = max(pos)+1 over the batch (another Variable), and positions after the row's own are
  masked to -inf. A row's logits therefore do not depend on the other rows (the masked terms are exact zeros);
  the only batch effect is f32 round-off from a different kernel shape. Once the furthest row has passed the
  sliding window, a second graph per batch size serves the step, whose sliding-window layers read only each
  row's window (`_key_span`, prompt chunks likewise): a long context costs those layers their window, not the
  whole cache. The price: a sequence that crosses the window waits once for that graph's compile (as for a
  new batch size), and its captured activations come on top (see `memory_bytes`).
* Prompt chunks (items with several tokens) run one item at a time, jitted per (chunk length, logits kind,
  and whether the chunk starts past the sliding window):
  the chunk's rows of the embedding table are the jit's input, slot, start position and last real row bound
  Variables, so kernels are compiled once per chunk length, not per slot or position, and from a length's
  third pass on there is no scheduling either (tinygrad runs a jit's first call plainly and captures the
  second). On a 2-core CPU that took a SmolLM2 prompt's prefill from ~9 s to 0.9 s.
* Chunk lengths are bucketed (PREFILL_BUCKETS: powers of two up to 512) so that prompts of every length share
  a few kernel sets: a chunk of T tokens runs as the smallest bucket R >= T, its R - T extra rows fed token 0
  (see `_prefill_pieces`). Compiling a new length costs ~20 s of time to first token (SmolLM2 on CPU, 10-30 s
  on an H200). The pad rows are harmless: they sit at positions start+T .. start+R-1, after every real row,
  and every query reads only keys at or before its own position (the causal mask of the prefill, the decode's
  mask, the sliding window's lower bound on top of it), so no real row ever reads them; the next tokens of
  the sequence overwrite them, and the slot's length counts only the real tokens. Their logits are dropped.

KV cache: one f16 tensor per layer of shape (2, slots, ctx, n_head_kv, head_dim) -- index 0 the keys, 1 the
values, so `kv[0]` is the (slots, ctx, n_head_kv, head_dim) key cache. Keeping K and V in one buffer lets a
row's new key and value be written by one kernel (a strided view [:, slot, pos:pos+T]) instead of two.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tinygrad import Device, GlobalCounters, Tensor, TinyJit, Variable, dtypes
from tinygrad.uop.ops import UOp, smax

from .gguf import GGUFFile, TensorInfo
from . import matvec
from .quant import SUPPORTED_TYPES, dequantize

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "gpt2", "bert")
LOGITS_KINDS = ("none", "last", "all")
# The lengths prefill kernels are compiled for. Powers of two: at most 10 kernel sets ever, and padding at most
# doubles a chunk's work (egpud cuts prompts into chunks of --batch-tokens, default 128, itself a bucket). Longer
# chunks (a direct caller) run as 512-token pieces, so one pass's activations stay bounded too. 1 must be in the
# set: near the end of the context a chunk is cut into exact bucket-sized pieces (see `_prefill_pieces`).
PREFILL_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PAD_TOKEN = 0


@dataclass
class StepItem:
  slot: int          # which sequence (0..slots-1); each slot has its own KV cache region
  start_pos: int     # position of tokens[0]; positions < start_pos are already cached
  tokens: list[int]  # 1 token (decode) or a prompt chunk (prefill)
  logits: str = "last"  # "none" | "last" | "all"


@dataclass(frozen=True)
class Rope:
  style: str         # "normal": adjacent pairs (x[2i], x[2i+1]) (LLaMA); "neox": halves (x[i], x[i + n_rot/2])
  n_rot: int         # the first n_rot dimensions of each head rotate, the rest pass through
  freq_base: float
  freq_scale: float  # linear position interpolation (1 / rope.scaling.factor)


@dataclass(frozen=True)
class Config:
  """The hyper-parameters. They come from egpu's native engine (engine/src/models/decoder/config.rs, which
  follows llama.cpp's load_hparams and is checked against it), serialized as JSON: egpud sends them with each
  Load, and a standalone caller gets them from the engine's `model_config` example (`engine_config`). The worker
  never reads hyper-parameters from GGUF metadata itself, so the two backends cannot read a file differently."""
  arch: str
  n_layer: int
  n_embd: int
  n_ff: int
  n_head: int
  n_head_kv: int
  head_dim: int                  # of keys, queries and values
  n_vocab: int
  context_length: int
  norm: str                      # "rms" | "layer" (LayerNorm with bias: GPT-2)
  norm_eps: float
  ffn: str                       # "swiglu" | "geglu" | "gelu" (no gate: GPT-2)
  rope: Rope | None              # None: learned absolute positions (GPT-2)
  rope_swa: Rope | None          # the RoPE of sliding-window layers (Gemma 3: another base)
  attn_scale: float              # multiplies q.k before the softmax
  sliding_window: int | None     # keys a sliding-window layer sees, the current one included
  swa_layers: tuple[bool, ...]   # which layers use the window
  embd_scale: float | None       # multiplies token embeddings (Gemma: sqrt(n_embd))
  qk_norm: bool                  # RMS-normalise each query and key head before RoPE (Qwen3, Gemma 3)
  post_norms: bool               # normalise attention and FFN outputs before the residual add (Gemma 3)
  learned_pos: bool              # position_embd.weight added to the token embeddings (GPT-2, BERT)
  causal: bool = True            # False: every token of a text attends to every other (BERT)
  norm_after_residual: bool = False  # post-LN: normalise after each residual add, no pre-norms (BERT)
  has_lm_head: bool = True       # False: an encoder, asked only for hidden states (BERT)

  @property
  def rope_style(self) -> str | None:
    return self.rope.style if self.rope else None

  @property
  def rope_base(self) -> float | None:
    return self.rope.freq_base if self.rope else None

  @property
  def n_rot(self) -> int | None:
    return self.rope.n_rot if self.rope else None

  @staticmethod
  def from_engine(c: dict) -> "Config":
    """The worker's Config from the engine's ModelConfig (as JSON), refusing what the worker cannot run."""
    arch = c["arch"]
    if arch not in SUPPORTED_ARCHS:
      raise NotImplementedError(f"architecture {arch!r} is not implemented in the tinygrad worker "
                                f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    if c["head_dim_k"] != c["head_dim_v"]:
      raise NotImplementedError(f"key head dim {c['head_dim_k']} != value head dim {c['head_dim_v']} is not implemented")
    rope = lambda r: Rope(r["style"], int(r["n_rot"]), float(r["freq_base"]), float(r["freq_scale"])) if r else None
    return Config(
      arch=arch, n_layer=c["n_layer"], n_embd=c["n_embd"], n_ff=c["n_ff"], n_head=c["n_head"], n_head_kv=c["n_head_kv"],
      head_dim=c["head_dim_k"], n_vocab=c["n_vocab"], context_length=c["context_length"], norm=c["norm"],
      norm_eps=float(c["norm_eps"]), ffn=c["ffn"], rope=rope(c["rope"]), rope_swa=rope(c["rope_swa"]),
      attn_scale=float(c["attention_scale"]), sliding_window=c["sliding_window"], swa_layers=tuple(c["swa_layers"]),
      embd_scale=None if c["embedding_scale"] is None else float(c["embedding_scale"]), qk_norm=c["qk_norm"],
      post_norms=c["post_norms"], learned_pos=arch in ("gpt2", "bert"), causal=c.get("causal", True),
      norm_after_residual=c.get("norm_after_residual", False), has_lm_head=c.get("has_lm_head", True))


def engine_binary() -> str:
  """The engine's `model_config` example: $EGPU_ENGINE_MODEL_CONFIG, else the newest build of it in the checkout's
  target folder ($CARGO_TARGET_DIR if set)."""
  explicit = os.environ.get("EGPU_ENGINE_MODEL_CONFIG")
  if explicit: return explicit
  repo = Path(__file__).resolve().parents[2]
  target = Path(os.environ.get("CARGO_TARGET_DIR") or repo / "target")
  built = [p for p in (target / "release" / "examples" / "model_config", target / "debug" / "examples" / "model_config")
           if p.is_file()]
  if not built:
    raise RuntimeError("the engine's model_config example is not built: run `cargo build -p egpu-engine --example "
                       "model_config` (or set EGPU_ENGINE_MODEL_CONFIG); the worker takes a model's configuration from "
                       "the engine")
  return str(max(built, key=lambda p: p.stat().st_mtime))


def engine_config(path: str) -> dict:
  """The engine's configuration of a GGUF file, for callers without egpud (tests, benchmarks, generate.py). The
  engine's refusals become NotImplementedError (an unsupported model) or ValueError (a broken one)."""
  out = subprocess.run([engine_binary(), path], capture_output=True, text=True)
  if out.returncode == 2: raise NotImplementedError(out.stderr.strip())
  if out.returncode != 0: raise ValueError(out.stderr.strip() or f"model_config exited {out.returncode}")
  return json.loads(out.stdout)


class Model:
  def __init__(self, path: str, ctx: int, slots: int, config: Config, device: str | None = None):
    if ctx < 1 or slots < 1: raise ValueError(f"ctx ({ctx}) and slots ({slots}) must be at least 1")
    matvec.install()  # GPU launch layout for the dequantizing mat-vecs (no effect on CPU)
    self.file = f = GGUFFile(path)
    self.cfg = cfg = config
    self.ctx, self.slots = ctx, slots
    self.output_name = "output" if "output.weight" in f.tensors else "token_embd"  # tied LM head without output.weight
    missing = [n for n in self._needed_tensors() if n not in f.tensors]
    if missing: raise ValueError(f"{cfg.arch} model without tensor(s) {', '.join(missing[:4])}")
    for t in f.tensors.values():
      if t.ggml_type not in SUPPORTED_TYPES:
        raise NotImplementedError(f"tensor {t.name} is {t.type_name}: not implemented in the tinygrad worker yet")
    # every tensor's bytes, still quantized, as its own uint8 buffer. One buffer per tensor (rather than one for
    # the whole file) keeps byte offsets out of the generated code, so all layers share the same kernels.
    def upload(name: str) -> Tensor:
      b = np.ascontiguousarray(f.tensor_bytes(name))
      if name == "position_embd.weight" and ctx > cfg.context_length:
        # learned positions exist only up to the trained context; steps past it are refused (validate), and the
        # zero rows keep the decode graph's symbolic row slice inside the buffer for any position < ctx
        b = np.concatenate([b, np.zeros(b.size // cfg.context_length * (ctx - cfg.context_length), np.uint8)])
      return Tensor(b, dtype=dtypes.uint8, device=device).realize()
    # A layer's Q, K and V projections read the same input: where their types agree they go into one buffer and
    # one mat-vec (two kernels fewer per layer and step), Q|K|V or, when V has its own type (Q4_K_M gives half
    # the layers a Q6_K V), Q|K. Files with Q/K/V biases keep three.
    self.qkv_packs: dict[int, list[tuple[str, int, list[int]]]] = {}
    for il in range(cfg.n_layer):
      names = [f"blk.{il}.attn_{x}.weight" for x in "qkv"]
      if not all(n in f.tensors for n in names) or any(n.replace(".weight", ".bias") in f.tensors for n in names):
        continue
      types = [f.tensors[n].ggml_type for n in names]
      groups = [names] if len(set(types)) == 1 else [names[:2], names[2:]] if types[0] == types[1] else []
      if groups: self.qkv_packs[il] = [("+".join(g), types[names.index(g[0])], [f.tensors[n].shape[1] for n in g]) for g in groups]
    packed = {n: key for packs in self.qkv_packs.values() for key, _, _ in packs for n in key.split("+")}
    self.bufs = {name: upload(name) for name in f.tensors if name != "rope_freqs.weight" and name not in packed}
    for key in dict.fromkeys(packed.values()):
      parts = [np.ascontiguousarray(f.tensor_bytes(n)) for n in key.split("+")]
      self.bufs[key] = Tensor(np.concatenate(parts) if len(parts) > 1 else parts[0], dtype=dtypes.uint8, device=device).realize()
    self.device = self.bufs["token_embd.weight"].device
    self.graph_bytes = 0  # device bytes the captured TinyJits hold (see `step`)
    self._copy_jit: TinyJit | None = None  # copy_prefix's graph
    # SwiGLU/GeGLU's gate is realized on its own where the GPU mat-vec layout applies, so that gate and up are
    # two one-reduction kernels it can lay out (see egpu_worker.matvec); on the CPU they stay fused.
    self.split_gate = matvec.applies_to(self.device)
    self.tok_embd = f.tensors["token_embd.weight"]
    self.output = f.tensors[self.output_name + ".weight"]
    self.kv = [Tensor.zeros(2, slots, ctx, cfg.n_head_kv, cfg.head_dim, dtype=dtypes.float16, device=self.device)
               .contiguous().realize() for _ in range(cfg.n_layer)]
    # RoPE angles per absolute position, computed in f64 like the native engine, stored f32: for full-attention
    # layers and (Gemma 3) sliding-window layers. LLaMA 3.1's rope_freqs.weight divides each frequency.
    factors = None
    if "rope_freqs.weight" in f.tensors and cfg.rope:
      factors = f.tensor_bytes("rope_freqs.weight").view(np.float32).astype(np.float64)
      if f.tensors["rope_freqs.weight"].ggml_type != 0 or factors.size != cfg.rope.n_rot // 2:
        raise ValueError(f"rope_freqs.weight: want {cfg.rope.n_rot // 2} F32 values")
    self.rope_tables: list[tuple[Tensor, Tensor] | None] = []
    for r in (cfg.rope, cfg.rope_swa if any(cfg.swa_layers) else None):
      if r is None:
        self.rope_tables.append(None)
        continue
      inv_freq = r.freq_scale * r.freq_base ** (-np.arange(0, r.n_rot, 2, dtype=np.float64) / r.n_rot)
      if factors is not None: inv_freq = inv_freq / factors
      ang = np.arange(ctx, dtype=np.float64)[:, None] * inv_freq[None, :]
      cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
      # full width, in the order `rope` pairs elements: each pair's cosine twice, its sine negated for the
      # element that subtracts (see `rope`)
      if r.style == "normal": full = (np.repeat(cos, 2, axis=1), np.stack([-sin, sin], axis=2).reshape(ctx, r.n_rot))
      else: full = (np.concatenate([cos, cos], axis=1), np.concatenate([-sin, sin], axis=1))
      self.rope_tables.append(tuple(Tensor(t, device=self.device).realize() for t in full))
    # how many positions of each slot hold valid cache entries (a step may not leave a gap)
    self.lengths = [0] * slots
    # symbolic inputs of the decode jit: row i's token, slot and position, and the key count of the batch
    self.v_tok = [Variable(f"tok{i}", 0, cfg.n_vocab - 1) for i in range(slots)]
    self.v_slot = [Variable(f"slot{i}", 0, slots - 1) for i in range(slots)]
    self.v_pos = [Variable(f"pos{i}", 0, ctx - 1) for i in range(slots)]
    # The batch's last position; rows read n_kv = max_pos + 1 cache entries. (Not a Variable
    # "n_kv" with minimum 1: CUDA's graph is built with every Variable at 0, and a launch
    # size of 0 is "invalid argument".)
    self.v_maxpos = Variable("max_pos", 0, ctx - 1)
    self.v_pslot = Variable("pslot", 0, slots - 1)  # prefill's slot; its start is a Variable per chunk length
    self._decode_jits: dict[tuple[int, bool], TinyJit] = {}  # per (batch size, windowed)
    self._prefill_jits: dict[tuple[int, str, bool, bool], TinyJit] = {}  # per (R, logits, hidden, windowed)
    # the prefill pass lengths (see _prefill_pieces); None runs every chunk at its own length (tests compare)
    self.prefill_buckets: tuple[int, ...] | None = PREFILL_BUCKETS
    # weights, caches and RoPE tables: fixed from here on (memory_bytes adds the graphs)
    ts = [*self.bufs.values(), *self.kv, *[t for tab in self.rope_tables if tab for t in tab]]
    self._tensor_bytes = sum(t.nbytes() for t in ts)

  def _needed_tensors(self) -> list[str]:
    cfg = self.cfg
    if cfg.norm_after_residual:  # BERT's names
      names = ["token_embd.weight", "position_embd.weight", "token_types.weight", "token_embd_norm.weight"]
      for il in range(cfg.n_layer):
        p = f"blk.{il}."
        names += [p + n + ".weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm",
                                              "ffn_up", "ffn_down", "layer_output_norm")]
      return names
    names = ["token_embd.weight", "output_norm.weight"] + (["position_embd.weight"] if cfg.learned_pos else [])
    for il in range(cfg.n_layer):
      p = f"blk.{il}."
      names += [p + "attn_norm.weight", p + "attn_output.weight", p + "ffn_norm.weight", p + "ffn_up.weight",
                p + "ffn_down.weight"]
      if p + "attn_qkv.weight" not in self.file.tensors: names += [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]
      if cfg.ffn != "gelu": names.append(p + "ffn_gate.weight")
      if cfg.qk_norm: names += [p + "attn_q_norm.weight", p + "attn_k_norm.weight"]
      if cfg.post_norms: names += [p + "post_attention_norm.weight", p + "post_ffw_norm.weight"]
    return names

  # ------------------------------------------------------------------ weights (lazy views)
  def raw(self, t: TensorInfo) -> Tensor:
    return self.bufs[t.name]

  def weight(self, name: str, dtype=dtypes.float16) -> Tensor:
    """(rows, cols) in numpy order; for a linear layer that is (out_features, in_features)."""
    t = self.file.tensors[name]
    return dequantize(self.raw(t), t.ggml_type, tuple(reversed(t.shape)), dtype)

  def linear(self, x: Tensor, prefix: str) -> Tensor:
    """x @ W.T (+ bias): x f32, W dequantized to f16 inside the matmul, f32 result; the bias (if the file has
    `{prefix}.bias`) in f32."""
    y = x.matmul(self.weight(prefix + ".weight").T)
    return y + self.weight(prefix + ".bias", dtypes.float32) if prefix + ".bias" in self.file.tensors else y

  def linear_packed(self, x: Tensor, key: str, ggml_type: int, rows: list[int]) -> list[Tensor]:
    """`linear` of matrices packed row after row in one buffer (`qkv_packs`): one mat-vec, split by columns."""
    cols = self.file.tensors[key.split("+")[0]].shape[0]
    y = x.matmul(dequantize(self.bufs[key], ggml_type, (sum(rows), cols)).T)
    edges = [sum(rows[:i]) for i in range(len(rows) + 1)]
    return [y[:, a:b] for a, b in zip(edges[:-1], edges[1:])]

  def norm(self, x: Tensor, prefix: str) -> Tensor:
    w = self.weight(prefix + ".weight", dtypes.float32)
    if self.cfg.norm == "rms": return x * (x.square().mean(-1, keepdim=True) + self.cfg.norm_eps).rsqrt() * w
    xc = x - x.mean(-1, keepdim=True)
    y = xc * (xc.square().mean(-1, keepdim=True) + self.cfg.norm_eps).rsqrt() * w
    return y + self.weight(prefix + ".bias", dtypes.float32) if prefix + ".bias" in self.file.tensors else y

  # ------------------------------------------------------------------ the pass
  @staticmethod
  def rope(x: Tensor, r: Rope, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, heads, head_dim), cos/sin: (B, T, n_rot), full width with signed sines (the tables in `__init__`).
    Rotates the first n_rot dimensions of every head: adjacent pairs (ggml's normal RoPE) or the two halves (NeoX);
    the rest pass through. A pair (x0, x1) becomes (x0·c − x1·s, x1·c + x0·s): each element times its cosine plus
    its partner times its signed sine, the partner read through a flipped view. One elementwise expression, so
    tinygrad fuses it into the kernel that consumes it (stacking the two results took two kernels per tensor)."""
    B, T, H, D = x.shape
    n, half = r.n_rot, r.n_rot // 2
    c, s = cos.reshape(B, T, 1, n), sin.reshape(B, T, 1, n)
    xr = x[..., :n]
    if r.style == "normal": partner = xr.reshape(B, T, H, half, 2).flip(-1).reshape(B, T, H, n)
    else: partner = xr.reshape(B, T, H, 2, half).flip(-2).reshape(B, T, H, n)
    out = xr * c + partner * s
    return out if n == D else Tensor.cat(out, x[..., n:], dim=-1)

  def qk_norm(self, x: Tensor, name: str) -> Tensor:
    """RMSNorm of each head (last axis) with the layer's per-head-dimension weights."""
    return x * (x.square().mean(-1, keepdim=True) + self.cfg.norm_eps).rsqrt() * self.weight(name, dtypes.float32)

  def _windowed(self, last_start: int) -> bool:
    """Whether a pass whose furthest row starts at `last_start` takes the windowed graph (`_key_span`): the
    model has sliding-window layers and that row's first query already sees fewer keys than it has before it."""
    w = self.cfg.sliding_window
    return w is not None and w > 0 and any(self.cfg.swa_layers) and last_start >= w

  def _key_span(self, rows: "_Rows", swa: bool) -> tuple[object, list | None]:
    """The cache positions a layer reads: L of them (int or symbolic), row b's from firsts[b] on (firsts None:
    every row's from 0).

    Every row reads 0..n_kv-1, except on a sliding-window layer of a `windowed` pass (one whose furthest row
    starts at or past the window): there row b, whose T queries start at starts[b], reads only the
    window + T - 1 positions ending at its last query (from 0 while it is shorter): the keys its queries'
    windows can see. So a long context costs a local layer its window, not the whole cache (Gemma 3: 5 of
    every 6 layers), in decode and in a long prompt's later chunks. Keys in a span that a query may not see
    are masked as before. L is then a constant; with a symbolic L (min(n_kv, window + T - 1)) tinygrad
    copied each span to a buffer of its own first, one more kernel per local layer, which is why passes
    within the window take the other graph instead. Each span fits the cache: it ends at max(L, starts[b] + T),
    and a windowed pass has L = window + T - 1 < start + T <= ctx for its furthest row."""
    if not (swa and rows.windowed): return rows.n_kv, None
    span = self.cfg.sliding_window + rows.T - 1
    return span, [smax(0, st + rows.T - span) for st in rows.starts]

  def attention(self, il: int, x: Tensor, rows: "_Rows") -> Tensor:
    cfg = self.cfg
    B, T = rows.B, rows.T
    H, KVH, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    G = H // KVH
    p = f"blk.{il}."
    if p + "attn_qkv.weight" in self.file.tensors:  # fused (GPT-2): columns q | k | v
      qkv = self.linear(x, p + "attn_qkv")
      q, k, v = qkv[:, :H * D], qkv[:, H * D:(H + KVH) * D], qkv[:, (H + KVH) * D:]
    elif il in self.qkv_packs:
      q, k, v = [part for pack in self.qkv_packs[il] for part in self.linear_packed(x, *pack)]
    else:
      q, k, v = self.linear(x, p + "attn_q"), self.linear(x, p + "attn_k"), self.linear(x, p + "attn_v")
    q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, KVH, D), v.reshape(B, T, KVH, D)
    if cfg.qk_norm: q, k = self.qk_norm(q, p + "attn_q_norm.weight"), self.qk_norm(k, p + "attn_k_norm.weight")
    swa = cfg.swa_layers[il]
    r = cfg.rope_swa if swa else cfg.rope
    if r is not None:
      cos, sin = rows.rope[1 if swa else 0]
      q, k = self.rope(q, r, cos, sin), self.rope(k, r, cos, sin)
    # write each row's keys and values (one kernel per row: K and V share the buffer), then read the cache
    # through an AFTER of those stores, so the reads are ordered after the writes. (Tensor.assign would do the
    # same but re-points every live tensor at the new graph, which costs ~0.3 s of Python per layer.)
    new = Tensor.stack(k, v).cast(dtypes.float16).uop  # (2, B, T, KVH, D)
    buf = self.kv[il].uop
    stores = [buf[:, s:s + 1, st:st + T].store(new[:, b:b + 1]) for b, (s, st) in enumerate(zip(rows.slots, rows.starts))]
    kv = Tensor(buf.after(*stores))
    rows.written.append(kv)
    L, firsts = self._key_span(rows, swa)
    spans = [kv[:, s:s + 1, f:f + L] for s, f in zip(rows.slots, firsts or [0] * B)]
    cached = Tensor.cat(*spans, dim=1) if B > 1 else spans[0]               # (2, B, L, KVH, D)
    keys, values = cached[0].float(), cached[1].float()                        # (B, L, KVH, D)
    q = q.reshape(B, T, KVH, G, D).permute(0, 2, 3, 1, 4)                      # (B, KVH, G, T, D)
    scores = q.matmul(keys.permute(0, 2, 3, 1).unsqueeze(2)) * cfg.attn_scale # (B, KVH, G, T, L)
    # causal mask per row: query t of row b is at position starts[b]+t and sees keys 0..starts[b]+t (and, on a
    # sliding-window layer, only the last `window` of those). Keys after the row's last position (other
    # sequences' history in this slot, or zeros) get -inf and an exact 0 weight.
    kpos = Tensor.arange(L).to(self.device).reshape(1, 1, L)
    if firsts is not None:
      kpos = kpos + Tensor.stack(*[Tensor(f, device=self.device).cast(dtypes.int32) for f in firsts]).reshape(B, 1, 1)
    qpos = rows.qpos.reshape(B, T, 1)
    # an encoder's text is one pass from position 0: every query sees every real key (not the pad rows after them)
    seen = kpos <= qpos if cfg.causal else (kpos < rows.n_real) & (qpos >= 0)  # (B, T, L)
    if swa: seen = seen & (kpos > qpos - cfg.sliding_window)
    scores = seen.reshape(B, 1, 1, T, L).where(scores, float("-inf"))
    # softmax with its division moved after the weighted sum: the D outputs are divided instead of the L weights,
    # and the exponentials fuse into the weighted sum's kernel (no kernel writes the normalized weights). The
    # weighted sum is written out (products, then a sum over keys) so that the mask applies to each product:
    # an unseen key's product is an exact 0 even where its cached value is stale and non-finite (0 * inf would
    # be NaN), and the guard costs no kernel of its own (a masked copy of the values did).
    # The softmax's denominator comes out of the same reduction as a column of ones after the values: the sum of
    # the exponentials is the weighted sum of ones, so it costs no kernel of its own (it was one per layer).
    e = (scores - scores.max(-1, keepdim=True)).exp()
    values1 = values.pad((None, None, None, (0, 1)), value=1.0)                                  # (B, L, KVH, D+1)
    products = e.unsqueeze(-1) * values1.permute(0, 2, 1, 3).reshape(B, KVH, 1, 1, L, D + 1)  # (B, KVH, G, T, L, D+1)
    weighted = seen.reshape(B, 1, 1, T, L, 1).where(products, 0.0).sum(-2)                    # (B, KVH, G, T, D+1)
    out = weighted[..., :D] / weighted[..., D:]
    return self.linear(out.permute(0, 3, 1, 2, 4).reshape(B * T, H * D), p + "attn_output")

  @staticmethod
  def gelu(x: Tensor) -> Tensor:
    """The tanh approximation (ggml_gelu, the engine's ops::gelu)."""
    return 0.5 * x * (1.0 + (0.7978845608028654 * x * (1.0 + 0.044715 * x * x)).tanh())

  @staticmethod
  def gelu_erf(x: Tensor) -> Tensor:
    """The exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)) (BERT; the engine's ops::gelu_erf). erf by Abramowitz and
    Stegun 7.1.26 (|error| <= 1.5e-7), elementwise so that it fuses into the kernel around it."""
    z = x * 0.7071067811865476
    a = z.abs()
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf_abs = 1.0 - poly * (-a * a).exp()
    return 0.5 * x * (1.0 + z.sign() * erf_abs)

  def ffn(self, il: int, x: Tensor) -> Tensor:
    p = f"blk.{il}."
    up = self.linear(x, p + "ffn_up")
    if self.cfg.ffn == "gelu": return self.linear(self.gelu(up), p + "ffn_down")
    if self.cfg.ffn == "geluerf": return self.linear(self.gelu_erf(up), p + "ffn_down")
    gate = self.linear(x, p + "ffn_gate")
    if self.split_gate: gate = gate.contiguous()
    return self.linear((gate.silu() if self.cfg.ffn == "swiglu" else self.gelu(gate)) * up, p + "ffn_down")

  def forward(self, h: Tensor, rows: "_Rows") -> Tensor:
    """h: (B*T, n_embd) f32 input embeddings, row-major by item; returns the final hidden states (B*T, n_embd)
    (lazy; the KV cache writes are pending stores until `_realize`)."""
    post = self.cfg.post_norms
    for il in range(self.cfg.n_layer):
      p = f"blk.{il}."
      if self.cfg.norm_after_residual:  # post-LN (BERT)
        h = self.norm(h + self.attention(il, h, rows), p + "attn_output_norm")
        h = self.norm(h + self.ffn(il, h), p + "layer_output_norm")
      else:
        a = self.attention(il, self.norm(h, p + "attn_norm"), rows)
        h = h + (self.norm(a, p + "post_attention_norm") if post else a)
        f = self.ffn(il, self.norm(h, p + "ffn_norm"))
        h = h + (self.norm(f, p + "post_ffw_norm") if post else f)
      if rows.per_layer:
        # prefill: one schedule per layer (for the jit's first two calls; it replays after that). Every layer has the same graph up to its buffers, so
        # tinygrad's schedule cache serves layers 1.. from layer 0's: SmolLM2's first 5-token prefill took 19 s
        # this way against 32 s as one 30-layer graph. Each new pass length (bucket) is such a first call.
        Tensor.realize(h, rows.written[-1])
      else:
        # the jitted decode: one graph (the captured replay then has one kernel per layer fewer: 484 vs 513)
        h = h.contiguous()
    return h

  def head(self, h: Tensor) -> Tensor:
    return self.linear(self.norm(h, "output_norm"), self.output_name)

  def _table_rows(self, name: str, rows: Tensor | np.ndarray, n: int) -> Tensor:
    t = self.file.tensors[name]
    return dequantize(rows.reshape(-1), t.ggml_type, (n, t.shape[0]), dtypes.float32)

  def embed_one(self, tok: UOp, pos: UOp) -> Tensor:
    """One row of the embedding table selected by a (symbolic) token id: a slice, no gather."""
    t = self.tok_embd
    return self._embed_finish(self._table_rows(t.name, self.raw(t).reshape(t.shape[1], -1)[tok:tok + 1], 1), pos, 1)

  def _embed_finish(self, x: Tensor, start, T: int) -> Tensor:
    if self.cfg.embd_scale is not None: x = x * self.cfg.embd_scale
    if self.cfg.learned_pos:
      pe = self.bufs["position_embd.weight"]
      x = x + self._table_rows("position_embd.weight", pe.reshape(self.ctx if self.ctx > self.cfg.context_length else
                                                                   self.cfg.context_length, -1)[start:start + T], T)
    if "token_types.weight" in self.file.tensors:  # BERT: every token is of type 0; then the embeddings' LayerNorm
      tt = self.file.tensors["token_types.weight"]
      x = x + self._table_rows(tt.name, self.bufs[tt.name].reshape(tt.shape[1], -1)[0:1], 1)
      x = self.norm(x, "token_embd_norm")
    return x

  def _realize(self, rows: "_Rows", *outs: Tensor) -> None:
    # the cache writes go with the outputs, in one schedule (with logits "none" they are all there is to run)
    Tensor.realize(*outs, *rows.written)

  def _rows(self, slots: list, starts: list, T: int, n_kv, n_real=None) -> "_Rows":
    B = len(slots)
    rope = [None if tab is None else tuple(Tensor.stack(*[c[p:p + T] for p in starts]) for c in tab) for tab in self.rope_tables]
    start_t = Tensor.stack(*[Tensor(p, device=self.device).cast(dtypes.int32) for p in starts]).reshape(B, 1)
    qpos = start_t + Tensor.arange(T, dtype=dtypes.int32).to(self.device).reshape(1, T)  # (B, T)
    real = Tensor(T if n_real is None else n_real, device=self.device).cast(dtypes.int32).reshape(1, 1, 1)
    return _Rows(B, T, slots, starts, n_kv, rope, qpos, n_real=real)

  def _decode(self, *args: UOp, windowed: bool = False) -> Tensor:
    """The jitted batched decode: args = B tokens, B slots, B positions, the last position (all bound Variables).
    `windowed`: the furthest row stands at or past the sliding window (see `_key_span`)."""
    B = (len(args) - 1) // 3
    toks, slots, starts, n_kv = args[:B], args[B:2 * B], args[2 * B:3 * B], args[3 * B] + 1
    x = Tensor.cat(*[self.embed_one(t, p) for t, p in zip(toks, starts)]) if B > 1 else self.embed_one(toks[0], starts[0])
    rows = self._rows(list(slots), list(starts), 1, n_kv)
    rows.windowed = windowed
    logits = self.head(self.forward(x, rows))
    self._realize(rows, logits)
    return logits

  def _pos_limit(self) -> int:
    """Positions a pass may touch, pad rows included: the KV cache's (and the RoPE tables'), and for learned
    positions the trained ones."""
    return min(self.ctx, self.cfg.context_length) if self.cfg.learned_pos else self.ctx

  def _prefill_pieces(self, start: int, T: int) -> list[tuple[int, int, int]]:
    """How a chunk of T tokens at position `start` runs: passes (offset in the chunk, real tokens, pass length).
    Pieces of at most the largest bucket; each is padded up to the smallest bucket that holds it. Where that
    would pass the end of the usable positions (start + T <= limit holds, start + bucket may not), the piece
    instead runs unpadded as the largest bucket it can fill, and the rest follows as further pieces (so a
    5-token chunk 6 positions before the end runs as 4 + 1): the compiled set stays the buckets, no new
    length is compiled even at the end of the context."""
    bk = self.prefill_buckets
    if not bk: return [(0, T, T)]
    if not self.cfg.causal:  # an encoder's text is one pass (validate keeps it within the positions)
      R = next((b for b in bk if b >= T), T)
      return [(0, T, R if start + R <= self._pos_limit() else T)]
    limit, pieces, off = self._pos_limit(), [], 0
    while off < T:
      n = min(T - off, bk[-1])
      R = next((b for b in bk if b >= n), n)
      if start + off + R > limit: R = n = max((b for b in bk if b <= n), default=n)
      pieces.append((off, n, R))
      off += n
    return pieces

  def _prefill(self, it: StepItem, hidden: bool = False) -> np.ndarray | None:
    pieces = self._prefill_pieces(int(it.start_pos), len(it.tokens))
    outs = []
    for k, (off, n, R) in enumerate(pieces):
      kind = it.logits if k == len(pieces) - 1 or it.logits == "all" else "none"
      outs.append(self._prefill_pass(int(it.slot), int(it.start_pos) + off, it.tokens[off:off + n], R, kind, hidden))
    if it.logits == "none": return None
    return np.concatenate(outs) if it.logits == "all" and len(outs) > 1 else outs[-1]

  def _prefill_pass(self, slot: int, start_pos: int, tokens: list[int], R: int, logits: str,
                    hidden: bool = False) -> np.ndarray | None:
    """One pass of R >= len(tokens) rows: the tokens, then pad tokens written to the cache after them (never read,
    see the module docstring). Jitted per (R, logits kind, windowed): the token rows of the embedding table are the input
    tensor, slot, start and the last real row are bound Variables, so a replay serves every prompt of the bucket
    at every slot and position. (tinygrad runs a jit's first call plainly and captures the second; from the
    third call on, a pass costs no scheduling: that was ~8 s per SmolLM2 prompt on a 2-core CPU.)"""
    T, t = len(tokens), self.tok_embd
    ids = np.asarray(list(tokens) + [PAD_TOKEN] * (R - T), dtype=np.int64)
    raw = np.asarray(self.file.tensor_bytes(t.name)).reshape(t.shape[1], -1)[ids]  # still quantized, picked on the host
    args = [Tensor(np.ascontiguousarray(raw), dtype=dtypes.uint8, device=self.device).realize(),
            self.v_pslot.bind(slot), Variable(f"start_T{R}", 0, self.ctx - R).bind(start_pos)]
    # the last real row, picked by a bound Variable: one head kernel per R, whatever T is
    if logits == "last" and R > 1: args.append(Variable(f"last_T{R}", 0, R - 1).bind(T - 1))
    # an encoder's real rows, which every query attends to (the pad rows after them are masked)
    if not self.cfg.causal: args.append(Variable(f"real_T{R}", 1, R).bind(T))
    # hidden states and logits differ only in the head, and only where rows are returned
    # a pass starting past the sliding window reads only the window on those layers (`_key_span`): its own graph
    key = (R, logits, hidden and logits != "none", self._windowed(start_pos))
    jit = self._prefill_jits.get(key)
    if jit is None:
      jit = self._prefill_jits[key] = TinyJit(functools.partial(self._prefill_graph, R=R, logits=logits, hidden=key[2],
                                                                windowed=key[3]))
    out = jit(*args)
    if out is None: return None
    out = out.numpy()  # a copy: the jit reuses its output buffer
    return out[0] if logits == "last" else out[:T]

  def _prefill_graph(self, raw: Tensor, slot: UOp, start: UOp, *rest: UOp, R: int, logits: str,
                     hidden: bool = False, windowed: bool = False) -> Tensor | None:
    # rest: the last real row (logits "last", R > 1), then the real row count (encoders)
    real = rest[-1] if not self.cfg.causal else None
    last = rest[:1] if logits == "last" and R > 1 else ()
    rows = self._rows([slot], [start], R, start + R, n_real=real)
    rows.per_layer = True
    rows.windowed = windowed
    h = self.forward(self._embed_finish(self._table_rows(self.tok_embd.name, raw, R), start, R), rows)
    if logits == "none":
      self._realize(rows)
      return None
    if last: h = h[last[0]:last[0] + 1]
    # an encoder's last layer ends in its own LayerNorm: its hidden states are the output
    out = (h if self.cfg.norm_after_residual else self.norm(h, "output_norm")) if hidden else self.head(h)
    self._realize(rows, out)
    return out

  # ------------------------------------------------------------------ public API
  def validate(self, items: list[StepItem]) -> None:
    """Raises ValueError (nothing is computed, no cache changes) if any item is invalid."""
    if not items: raise ValueError("step: no items")
    seen = set()
    for i, it in enumerate(items):
      if not _is_int(it.slot) or not 0 <= it.slot < self.slots:
        raise ValueError(f"item {i}: slot {it.slot} out of range (this model has {self.slots} slots)")
      if it.slot in seen: raise ValueError(f"item {i}: slot {it.slot} appears twice in one step")
      seen.add(it.slot)
      if it.logits not in LOGITS_KINDS: raise ValueError(f"item {i}: logits={it.logits!r}, want one of {LOGITS_KINDS}")
      if len(it.tokens) == 0: raise ValueError(f"item {i}: no tokens")
      if not _is_int(it.start_pos) or it.start_pos < 0: raise ValueError(f"item {i}: start_pos {it.start_pos!r} is not a non-negative int")
      if it.start_pos + len(it.tokens) > self.ctx:
        raise ValueError(f"item {i}: context overflow: start_pos {it.start_pos} + {len(it.tokens)} tokens > ctx {self.ctx}")
      if self.cfg.learned_pos and it.start_pos + len(it.tokens) > self.cfg.context_length:
        raise ValueError(f"item {i}: context overflow: start_pos {it.start_pos} + {len(it.tokens)} tokens > "
                         f"{self.cfg.context_length} learned positions")
      if it.start_pos > self.lengths[it.slot]:
        raise ValueError(f"item {i}: start_pos {it.start_pos} leaves a gap: slot {it.slot} holds {self.lengths[it.slot]} positions")
      if not self.cfg.causal and it.start_pos != 0:
        raise ValueError(f"item {i}: an encoder takes a whole text from position 0, not from {it.start_pos}")
      bad = [t for t in it.tokens if not _is_int(t) or not 0 <= t < self.cfg.n_vocab]
      if bad: raise ValueError(f"item {i}: token id {bad[0]} out of range (n_vocab {self.cfg.n_vocab})")

  def step(self, items: list[StepItem], hidden: bool = False) -> list[np.ndarray | None]:
    """Feeds every item's tokens to its slot and returns, per item, None ("none"), the f32 logits of its last
    token (n_vocab,) ("last") or of every token (len(tokens), n_vocab) ("all"). With `hidden`, each row is the
    token's final hidden state instead (after the output norm, before the LM head: n_embd values), what
    embeddings are pooled from; every item then takes the prefill path (embeddings are not decode steps)."""
    self.validate(items)
    if not self.cfg.has_lm_head and not hidden:
      raise ValueError(f"{self.cfg.arch} has no LM head: ask it for hidden states (embeddings)")
    with self._counting_graphs():
      return self._step(items, hidden)

  @contextlib.contextmanager
  def _counting_graphs(self):
    """Adds to `graph_bytes` what the block leaves allocated on the device: what the TinyJits it captured hold
    (their activations). A plain pass frees its buffers again, a replay allocates nothing, and the weights and
    caches were allocated at load. Steps and copies run one at a time on the device thread, so the growth is
    this model's. Counted even when the block fails: a capture that raised may hold its buffers until close."""
    held = GlobalCounters.mem_used_per_device[self.device]
    try:
      yield
    finally:
      self.graph_bytes += max(0, GlobalCounters.mem_used_per_device[self.device] - held)

  def _step(self, items: list[StepItem], hidden: bool) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = [None] * len(items)
    dec = [] if hidden else [i for i, it in enumerate(items) if len(it.tokens) == 1]
    if dec:
      B = len(dec)
      rows = [items[i] for i in dec]
      key = (B, self._windowed(max(int(it.start_pos) for it in rows)))
      jit = self._decode_jits.get(key)
      if jit is None: jit = self._decode_jits[key] = TinyJit(functools.partial(self._decode, windowed=key[1]))
      args = [self.v_tok[j].bind(int(it.tokens[0])) for j, it in enumerate(rows)]
      args += [self.v_slot[j].bind(int(it.slot)) for j, it in enumerate(rows)]
      args += [self.v_pos[j].bind(int(it.start_pos)) for j, it in enumerate(rows)]
      args.append(self.v_maxpos.bind(max(int(it.start_pos) for it in rows)))
      logits = jit(*args).numpy()  # a copy: the jit reuses its output buffer
      for j, i in enumerate(dec):
        kind = items[i].logits
        out[i] = None if kind == "none" else logits[j] if kind == "last" else logits[j:j + 1]
    for i, it in enumerate(items):
      if i not in dec: out[i] = self._prefill(it, hidden)
    for it in items: self.lengths[it.slot] = int(it.start_pos) + len(it.tokens)
    return out

  def copy_prefix(self, src: int, dst: int, n: int) -> None:
    """Makes slot `dst` hold the first `n` positions of slot `src`'s cache: what prefilling the same tokens there
    would have written (egpud copies a prompt prefix another slot holds, e.g. a shared system prompt, instead of
    prefilling it). Copies the whole slot, every layer, in one captured graph for every pair of slots (their
    indices bound Variables); its buffers count in `graph_bytes`. Raises ValueError, changing nothing, on bad
    slots or more positions than `src` holds."""
    if not all(_is_int(v) for v in (src, dst, n)) or not (0 <= src < self.slots and 0 <= dst < self.slots):
      raise ValueError(f"copy_prefix: slots {src!r} and {dst!r} must be in 0..{self.slots - 1}")
    if src == dst or not 0 <= n <= self.lengths[src]:
      raise ValueError(f"copy_prefix: {n} positions from slot {src} (holding {self.lengths[src]}) to slot {dst}")
    if self._copy_jit is None: self._copy_jit = TinyJit(self._copy_slot)
    with self._counting_graphs():
      self._copy_jit(self.v_slot[0].bind(src), self.v_slot[1].bind(dst))
    self.lengths[dst] = n

  def _copy_slot(self, src: UOp, dst: UOp) -> None:
    # the source slot is copied out first (contiguous), so no kernel reads the buffer it writes
    outs = []
    for kv in self.kv:
      buf = kv.uop
      outs.append(Tensor(buf.after(buf[:, dst:dst + 1].store(Tensor(buf)[:, src:src + 1].contiguous().uop))))
    Tensor.realize(*outs)

  def memory_bytes(self) -> int:
    """Device bytes this model holds: weights (quantized), KV cache, RoPE tables, and the activations of the
    graphs captured so far (`graph_bytes`), which grow as steps meet new batch sizes and prompt buckets: a few
    (B, n_ff) and (B, n_vocab) f32 buffers per decode batch size, per prefill bucket up to 40 MiB at 512 rows
    for SmolLM2; twice over for a model with a sliding window once its contexts pass the window (a windowed
    graph beside each plain one). Freed buffers that tinygrad's allocator keeps cached for reuse are not
    counted: they belong to no model (the worker reports them as the device's `cached` figure)."""
    return self._tensor_bytes + self.graph_bytes

  def close(self) -> None:
    """Drop every device buffer of this model (weights, KV cache, RoPE tables, the captured jits) and return
    tinygrad's cached allocations to the driver. The object is unusable afterwards."""
    device = self.device
    for j in [*self._decode_jits.values(), *self._prefill_jits.values(), *([self._copy_jit] if self._copy_jit else [])]:
      j.reset()
    self._copy_jit = None
    self._decode_jits.clear()
    self._prefill_jits.clear()
    del self.bufs, self.kv, self.rope_tables
    self.graph_bytes = 0
    gc.collect()
    Device[device].synchronize()
    Device[device].allocator.free_cache()


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass
class _Rows:
  """Where the B x T tokens of one forward go: row b's tokens are at positions starts[b].. of slot slots[b]."""
  B: int
  T: int
  slots: list          # int or bound Variable per row
  starts: list         # int or bound Variable per row
  n_kv: object         # cache positions every row reads (int or symbolic), >= each row's last position + 1
  rope: list           # per RoPE table (full attention, sliding window): None or (cos, signed sin), each (B, T, n_rot)
  qpos: Tensor         # (B, T) int32 absolute positions
  n_real: Tensor | None = None  # (1, 1, 1) an encoder pass's real tokens: the keys past them are pad rows
  per_layer: bool = False  # realize layer by layer (prefill) instead of one graph (jitted decode)
  windowed: bool = False   # sliding-window layers read only each row's window (Model._key_span)
  written: list = field(default_factory=list)  # per layer, the cache after this pass's writes (to realize)


Llama = Model


def load_model(path: str, ctx: int, slots: int, config: Config | None = None, device: str | None = None) -> Model:
  """The model in `path`, run with `config` (egpud sends the engine's), else with the engine's configuration of
  the file (`engine_config`). Refuses what the engine or the worker cannot run."""
  if config is None: config = Config.from_engine(engine_config(path))
  return Model(path, ctx, slots, config, device)

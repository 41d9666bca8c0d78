"""A llama-family decoder (LLaMA 2/3, SmolLM2, Mistral, TinyLlama) over quantized GGUF weights.

Semantics follow egpu's native engine (engine/src/model/): RMSNorm (x * rsqrt(mean(x^2) + eps) * w),
"normal" RoPE for LLaMA (adjacent pairs (x[2i], x[2i+1]), theta_i = pos * base^(-2i/n_rot)),
grouped-query attention where query head h reads KV head h // (n_head / n_head_kv), SwiGLU FFN
(down(silu(gate(x)) * up(x))), and the LM head tied to the token embeddings when the file has no
`output.weight`.

Weights: each GGUF tensor's bytes are one uint8 buffer on the device; each matrix is a lazy
dequantizing view of its bytes (egpu_worker.quant) that tinygrad fuses into the matmul.
Activations, norms, RoPE and softmax are f32; the KV cache is f16 on the device.
One sequence at a time: `prefill` (a prompt chunk, not jitted) then `decode` (one token, TinyJit
with the token id and the position as symbolic variables, so one captured graph serves every step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, TinyJit, Variable, dtypes
from tinygrad.uop.ops import UOp

from .gguf import GGUFFile, TensorInfo
from .quant import SUPPORTED_TYPES, dequantize, dequantize_rows

SUPPORTED_ARCHS = ("llama",)


@dataclass(frozen=True)
class Config:
  n_layer: int
  n_embd: int
  n_ff: int
  n_head: int
  n_head_kv: int
  head_dim: int
  n_vocab: int
  norm_eps: float
  rope_base: float
  n_rot: int
  context_length: int

  @staticmethod
  def from_gguf(f: GGUFFile) -> "Config":
    if f.arch not in SUPPORTED_ARCHS:
      raise NotImplementedError(f"architecture {f.arch!r} is not implemented in the tinygrad worker (only {SUPPORTED_ARCHS})")
    def need(k: str):
      v = f.arch_key(k)
      if v is None: raise KeyError(f"GGUF metadata {f.arch}.{k} is missing")
      return v
    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = n_embd // n_head
    n_rot = int(f.arch_key("rope.dimension_count", head_dim))
    if n_rot != head_dim: raise NotImplementedError(f"LLaMA rotates the whole head ({head_dim}), not {n_rot}")
    scaling = f.arch_key("rope.scaling.type", "none")
    if scaling not in ("none", None): raise NotImplementedError(f"rope.scaling.type={scaling!r}")
    if "rope_freqs.weight" in f.tensors: raise NotImplementedError("LLaMA 3.1 rope_freqs are not implemented yet")
    return Config(
      n_layer=int(need("block_count")), n_embd=n_embd, n_ff=int(need("feed_forward_length")),
      n_head=n_head, n_head_kv=int(f.arch_key("attention.head_count_kv", n_head)), head_dim=head_dim,
      n_vocab=f.tensors["token_embd.weight"].shape[1], norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      rope_base=float(f.arch_key("rope.freq_base", 10000.0)), n_rot=n_rot,
      context_length=int(f.arch_key("context_length", 2048)))


class Llama:
  def __init__(self, path: str, max_ctx: int = 512, device: str | None = None):
    self.file = f = GGUFFile(path)
    self.cfg = cfg = Config.from_gguf(f)
    self.max_ctx = max_ctx = min(max_ctx, cfg.context_length)
    for t in f.tensors.values():
      if t.ggml_type not in SUPPORTED_TYPES:
        raise NotImplementedError(f"tensor {t.name} is {t.type_name}: not implemented in the tinygrad worker yet")
    # upload every tensor's bytes, still quantized, as its own uint8 buffer. One buffer per tensor (rather than
    # one for the whole file) keeps byte offsets out of the generated code, so all layers share the same kernels.
    self.bufs = {name: Tensor(np.ascontiguousarray(f.tensor_bytes(name)), dtype=dtypes.uint8, device=device).realize()
                 for name in f.tensors}
    self.device = self.bufs["token_embd.weight"].device
    self.tok_embd = f.tensors["token_embd.weight"]
    self.output = f.tensors.get("output.weight", self.tok_embd)  # tied LM head
    # KV cache, f16 on the device: (max_ctx, n_head_kv, head_dim) per layer
    kv_shape = (max_ctx, cfg.n_head_kv, cfg.head_dim)
    self.k_cache = [Tensor.zeros(*kv_shape, dtype=dtypes.float16, device=self.device).contiguous().realize() for _ in range(cfg.n_layer)]
    self.v_cache = [Tensor.zeros(*kv_shape, dtype=dtypes.float16, device=self.device).contiguous().realize() for _ in range(cfg.n_layer)]
    # RoPE angles per absolute position, computed in f64 like the native engine, stored f32
    inv_freq = cfg.rope_base ** (-np.arange(0, cfg.n_rot, 2, dtype=np.float64) / cfg.n_rot)
    ang = np.arange(max_ctx, dtype=np.float64)[:, None] * inv_freq[None, :]
    self.rope_cos = Tensor(np.cos(ang).astype(np.float32), device=self.device).realize()
    self.rope_sin = Tensor(np.sin(ang).astype(np.float32), device=self.device).realize()
    self.v_pos = Variable("start_pos", 0, max_ctx - 1)
    self.v_tok = Variable("token", 0, cfg.n_vocab - 1)
    self._decode_jit = TinyJit(self._decode_step)

  # ------------------------------------------------------------------ weights (lazy views)
  def raw(self, t: TensorInfo) -> Tensor:
    return self.bufs[t.name]

  def weight(self, name: str, dtype=dtypes.float16) -> Tensor:
    """(rows, cols) in numpy order; for a linear layer that is (out_features, in_features)."""
    t = self.file.tensors[name]
    return dequantize(self.raw(t), t.ggml_type, tuple(reversed(t.shape)), dtype)

  def linear(self, x: Tensor, name: str) -> Tensor:
    return x.matmul(self.weight(name).T)  # x f32 @ f16 weights: f32 result, dequant fused in

  def rms_norm(self, x: Tensor, name: str) -> Tensor:
    return x * (x.square().mean(-1, keepdim=True) + self.cfg.norm_eps).rsqrt() * self.weight(name, dtypes.float32)

  # ------------------------------------------------------------------ the pass
  def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (T, heads, head_dim); rotates adjacent pairs (ggml's normal RoPE)."""
    T, H, D = x.shape
    x = x.reshape(T, H, D // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    c, s = cos.reshape(T, 1, D // 2), sin.reshape(T, 1, D // 2)
    return Tensor.stack(x0 * c - x1 * s, x0 * s + x1 * c, dim=-1).reshape(T, H, D)

  def attention(self, il: int, x: Tensor, start_pos: int | UOp, T: int, cos: Tensor, sin: Tensor) -> Tensor:
    cfg = self.cfg
    H, KVH, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    G = H // KVH
    q = self.rope(self.linear(x, f"blk.{il}.attn_q.weight").reshape(T, H, D), cos, sin)
    k = self.rope(self.linear(x, f"blk.{il}.attn_k.weight").reshape(T, KVH, D), cos, sin)
    v = self.linear(x, f"blk.{il}.attn_v.weight").reshape(T, KVH, D)
    # write this chunk's keys and values first (one schedule for both), then attend over the cache
    Tensor.realize(self.k_cache[il][start_pos:start_pos + T].assign(k.cast(dtypes.float16)),
                   self.v_cache[il][start_pos:start_pos + T].assign(v.cast(dtypes.float16)))
    L = start_pos + T
    keys = self.k_cache[il][0:L].cast(dtypes.float32).permute(1, 0, 2).unsqueeze(1)    # (KVH, 1, L, D)
    values = self.v_cache[il][0:L].cast(dtypes.float32).permute(1, 0, 2).unsqueeze(1)  # (KVH, 1, L, D)
    q = q.reshape(T, KVH, G, D).permute(1, 2, 0, 3)                                    # (KVH, G, T, D)
    scores = q.matmul(keys.transpose(-1, -2)) * (1.0 / math.sqrt(D))                  # (KVH, G, T, L)
    if T > 1:  # causal mask; start_pos is a plain int for prefill
      scores = scores + Tensor.full((T, L), float("-inf"), device=self.device).triu(start_pos + 1)
    out = scores.softmax(-1).matmul(values)                                            # (KVH, G, T, D)
    return self.linear(out.permute(2, 0, 1, 3).reshape(T, H * D), f"blk.{il}.attn_output.weight")

  def ffn(self, il: int, x: Tensor) -> Tensor:
    gate, up = self.linear(x, f"blk.{il}.ffn_gate.weight"), self.linear(x, f"blk.{il}.ffn_up.weight")
    return self.linear(gate.silu() * up, f"blk.{il}.ffn_down.weight")

  def forward(self, h: Tensor, start_pos: int | UOp, all_logits: bool = False) -> Tensor:
    """h: (T, n_embd) f32 token embeddings at positions start_pos.. ; returns f32 logits (T or 1, n_vocab)."""
    T = h.shape[0]
    cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
    for il in range(self.cfg.n_layer):
      h = h + self.attention(il, self.rms_norm(h, f"blk.{il}.attn_norm.weight"), start_pos, T, cos, sin)
      h = h + self.ffn(il, self.rms_norm(h, f"blk.{il}.ffn_norm.weight"))
      h = h.realize()  # else every layer's cache write would schedule (and recompute) all layers before it
    if not all_logits: h = h[-1:]
    return self.linear(self.rms_norm(h, "output_norm.weight"), self.output.name)

  def embed(self, ids: list[int]) -> Tensor:
    t = self.tok_embd
    return dequantize_rows(self.raw(t), t.ggml_type, t.shape[1], t.shape[0], Tensor(ids, dtype=dtypes.int32, device=self.device))

  def embed_one(self, tok: UOp) -> Tensor:
    """One row of the embedding table selected by a (symbolic) token id: a slice, no gather."""
    t = self.tok_embd
    rows = self.raw(t).reshape(t.shape[1], -1)
    return dequantize(rows[tok:tok + 1].reshape(-1), t.ggml_type, (1, t.shape[0]), dtypes.float32)

  # ------------------------------------------------------------------ public API
  def close(self) -> None:
    """Drop every device buffer of this model (weights, KV cache, RoPE tables, the captured jit) and return
    tinygrad's cached allocations to the driver. The object is unusable afterwards."""
    import gc
    from tinygrad import Device
    device = self.device
    self._decode_jit.reset()
    del self._decode_jit, self.bufs, self.k_cache, self.v_cache, self.rope_cos, self.rope_sin
    gc.collect()
    Device[device].synchronize()
    Device[device].allocator.free_cache()

  def check_room(self, start_pos: int, n: int):
    if start_pos + n > self.max_ctx: raise ValueError(f"context overflow: {start_pos + n} > {self.max_ctx}")

  def prefill(self, ids: list[int], start_pos: int = 0, all_logits: bool = False) -> Tensor:
    """Writes `ids` into the KV cache at start_pos.. and returns logits (realized)."""
    if not ids: raise ValueError("no tokens")
    if any(not 0 <= i < self.cfg.n_vocab for i in ids): raise ValueError("token id out of range")
    self.check_room(start_pos, len(ids))
    return self.forward(self.embed(ids), start_pos, all_logits).realize()

  def _decode_step(self, tok: UOp, pos: UOp) -> Tensor:
    return self.forward(self.embed_one(tok), pos).argmax(-1).cast(dtypes.int32).realize()

  def decode(self, token: int, pos: int) -> int:
    """Feeds one token at position pos; returns the greedy next token."""
    if not 0 <= token < self.cfg.n_vocab: raise ValueError("token id out of range")
    self.check_room(pos, 1)
    return int(self._decode_jit(self.v_tok.bind(token), self.v_pos.bind(pos)).item())

  def generate(self, ids: list[int], n: int, start_pos: int = 0):
    """Greedy continuation of `ids`: yields n new token ids."""
    tok = int(self.prefill(ids, start_pos).argmax(-1).item())
    pos = start_pos + len(ids)
    for i in range(n):
      yield tok
      if i + 1 == n: break
      tok = self.decode(tok, pos)
      pos += 1

"""Decoder-only transformers over quantized GGUF weights, several sequences ("slots") per step.

Semantics follow egpu's native engine (engine/src/model/): RMSNorm (x * rsqrt(mean(x^2) + eps) * w),
"normal" RoPE for LLaMA (adjacent pairs (x[2i], x[2i+1]), theta_i = pos * base^(-2i/n_rot)), grouped-query
attention where query head h reads KV head h // (n_head / n_head_kv), SwiGLU FFN (down(silu(gate(x)) * up(x))),
and the LM head tied to the token embeddings when the file has no `output.weight`.

Weights: each GGUF tensor's bytes are one uint8 buffer on the device; each matrix is a lazy dequantizing view
of its bytes (egpu_worker.quant) that tinygrad fuses into the matmul. Activations, norms, RoPE and softmax are
f32; weights are rounded once to f16 inside the matmul; the KV cache is f16 on the device.

The API is the one egpud's scheduler drives (through serve.py): `Model(path, ctx, slots)` owns a KV cache of
`ctx` positions for each of `slots` sequences, and `step(items)` feeds each item's tokens to its slot at its
`start_pos` and returns the logits it asked for.

* All single-token items of a step (decode) run as ONE forward with the rows batched: a TinyJit per batch size
  B, with every row's token, slot and position passed as bound symbolic Variables, so one captured graph serves
  every step of that size. The projections see (B, n_embd), so each weight is read once per step for all rows.
* Attention is per row but in one set of kernels: every row reads its slot's cache over positions
  0..n_kv-1, where n_kv = max(pos)+1 over the batch (another Variable), and positions after the row's own are
  masked to -inf. A row's logits therefore do not depend on the other rows (the masked terms are exact zeros);
  the only batch effect is f32 round-off from a different kernel shape.
* Prompt chunks (items with several tokens) run one item at a time, not jitted, with the slot and start
  position as bound Variables too (kernels are compiled once per chunk length, not per slot or position).

KV cache: one f16 tensor per layer of shape (2, slots, ctx, n_head_kv, head_dim) -- index 0 the keys, 1 the
values, so `kv[0]` is the (slots, ctx, n_head_kv, head_dim) key cache. Keeping K and V in one buffer lets a
row's new key and value be written by one kernel (a strided view [:, slot, pos:pos+T]) instead of two.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field

import numpy as np
from tinygrad import Device, Tensor, TinyJit, Variable, dtypes
from tinygrad.uop.ops import UOp

from .gguf import GGUFFile, TensorInfo
from .quant import SUPPORTED_TYPES, dequantize, dequantize_rows

SUPPORTED_ARCHS = ("llama",)
LOGITS_KINDS = ("none", "last", "all")


@dataclass
class StepItem:
  slot: int          # which sequence (0..slots-1); each slot has its own KV cache region
  start_pos: int     # position of tokens[0]; positions < start_pos are already cached
  tokens: list[int]  # 1 token (decode) or a prompt chunk (prefill)
  logits: str = "last"  # "none" | "last" | "all"


@dataclass(frozen=True)
class Config:
  arch: str
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
      raise NotImplementedError(f"architecture {f.arch!r} is not implemented in the tinygrad worker "
                                f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    def need(k: str):
      v = f.arch_key(k)
      if v is None: raise KeyError(f"GGUF metadata {f.arch}.{k} is missing")
      return v
    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    n_head_kv = int(f.arch_key("attention.head_count_kv", n_head))
    if n_head % n_head_kv: raise ValueError(f"{n_head} query heads are not a multiple of {n_head_kv} KV heads")
    head_dim = n_embd // n_head
    n_rot = int(f.arch_key("rope.dimension_count", head_dim))
    if n_rot != head_dim: raise NotImplementedError(f"LLaMA rotates the whole head ({head_dim}), not {n_rot}")
    scaling = f.arch_key("rope.scaling.type", "none")
    if scaling not in ("none", None): raise NotImplementedError(f"rope.scaling.type={scaling!r}")
    if "rope_freqs.weight" in f.tensors: raise NotImplementedError("LLaMA 3.1 rope_freqs are not implemented yet")
    return Config(
      arch=f.arch, n_layer=int(need("block_count")), n_embd=n_embd, n_ff=int(need("feed_forward_length")),
      n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
      n_vocab=f.tensors["token_embd.weight"].shape[1], norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      rope_base=float(f.arch_key("rope.freq_base", 10000.0)), n_rot=n_rot,
      context_length=int(f.arch_key("context_length", 2048)))


class Model:
  def __init__(self, path: str, ctx: int, slots: int, device: str | None = None):
    if ctx < 1 or slots < 1: raise ValueError(f"ctx ({ctx}) and slots ({slots}) must be at least 1")
    self.file = f = GGUFFile(path)
    self.cfg = cfg = Config.from_gguf(f)
    self.ctx, self.slots = ctx, slots
    for t in f.tensors.values():
      if t.ggml_type not in SUPPORTED_TYPES:
        raise NotImplementedError(f"tensor {t.name} is {t.type_name}: not implemented in the tinygrad worker yet")
    # every tensor's bytes, still quantized, as its own uint8 buffer. One buffer per tensor (rather than one for
    # the whole file) keeps byte offsets out of the generated code, so all layers share the same kernels.
    self.bufs = {name: Tensor(np.ascontiguousarray(f.tensor_bytes(name)), dtype=dtypes.uint8, device=device).realize()
                 for name in f.tensors}
    self.device = self.bufs["token_embd.weight"].device
    self.tok_embd = f.tensors["token_embd.weight"]
    self.output = f.tensors.get("output.weight", self.tok_embd)  # tied LM head
    self.kv = [Tensor.zeros(2, slots, ctx, cfg.n_head_kv, cfg.head_dim, dtype=dtypes.float16, device=self.device)
               .contiguous().realize() for _ in range(cfg.n_layer)]
    # RoPE angles per absolute position, computed in f64 like the native engine, stored f32
    inv_freq = cfg.rope_base ** (-np.arange(0, cfg.n_rot, 2, dtype=np.float64) / cfg.n_rot)
    ang = np.arange(ctx, dtype=np.float64)[:, None] * inv_freq[None, :]
    self.rope_cos = Tensor(np.cos(ang).astype(np.float32), device=self.device).realize()
    self.rope_sin = Tensor(np.sin(ang).astype(np.float32), device=self.device).realize()
    # how many positions of each slot hold valid cache entries (a step may not leave a gap)
    self.lengths = [0] * slots
    # symbolic inputs of the decode jit: row i's token, slot and position, and the key count of the batch
    self.v_tok = [Variable(f"tok{i}", 0, cfg.n_vocab - 1) for i in range(slots)]
    self.v_slot = [Variable(f"slot{i}", 0, slots - 1) for i in range(slots)]
    self.v_pos = [Variable(f"pos{i}", 0, ctx - 1) for i in range(slots)]
    self.v_nkv = Variable("n_kv", 1, ctx)
    self.v_pslot = Variable("pslot", 0, slots - 1)  # prefill's slot; its start is a Variable per chunk length
    self._decode_jits: dict[int, TinyJit] = {}

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
    """x: (B, T, heads, head_dim), cos/sin: (B, T, head_dim/2); rotates adjacent pairs (ggml's normal RoPE)."""
    B, T, H, D = x.shape
    x = x.reshape(B, T, H, D // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    c, s = cos.reshape(B, T, 1, D // 2), sin.reshape(B, T, 1, D // 2)
    return Tensor.stack(x0 * c - x1 * s, x0 * s + x1 * c, dim=-1).reshape(B, T, H, D)

  def attention(self, il: int, x: Tensor, rows: "_Rows") -> Tensor:
    cfg = self.cfg
    B, T = rows.B, rows.T
    H, KVH, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    G = H // KVH
    q = self.rope(self.linear(x, f"blk.{il}.attn_q.weight").reshape(B, T, H, D), rows.cos, rows.sin)
    k = self.rope(self.linear(x, f"blk.{il}.attn_k.weight").reshape(B, T, KVH, D), rows.cos, rows.sin)
    v = self.linear(x, f"blk.{il}.attn_v.weight").reshape(B, T, KVH, D)
    # write each row's keys and values (one kernel per row: K and V share the buffer), then read the cache
    # through an AFTER of those stores, so the reads are ordered after the writes. (Tensor.assign would do the
    # same but re-points every live tensor at the new graph, which costs ~0.3 s of Python per layer.)
    new = Tensor.stack(k, v).cast(dtypes.float16).uop  # (2, B, T, KVH, D)
    buf = self.kv[il].uop
    stores = [buf[:, s:s + 1, p:p + T].store(new[:, b:b + 1]) for b, (s, p) in enumerate(zip(rows.slots, rows.starts))]
    kv = Tensor(buf.after(*stores))
    rows.written.append(kv)
    L = rows.n_kv
    cached = Tensor.cat(*[kv[:, s:s + 1, 0:L] for s in rows.slots], dim=1) if B > 1 else kv[:, rows.slots[0]:rows.slots[0] + 1, 0:L]
    keys, values = cached[0].float(), cached[1].float()                        # (B, L, KVH, D)
    q = q.reshape(B, T, KVH, G, D).permute(0, 2, 3, 1, 4)                      # (B, KVH, G, T, D)
    scores = q.matmul(keys.permute(0, 2, 3, 1).unsqueeze(2)) * (1.0 / math.sqrt(D))  # (B, KVH, G, T, L)
    # causal mask per row: query t of row b is at position starts[b]+t and sees keys 0..starts[b]+t. Keys after
    # the row's last position (other sequences' history in this slot, or zeros) get -inf and an exact 0 weight.
    kpos = Tensor.arange(L).to(self.device).reshape(1, 1, L)
    seen = kpos <= rows.qpos.reshape(B, T, 1)                                  # (B, T, L)
    scores = seen.reshape(B, 1, 1, T, L).where(scores, float("-inf"))
    # values past the row's last position are zeroed too, so stale non-finite values could not leak in as 0*inf
    values = (kpos.reshape(1, L, 1, 1) <= rows.qpos[:, -1:].reshape(B, 1, 1, 1)).where(values, 0.0)
    out = scores.softmax(-1).matmul(values.permute(0, 2, 1, 3).unsqueeze(2))  # (B, KVH, G, T, D)
    return self.linear(out.permute(0, 3, 1, 2, 4).reshape(B * T, H * D), f"blk.{il}.attn_output.weight")

  def ffn(self, il: int, x: Tensor) -> Tensor:
    gate, up = self.linear(x, f"blk.{il}.ffn_gate.weight"), self.linear(x, f"blk.{il}.ffn_up.weight")
    return self.linear(gate.silu() * up, f"blk.{il}.ffn_down.weight")

  def forward(self, h: Tensor, rows: "_Rows") -> Tensor:
    """h: (B*T, n_embd) f32 token embeddings, row-major by item; returns the final hidden states (B*T, n_embd)
    (lazy; the KV cache writes are pending stores until `_realize`)."""
    for il in range(self.cfg.n_layer):
      h = h + self.attention(il, self.rms_norm(h, f"blk.{il}.attn_norm.weight"), rows)
      h = (h + self.ffn(il, self.rms_norm(h, f"blk.{il}.ffn_norm.weight"))).contiguous()
    return h

  def head(self, h: Tensor) -> Tensor:
    return self.linear(self.rms_norm(h, "output_norm.weight"), self.output.name)

  def embed(self, ids: list[int]) -> Tensor:
    t = self.tok_embd
    return dequantize_rows(self.raw(t), t.ggml_type, t.shape[1], t.shape[0], Tensor([int(i) for i in ids], dtype=dtypes.int32, device=self.device))

  def embed_one(self, tok: UOp) -> Tensor:
    """One row of the embedding table selected by a (symbolic) token id: a slice, no gather."""
    t = self.tok_embd
    rows = self.raw(t).reshape(t.shape[1], -1)
    return dequantize(rows[tok:tok + 1].reshape(-1), t.ggml_type, (1, t.shape[0]), dtypes.float32)

  def _realize(self, rows: "_Rows", *outs: Tensor) -> None:
    # the cache writes go with the outputs, in one schedule (with logits "none" they are all there is to run)
    Tensor.realize(*outs, *rows.written)

  def _rows(self, slots: list, starts: list, T: int, n_kv) -> "_Rows":
    B = len(slots)
    cos = [self.rope_cos[p:p + T] for p in starts]
    sin = [self.rope_sin[p:p + T] for p in starts]
    start_t = Tensor.stack(*[Tensor(p, device=self.device).cast(dtypes.int32) for p in starts]).reshape(B, 1)
    qpos = start_t + Tensor.arange(T, dtype=dtypes.int32).to(self.device).reshape(1, T)  # (B, T)
    return _Rows(B, T, slots, starts, n_kv, Tensor.stack(*cos), Tensor.stack(*sin), qpos)

  def _decode(self, *args: UOp) -> Tensor:
    """The jitted batched decode: args = B tokens, B slots, B positions, n_kv (all bound Variables)."""
    B = (len(args) - 1) // 3
    toks, slots, starts, n_kv = args[:B], args[B:2 * B], args[2 * B:3 * B], args[3 * B]
    x = Tensor.cat(*[self.embed_one(t) for t in toks]) if B > 1 else self.embed_one(toks[0])
    rows = self._rows(list(slots), list(starts), 1, n_kv)
    logits = self.head(self.forward(x, rows))
    self._realize(rows, logits)
    return logits

  def _prefill(self, it: StepItem) -> np.ndarray | None:
    T = len(it.tokens)
    start = Variable(f"start_T{T}", 0, self.ctx - T).bind(int(it.start_pos))
    rows = self._rows([self.v_pslot.bind(int(it.slot))], [start], T, start + T)
    h = self.forward(self.embed(it.tokens), rows)
    if it.logits == "none":
      self._realize(rows)
      return None
    logits = self.head(h if it.logits == "all" else h[-1:])
    self._realize(rows, logits)
    out = logits.numpy()
    return out if it.logits == "all" else out[0]

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
      if it.start_pos > self.lengths[it.slot]:
        raise ValueError(f"item {i}: start_pos {it.start_pos} leaves a gap: slot {it.slot} holds {self.lengths[it.slot]} positions")
      bad = [t for t in it.tokens if not _is_int(t) or not 0 <= t < self.cfg.n_vocab]
      if bad: raise ValueError(f"item {i}: token id {bad[0]} out of range (n_vocab {self.cfg.n_vocab})")

  def step(self, items: list[StepItem]) -> list[np.ndarray | None]:
    """Feeds every item's tokens to its slot and returns, per item, None ("none"), the f32 logits of its last
    token (n_vocab,) ("last") or of every token (len(tokens), n_vocab) ("all")."""
    self.validate(items)
    out: list[np.ndarray | None] = [None] * len(items)
    dec = [i for i, it in enumerate(items) if len(it.tokens) == 1]
    if dec:
      B = len(dec)
      jit = self._decode_jits.get(B)
      if jit is None: jit = self._decode_jits[B] = TinyJit(self._decode)
      rows = [items[i] for i in dec]
      args = [self.v_tok[j].bind(int(it.tokens[0])) for j, it in enumerate(rows)]
      args += [self.v_slot[j].bind(int(it.slot)) for j, it in enumerate(rows)]
      args += [self.v_pos[j].bind(int(it.start_pos)) for j, it in enumerate(rows)]
      args.append(self.v_nkv.bind(max(int(it.start_pos) for it in rows) + 1))
      logits = jit(*args).numpy()  # a copy: the jit reuses its output buffer
      for j, i in enumerate(dec):
        kind = items[i].logits
        out[i] = None if kind == "none" else logits[j] if kind == "last" else logits[j:j + 1]
    for i, it in enumerate(items):
      if len(it.tokens) > 1: out[i] = self._prefill(it)
    for it in items: self.lengths[it.slot] = int(it.start_pos) + len(it.tokens)
    return out

  def memory_bytes(self) -> int:
    """Device bytes this model holds: weights (quantized), KV cache, RoPE tables. The captured decode graphs'
    activations (a few (B, n_ff) and (B, n_vocab) f32 buffers per batch size) come on top."""
    ts = [*self.bufs.values(), *self.kv, self.rope_cos, self.rope_sin]
    return sum(t.nbytes() for t in ts)

  def close(self) -> None:
    """Drop every device buffer of this model (weights, KV cache, RoPE tables, the captured jits) and return
    tinygrad's cached allocations to the driver. The object is unusable afterwards."""
    device = self.device
    for j in self._decode_jits.values(): j.reset()
    self._decode_jits.clear()
    del self.bufs, self.kv, self.rope_cos, self.rope_sin
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
  cos: Tensor          # (B, T, n_rot/2)
  sin: Tensor
  qpos: Tensor         # (B, T) int32 absolute positions
  written: list = field(default_factory=list)  # per layer, the cache after this pass's writes (to realize)


Llama = Model


def load_model(path: str, ctx: int, slots: int, device: str | None = None) -> Model:
  """The model class for the file's general.architecture (refuses the ones not implemented)."""
  arch = GGUFFile(path).arch
  if arch not in SUPPORTED_ARCHS:
    raise NotImplementedError(f"architecture {arch!r} is not implemented in the tinygrad worker "
                              f"(supported: {', '.join(SUPPORTED_ARCHS)})")
  return Model(path, ctx, slots, device)

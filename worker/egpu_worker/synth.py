"""Write a tiny synthetic llama-architecture GGUF file whose weight matrices all use one tensor type.

    python -m egpu_worker.synth OUT.gguf --type Q4_K [--seed 0]

The model is random, so its text is nonsense, but every block is valid for its type: random quant bytes,
with every f16 scale (and min) field overwritten by a finite value chosen so that each matrix's weights have a
standard deviation of about 1/sqrt(fan_in), which keeps activations around unit scale. Norm weights are F32
near 1. Shapes (n_embd 256, n_ff 512, vocab 512) make every row a multiple of 256, so the K-quants fit.

The file is GGUF v3 with alignment 32 and carries a byte-level BPE tokenizer (tokenizer.ggml.model "gpt2",
pre-tokenizer "gpt-2"): the 256 byte tokens spelled in GPT-2's byte alphabet, 255 merges (" a".." z" and
letter pairs) and "<|endoftext|>" as BOS and EOS, 512 tokens in all, the rows of token_embd (the LM head is
tied to it). The GGUF writer here is self-contained (numpy and struct only).
"""
from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass

import numpy as np

from .gguf import GGML_TYPES
from .quant import (BF16, F16, F32, IQ4_NL, IQ4_XS, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0,
                    SUPPORTED_TYPES, dq_ref)

ALIGNMENT = 32
TYPE_BY_NAME = {GGML_TYPES[t][0]: t for t in sorted(SUPPORTED_TYPES)}

# GGUF metadata value types
GGUF_U32, GGUF_I32, GGUF_F32, GGUF_BOOL, GGUF_STRING, GGUF_ARRAY = 4, 5, 6, 7, 8, 9

# Per block type: byte offset of the f16 scale d, and (offset, ratio) of a second f16 field set to ratio*d.
# The second field is Q4_1/Q5_1's additive min m (w = d*q + m, so m = -mean(q)*d centres the weights) or
# Q4_K/Q5_K's dmin (w = d*sc*q - dmin*m with sc and m random 6-bit values of the same mean, so
# dmin = mean(q)*d centres them on average).
SCALE_FIELDS: dict[int, tuple[int, tuple[int, float] | None]] = {
  Q4_0: (0, None), Q4_1: (0, (2, -7.5)), Q5_0: (0, None), Q5_1: (0, (2, -15.5)), Q8_0: (0, None),
  Q4_K: (0, (2, 7.5)), Q5_K: (0, (2, 15.5)), Q6_K: (208, None), IQ4_NL: (0, None), IQ4_XS: (0, None),
}


@dataclass(frozen=True)
class SynthConfig:
  n_embd: int = 256
  n_ff: int = 512
  n_layer: int = 2
  n_head: int = 4
  n_head_kv: int = 2
  n_vocab: int = 512
  context_length: int = 256
  rope_base: float = 10000.0
  norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head


# ---------------------------------------------------------------- GGUF writing

def _str(s: str) -> bytes:
  b = s.encode("utf-8")
  return struct.pack("<Q", len(b)) + b


_SCALAR_FMT = {GGUF_U32: "I", GGUF_I32: "i", GGUF_F32: "f", GGUF_BOOL: "?"}


def _value(vtype: int, value) -> bytes:
  if vtype == GGUF_STRING: return _str(value)
  return struct.pack("<" + _SCALAR_FMT[vtype], value)


def _kv(key: str, vtype: int, value, elem_type: int | None = None) -> bytes:
  """One metadata entry; arrays give `elem_type` and a list."""
  if vtype == GGUF_ARRAY:
    body = struct.pack("<IQ", elem_type, len(value)) + b"".join(_value(elem_type, v) for v in value)
  else:
    body = _value(vtype, value)
  return _str(key) + struct.pack("<I", vtype) + body


def write_gguf(path: str, metadata: list[bytes], tensors: list[tuple[str, int, tuple[int, ...], np.ndarray]]) -> None:
  """metadata: entries from _kv; tensors: (name, ggml type, GGUF shape with the contiguous dimension first,
  raw bytes as uint8). GGUF v3; the data region and every tensor start on ALIGNMENT bytes."""
  infos, offset = [], 0
  for name, ggml_type, shape, raw in tensors:
    _, block_elems, block_bytes = GGML_TYPES[ggml_type]
    n = int(np.prod(shape))
    assert shape[0] % block_elems == 0 and raw.dtype == np.uint8 and raw.size == n // block_elems * block_bytes, name
    infos.append(_str(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
                 + struct.pack("<IQ", ggml_type, offset))
    offset = (offset + raw.size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
  header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + b"".join(metadata) + b"".join(infos)
  with open(path, "wb") as f:
    f.write(header + b"\0" * (-len(header) % ALIGNMENT))
    for _, _, _, raw in tensors:
      f.write(raw.tobytes())
      f.write(b"\0" * (-raw.size % ALIGNMENT))


# ---------------------------------------------------------------- tokenizer

def gpt2_byte_chars() -> list[str]:
  """GPT-2's byte alphabet: printable Latin-1 bytes spell themselves, the other 68 bytes get the code points
  from 256 up, in byte order (so the space, byte 32, is U+0120 'Ġ')."""
  printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
  chars, extra = [], 0
  for b in range(256):
    if b in printable: chars.append(chr(b))
    else: chars.append(chr(256 + extra)); extra += 1
  return chars


def byte_level_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str], int]:
  """(tokens, token types, merges, id of <|endoftext|>): 256 byte tokens, n_vocab - 257 merges, then the
  control token last."""
  chars = gpt2_byte_chars()
  tokens, merges = list(chars), []
  space = chars[ord(" ")]
  pairs = [(space, c) for c in "abcdefghijklmnopqrstuvwxyz"]
  letters = "etaoinshrdlcumwfgypbvkjxqz"
  pairs += [(a, b) for a in letters for b in letters]
  n_merges = min(n_vocab - 257, len(pairs))
  if n_merges < 0: raise ValueError(f"a vocab of {n_vocab}: need at least 257")
  for a, b in pairs[:n_merges]:
    merges.append(f"{a} {b}")
    tokens.append(a + b)
  # Larger vocabs (the shapes of real models, for speed runs) are padded with control tokens
  # the tokenizer never produces: the LM head still has n_vocab rows.
  n_normal = len(tokens)
  tokens += [f"<|extra_{i}|>" for i in range(n_vocab - 1 - n_normal)]
  eot = len(tokens)
  tokens.append("<|endoftext|>")
  types = [1] * n_normal + [3] * (eot - n_normal) + [3]  # normal, then control
  assert len(tokens) == n_vocab == len(set(tokens))
  return tokens, types, merges, eot


# ---------------------------------------------------------------- weights

def quantized_matrix(rng: np.random.Generator, ggml_type: int, rows: int, cols: int, std: float) -> np.ndarray:
  """Raw bytes of a (rows, cols) matrix of `ggml_type` whose weights have a standard deviation close to `std`."""
  if ggml_type in (F32, F16, BF16):
    w = (rng.standard_normal(rows * cols) * std).astype(np.float32)
    if ggml_type == F32: return w.view(np.uint8)
    if ggml_type == F16: return w.astype(np.float16).view(np.uint8)
    return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # bf16: truncated f32
  _, block_elems, block_bytes = GGML_TYPES[ggml_type]
  b = rng.integers(0, 256, size=(rows * cols // block_elems, block_bytes), dtype=np.uint8)
  d_off, second = SCALE_FIELDS[ggml_type]
  spread = rng.uniform(0.5, 1.5, b.shape[0])  # per-block scales vary around the tensor's base scale

  def set_scales(base: float) -> None:
    d = (spread * base).astype(np.float16)
    b[:, d_off:d_off + 2] = d.view(np.uint8).reshape(-1, 2)
    if second is not None:
      off, ratio = second
      b[:, off:off + 2] = (d.astype(np.float32) * ratio).astype(np.float16).view(np.uint8).reshape(-1, 2)

  # Measure the spread the random quant bytes give with unit scales, then rescale. A sample
  # of blocks is enough, and keeps model-sized shapes (--shape llama8b) quick to write.
  sample = slice(0, min(b.shape[0], 4096))
  set_scales(1.0)
  base = std / float(dq_ref(b[sample].reshape(-1), ggml_type).std())
  set_scales(base)
  raw = b.reshape(-1)
  w = dq_ref(b[sample].reshape(-1), ggml_type)
  if not (np.isfinite(w).all() and 0.5 * std < w.std() < 2 * std):
    raise AssertionError(f"{GGML_TYPES[ggml_type][0]}: weights not finite or std {w.std()} far from {std}")
  return raw


def build(ggml_type: int, seed: int = 0, cfg: SynthConfig = SynthConfig()):
  """(metadata entries, tensors) of the synthetic model; see write_gguf."""
  if ggml_type not in SUPPORTED_TYPES: raise ValueError(f"type {ggml_type} is not supported")
  rng = np.random.default_rng(seed)
  name = GGML_TYPES[ggml_type][0]
  tokens, types, merges, eot = byte_level_vocab(cfg.n_vocab)
  a = "llama"
  meta = [
    _kv("general.architecture", GGUF_STRING, a),
    _kv("general.name", GGUF_STRING, f"egpu synthetic {name} (seed {seed})"),
    _kv("general.alignment", GGUF_U32, ALIGNMENT),
    _kv(f"{a}.context_length", GGUF_U32, cfg.context_length),
    _kv(f"{a}.embedding_length", GGUF_U32, cfg.n_embd),
    _kv(f"{a}.block_count", GGUF_U32, cfg.n_layer),
    _kv(f"{a}.feed_forward_length", GGUF_U32, cfg.n_ff),
    _kv(f"{a}.attention.head_count", GGUF_U32, cfg.n_head),
    _kv(f"{a}.attention.head_count_kv", GGUF_U32, cfg.n_head_kv),
    _kv(f"{a}.rope.dimension_count", GGUF_U32, cfg.head_dim),
    _kv(f"{a}.rope.freq_base", GGUF_F32, cfg.rope_base),
    _kv(f"{a}.attention.layer_norm_rms_epsilon", GGUF_F32, cfg.norm_eps),
    _kv(f"{a}.vocab_size", GGUF_U32, cfg.n_vocab),
    _kv("tokenizer.ggml.model", GGUF_STRING, "gpt2"),
    _kv("tokenizer.ggml.pre", GGUF_STRING, "gpt-2"),
    _kv("tokenizer.ggml.tokens", GGUF_ARRAY, tokens, GGUF_STRING),
    _kv("tokenizer.ggml.token_type", GGUF_ARRAY, types, GGUF_I32),
    _kv("tokenizer.ggml.merges", GGUF_ARRAY, merges, GGUF_STRING),
    _kv("tokenizer.ggml.bos_token_id", GGUF_U32, eot),
    _kv("tokenizer.ggml.eos_token_id", GGUF_U32, eot),
    _kv("tokenizer.ggml.add_bos_token", GGUF_BOOL, True),
  ]

  def matrix(tname: str, rows: int, cols: int):  # numpy (rows, cols) = GGUF shape (cols, rows)
    return (tname, ggml_type, (cols, rows), quantized_matrix(rng, ggml_type, rows, cols, cols ** -0.5))

  def norm(tname: str):
    return (tname, F32, (cfg.n_embd,), (1.0 + 0.1 * rng.standard_normal(cfg.n_embd)).astype(np.float32).view(np.uint8))

  e, hd = cfg.n_embd, cfg.head_dim
  tensors = [matrix("token_embd.weight", cfg.n_vocab, e), norm("output_norm.weight")]
  for il in range(cfg.n_layer):
    p = f"blk.{il}."
    tensors += [
      norm(p + "attn_norm.weight"),
      matrix(p + "attn_q.weight", cfg.n_head * hd, e),
      matrix(p + "attn_k.weight", cfg.n_head_kv * hd, e),
      matrix(p + "attn_v.weight", cfg.n_head_kv * hd, e),
      matrix(p + "attn_output.weight", e, cfg.n_head * hd),
      norm(p + "ffn_norm.weight"),
      matrix(p + "ffn_gate.weight", cfg.n_ff, e),
      matrix(p + "ffn_up.weight", cfg.n_ff, e),
      matrix(p + "ffn_down.weight", e, cfg.n_ff),
    ]
  return meta, tensors


def write(path: str, ggml_type: int, seed: int = 0, cfg: SynthConfig = SynthConfig()) -> None:
  write_gguf(path, *build(ggml_type, seed, cfg))


# Shapes of real models (random weights), for speed measurements: the cost of a decode step
# depends on the shapes and types, not on the values.
SHAPES = {
  "tiny": SynthConfig(),
  # SmolLM2-135M: 30 thin layers, 49152-token vocabulary
  "smollm2": SynthConfig(n_embd=576, n_ff=1536, n_layer=30, n_head=9, n_head_kv=3, n_vocab=49152, context_length=2048),
  # LLaMA 3.2 1B: every width a multiple of 256, so every matrix can take a K-quant type
  "llama1b": SynthConfig(n_embd=2048, n_ff=8192, n_layer=16, n_head=32, n_head_kv=8, n_vocab=128256,
                         context_length=8192, rope_base=500000.0),
  # LLaMA 3.1 8B: what the blog ran on the 7900 XTX
  "llama8b": SynthConfig(n_embd=4096, n_ff=14336, n_layer=32, n_head=32, n_head_kv=8, n_vocab=128256,
                         context_length=8192, rope_base=500000.0),
}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m egpu_worker.synth", description=__doc__.split("\n\n")[0])
  ap.add_argument("out", help="the GGUF file to write")
  ap.add_argument("--type", required=True, choices=list(TYPE_BY_NAME), help="tensor type of every weight matrix")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--shape", default="tiny", choices=list(SHAPES),
                  help="tiny (tests) or a real model's shape with random weights (speed runs)")
  args = ap.parse_args(argv)
  write(args.out, TYPE_BY_NAME[args.type], args.seed, SHAPES[args.shape])
  print(f"wrote {args.out}: llama, {args.type}, seed {args.seed}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

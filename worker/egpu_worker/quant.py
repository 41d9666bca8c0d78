"""Dequantization of ggml block formats, written in tinygrad tensor ops.

Every function takes the raw bytes of a tensor as a *lazy* uint8 tensor and returns a lazy
tensor of the weights; nothing is realized, so when the result feeds a matmul the whole
"unpack bytes -> scale -> multiply-accumulate" chain is fused into one kernel and the dequantized
weights never exist in memory. Arithmetic is done in f32 and the result is cast once to f16.

Block layouts (ggml-common.h), 32 weights per block, little-endian f16 scales:
  Q4_0: d:f16, qs[16]          w[j] = d*((qs[j]&15)-8),  w[j+16] = d*((qs[j]>>4)-8)
  Q4_1: d:f16, m:f16, qs[16]   w[j] = d*(qs[j]&15)+m,    w[j+16] = d*(qs[j]>>4)+m
  Q8_0: d:f16, qs:int8[32]     w[j] = d*qs[j]
  Q5_0: d:f16, qh:u8[4], qs[16]          x[i] = nibble(i) | (bit i of qh) << 4;  w[i] = d*(x[i]-16)
  Q5_1: d:f16, m:f16, qh:u8[4], qs[16]   w[i] = d*x[i] + m
  IQ4_NL: d:f16, qs[16]        w[i] = d*KVALUES_IQ4NL[nibble(i)]
(nibble(i) is qs[i]&15 for i < 16 and qs[i-16]>>4 above; qh is a little-endian 32-bit word.)

numpy reference implementations (`*_ref`) of the same layouts are kept here for the tests.
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, dtypes

from .gguf import GGML_TYPES

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL = 0, 1, 2, 3, 6, 7, 8, 20
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16_at(blocks: Tensor, byte: int) -> Tensor:
  """The little-endian f16 at byte offset `byte` of every block, as f32, shape (..., 1)."""
  return blocks[..., byte:byte + 2].bitcast(dtypes.float16).cast(dtypes.float32)


def _nibbles(qs: Tensor) -> Tensor:
  """16 packed bytes -> 32 values 0..15 (low nibbles first, then high), as f32."""
  return Tensor.cat(qs & 0xF, qs >> 4, dim=-1).cast(dtypes.float32)


def dq_q4_0(blocks: Tensor) -> Tensor:
  return _f16_at(blocks, 0) * (_nibbles(blocks[..., 2:18]) - 8.0)


def dq_q4_1(blocks: Tensor) -> Tensor:
  return _f16_at(blocks, 0) * _nibbles(blocks[..., 4:20]) + _f16_at(blocks, 2)


def dq_q8_0(blocks: Tensor) -> Tensor:
  return _f16_at(blocks, 0) * blocks[..., 2:34].bitcast(dtypes.int8).cast(dtypes.float32)


def _high_bits(qh: Tensor) -> Tensor:
  """4 bytes -> 32 values 0/1: bit i of the little-endian word, as f32."""
  bits = Tensor.stack(*[(qh >> b) & 1 for b in range(8)], dim=-1)  # constant shifts: no table to upload
  return bits.reshape(*qh.shape[:-1], 32).cast(dtypes.float32)


def dq_q5_0(blocks: Tensor) -> Tensor:
  return _f16_at(blocks, 0) * (_nibbles(blocks[..., 6:22]) + 16.0 * _high_bits(blocks[..., 2:6]) - 16.0)


def dq_q5_1(blocks: Tensor) -> Tensor:
  return _f16_at(blocks, 0) * (_nibbles(blocks[..., 8:24]) + 16.0 * _high_bits(blocks[..., 4:8])) + _f16_at(blocks, 2)


def dq_iq4_nl(blocks: Tensor) -> Tensor:
  qs = blocks[..., 2:18]
  idx = Tensor.cat(qs & 0xF, qs >> 4, dim=-1)
  # the 16-entry table as a chain of selects on constants: stays inside the fused kernel (a tensor table
  # would be a separate upload and a gather)
  vals = idx.eq(0).where(float(KVALUES_IQ4NL[0]), 0.0)
  for k, v in enumerate(KVALUES_IQ4NL[1:], 1): vals = idx.eq(k).where(float(v), vals)
  return _f16_at(blocks, 0) * vals


_BLOCK_DEQUANT = {Q4_0: dq_q4_0, Q4_1: dq_q4_1, Q5_0: dq_q5_0, Q5_1: dq_q5_1, Q8_0: dq_q8_0, IQ4_NL: dq_iq4_nl}
SUPPORTED_TYPES = {F32, F16, *_BLOCK_DEQUANT}


def dequantize(raw: Tensor, ggml_type: int, shape: tuple[int, ...], dtype=dtypes.float16) -> Tensor:
  """Lazy weights of `shape` (numpy order: last axis contiguous) from their raw bytes `raw` (flat uint8)."""
  rows, cols = shape[:-1], shape[-1]
  if ggml_type == F32:
    return raw.reshape(*rows, cols * 4).bitcast(dtypes.float32).cast(dtype)
  if ggml_type == F16:
    return raw.reshape(*rows, cols * 2).bitcast(dtypes.float16).cast(dtype)
  if ggml_type not in _BLOCK_DEQUANT:
    name = GGML_TYPES.get(ggml_type, (str(ggml_type),))[0]
    raise NotImplementedError(f"dequantization of {name} is not implemented in the tinygrad worker yet")
  _, block_elems, block_bytes = GGML_TYPES[ggml_type]
  blocks = raw.reshape(*rows, cols // block_elems, block_bytes)
  return _BLOCK_DEQUANT[ggml_type](blocks).reshape(*rows, cols).cast(dtype)


def dequantize_rows(raw: Tensor, ggml_type: int, n_rows: int, cols: int, rows: Tensor, dtype=dtypes.float32) -> Tensor:
  """Dequantize only rows `rows` (an int tensor of shape (T,)) of an (n_rows, cols) matrix: embedding lookup."""
  _, block_elems, block_bytes = GGML_TYPES[ggml_type]
  row_bytes = cols // block_elems * block_bytes
  picked = raw.reshape(n_rows, row_bytes)[rows]  # gather of whole quantized rows, (T, row_bytes) uint8
  return dequantize(picked.reshape(-1), ggml_type, (rows.shape[0], cols), dtype)


# ---------------------------------------------------------------- numpy references (for tests)

def _f16_np(b: np.ndarray, byte: int) -> np.ndarray:
  return b[:, byte:byte + 2].copy().view(np.float16).astype(np.float32)


def dq_ref(raw: np.ndarray, ggml_type: int) -> np.ndarray:
  """Flat f32 weights from flat uint8 bytes, straight from the ggml definitions."""
  if ggml_type == F32: return raw.view(np.float32).copy()
  if ggml_type == F16: return raw.view(np.float16).astype(np.float32)
  _, _, block_bytes = GGML_TYPES[ggml_type]
  b = raw.reshape(-1, block_bytes)
  d = _f16_np(b, 0)
  if ggml_type == Q8_0:
    return (d * b[:, 2:34].view(np.int8).astype(np.float32)).reshape(-1)
  if ggml_type in (Q5_0, Q5_1):  # ggml's dequantize_row_q5_{0,1} loop
    qh = b[:, 2:6].copy().view("<u4")[:, 0] if ggml_type == Q5_0 else b[:, 4:8].copy().view("<u4")[:, 0]
    qs = b[:, 6:22] if ggml_type == Q5_0 else b[:, 8:24]
    out = np.empty((b.shape[0], 32), np.float32)
    for j in range(16):
      xh0 = ((qh >> j) << 4) & 0x10
      xh1 = (qh >> (j + 12)) & 0x10
      x0 = ((qs[:, j] & 0x0F) | xh0).astype(np.float32)
      x1 = ((qs[:, j] >> 4) | xh1).astype(np.float32)
      if ggml_type == Q5_0:
        out[:, j], out[:, j + 16] = d[:, 0] * (x0 - 16), d[:, 0] * (x1 - 16)
      else:
        m = _f16_np(b, 2)[:, 0]
        out[:, j], out[:, j + 16] = d[:, 0] * x0 + m, d[:, 0] * x1 + m
    return out.reshape(-1)
  if ggml_type == IQ4_NL:
    kv = np.array(KVALUES_IQ4NL, np.float32)
    qs = b[:, 2:18]
    return (d * np.concatenate([kv[qs & 15], kv[qs >> 4]], axis=1)).reshape(-1)
  out = np.empty((b.shape[0], 32), np.float32)
  qs = b[:, 2:18] if ggml_type == Q4_0 else b[:, 4:20]
  for j in range(16):
    lo, hi = (qs[:, j] & 15).astype(np.float32), (qs[:, j] >> 4).astype(np.float32)
    if ggml_type == Q4_0:
      out[:, j], out[:, j + 16] = d[:, 0] * (lo - 8), d[:, 0] * (hi - 8)
    else:
      m = _f16_np(b, 2)[:, 0]
      out[:, j], out[:, j + 16] = d[:, 0] * lo + m, d[:, 0] * hi + m
  return out.reshape(-1)

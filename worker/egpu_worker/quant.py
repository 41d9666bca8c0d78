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

K-quants and IQ4_XS, 256 weights per block in 8 sub-blocks of 32 (16 of 16 for Q6_K):
  Q4_K (144 B): d:f16, dmin:f16, scales[12], qs[128]
      sub-block j has a 6-bit scale sc[j] and a 6-bit min m[j] packed in `scales` (see _k_scales_mins);
      qs is 4 chunks of 32 bytes, chunk c holds sub-block 2c in its low nibbles and 2c+1 in its high ones;
      w = (d*sc[j])*q - dmin*m[j]
  Q5_K (176 B): d:f16, dmin:f16, scales[12], qh[32], qs[128]
      low 4 bits as Q4_K; bit 4 of sub-block j's element l is bit j of qh[l]
  Q6_K (210 B): ql[128], qh[64], scales:int8[16], d:f16 (at byte 208)
      two halves of 128 weights, each with 64 bytes of ql and 32 of qh. Within a half, element l (0..31) of
      quarter k (0..3) takes its low 4 bits from ql[l + 32*(k&1)] (low nibble for k<2, high for k>=2) and its
      top 2 bits from bits 2k..2k+1 of qh[l]; w = d*scales[i//16]*(q-32) with i the index in the block
  IQ4_XS (136 B): d:f16, scales_h:u16, scales_l[4], qs[128]
      sub-block j: ls = (4 bits of scales_l[j//2], low nibble for even j) | (bits 2j..2j+1 of scales_h) << 4,
      w = d*(ls-32)*KVALUES_IQ4NL[nibble], qs[16j:16j+16] laid out as one IQ4_NL block
BF16: the top 16 bits of an f32 (w = bits << 16 reinterpreted as f32).

Every product in these formulas (f16 scale x 6-8 bit integer x <= 7 bit quant) has at most 24 significant
bits, so it is exact in f32 whatever the order or fusing (FMA) of the operations; the only f32 rounding is the
final add of a min (Q4_1, Q5_1, Q4_K, Q5_K), which is also where ggml and gguf-py round. Then one rounding to
f16. So the f16 result equals the f32 reference rounded to f16, bit for bit.

numpy reference implementations (`*_ref`) of the same layouts are kept here for the tests.
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, dtypes

from .gguf import GGML_TYPES

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL = 0, 1, 2, 3, 6, 7, 8, 20
Q4_K, Q5_K, Q6_K, IQ4_XS, BF16 = 12, 13, 14, 23, 30
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


def _iq4nl_values(idx: Tensor) -> Tensor:
  """Indices 0..15 -> KVALUES_IQ4NL as f32. The 16-entry table is a chain of selects on constants, so it stays
  inside the fused kernel (a tensor table would be a separate upload and a gather)."""
  vals = idx.eq(0).where(float(KVALUES_IQ4NL[0]), 0.0)
  for k, v in enumerate(KVALUES_IQ4NL[1:], 1): vals = idx.eq(k).where(float(v), vals)
  return vals


def dq_iq4_nl(blocks: Tensor) -> Tensor:
  qs = blocks[..., 2:18]
  return _f16_at(blocks, 0) * _iq4nl_values(Tensor.cat(qs & 0xF, qs >> 4, dim=-1))


def _k_scales_mins(s: Tensor) -> tuple[Tensor, Tensor]:
  """The 12 packed scale bytes of a Q4_K/Q5_K block -> 8 scales and 8 mins (6 bits each), as f32, (..., 8).
  Bytes 0..3 hold scales 0..3 in their low 6 bits and the top 2 bits of scales 4..7; bytes 4..7 the same for
  the mins; bytes 8..11 hold the low 4 bits of scales 4..7 (low nibble) and of mins 4..7 (high nibble)."""
  a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
  sc = Tensor.cat(a & 63, (c & 15) | ((a >> 6) << 4), dim=-1)
  mn = Tensor.cat(b & 63, (c >> 4) | ((b >> 6) << 4), dim=-1)
  return sc.cast(dtypes.float32), mn.cast(dtypes.float32)


def _k_low_nibbles(qs: Tensor) -> Tensor:
  """128 bytes -> (..., 8, 32) values 0..15: chunk c of 32 bytes gives sub-block 2c (low nibbles) and 2c+1."""
  q = qs.reshape(*qs.shape[:-1], 4, 1, 32)
  return Tensor.cat(q & 0xF, q >> 4, dim=-2).reshape(*qs.shape[:-1], 8, 32).cast(dtypes.float32)


def _k_scaled(blocks: Tensor, q: Tensor) -> Tensor:
  """w = (d*sc)*q - dmin*m for Q4_K/Q5_K, q of shape (..., 8, 32); gguf-py's order of operations."""
  sc, mn = _k_scales_mins(blocks[..., 4:16])
  d, dmin = _f16_at(blocks, 0), _f16_at(blocks, 2)
  return (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)


def dq_q4_k(blocks: Tensor) -> Tensor:
  return _k_scaled(blocks, _k_low_nibbles(blocks[..., 16:144]))


def dq_q5_k(blocks: Tensor) -> Tensor:
  qh = blocks[..., 16:48]
  high = Tensor.stack(*[(qh >> j) & 1 for j in range(8)], dim=-2).cast(dtypes.float32)  # (..., 8, 32): bit j -> sub-block j
  return _k_scaled(blocks, _k_low_nibbles(blocks[..., 48:176]) + 16.0 * high)


def dq_q6_k(blocks: Tensor) -> Tensor:
  lead = blocks.shape[:-1]
  ql = blocks[..., 0:128].reshape(*lead, 2, 64)
  qh = blocks[..., 128:192].reshape(*lead, 2, 32)
  low = Tensor.cat(ql & 0xF, ql >> 4, dim=-1)                                # (..., 2, 128)
  high = Tensor.cat(*[(qh >> (2 * k)) & 3 for k in range(4)], dim=-1)        # (..., 2, 128)
  q = (low.cast(dtypes.float32) + 16.0 * high.cast(dtypes.float32) - 32.0).reshape(*lead, 16, 16)
  sc = blocks[..., 192:208].bitcast(dtypes.int8).cast(dtypes.float32)        # (..., 16)
  return ((_f16_at(blocks, 208) * sc).unsqueeze(-1) * q).reshape(*lead, 256)


def dq_iq4_xs(blocks: Tensor) -> Tensor:
  lead = blocks.shape[:-1]
  sl = blocks[..., 4:8]
  lo = Tensor.stack(sl & 0xF, sl >> 4, dim=-1).reshape(*lead, 8)            # sub-block j: nibble j%2 of byte j//2
  hi = Tensor.cat(*[Tensor.stack(*[(blocks[..., b:b + 1] >> (2 * k)) & 3 for k in range(4)], dim=-1).reshape(*lead, 4)
                    for b in (2, 3)], dim=-1)                                # bits 2j..2j+1 of the u16 scales_h
  ls = lo.cast(dtypes.float32) + 16.0 * hi.cast(dtypes.float32) - 32.0
  qs = blocks[..., 8:136].reshape(*lead, 8, 16)
  vals = _iq4nl_values(Tensor.cat(qs & 0xF, qs >> 4, dim=-1))               # (..., 8, 32)
  return ((_f16_at(blocks, 0) * ls).unsqueeze(-1) * vals).reshape(*lead, 256)


_BLOCK_DEQUANT = {Q4_0: dq_q4_0, Q4_1: dq_q4_1, Q5_0: dq_q5_0, Q5_1: dq_q5_1, Q8_0: dq_q8_0, IQ4_NL: dq_iq4_nl,
                  Q4_K: dq_q4_k, Q5_K: dq_q5_k, Q6_K: dq_q6_k, IQ4_XS: dq_iq4_xs}
SUPPORTED_TYPES = {F32, F16, BF16, *_BLOCK_DEQUANT}


def dequantize(raw: Tensor, ggml_type: int, shape: tuple[int, ...], dtype=dtypes.float16) -> Tensor:
  """Lazy weights of `shape` (numpy order: last axis contiguous) from their raw bytes `raw` (flat uint8)."""
  rows, cols = shape[:-1], shape[-1]
  if ggml_type == F32:
    return raw.reshape(*rows, cols * 4).bitcast(dtypes.float32).cast(dtype)
  if ggml_type == F16:
    return raw.reshape(*rows, cols * 2).bitcast(dtypes.float16).cast(dtype)
  if ggml_type == BF16:  # by hand rather than through dtypes.bfloat16, which not every backend renders
    bits = raw.reshape(*rows, cols * 2).bitcast(dtypes.uint16).cast(dtypes.uint32) << 16
    return bits.bitcast(dtypes.float32).cast(dtype)
  if ggml_type not in _BLOCK_DEQUANT:
    name = GGML_TYPES.get(ggml_type, (f"ggml type {ggml_type}",))[0]
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
  if ggml_type == BF16: return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
  _, _, block_bytes = GGML_TYPES[ggml_type]
  b = raw.reshape(-1, block_bytes)
  if ggml_type in _K_REF: return _K_REF[ggml_type](b).reshape(-1)
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


# The 256-weight formats, as ggml's dequantize_row_{q4_K,q5_K,q6_K,iq4_xs} loops walk them; each takes
# (n_blocks, block_bytes) uint8 and returns (n_blocks, 256) f32.

def _scale_min_k4_ref(j: int, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """ggml's get_scale_min_k4: 6-bit scale and min of sub-block j from the 12 scale bytes s (n_blocks, 12)."""
  s = s.astype(np.int32)
  if j < 4: return s[:, j] & 63, s[:, j + 4] & 63
  return (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4), (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)


def _q45_k_ref(b: np.ndarray, five_bits: bool) -> np.ndarray:
  d, dmin, scales = _f16_np(b, 0)[:, 0], _f16_np(b, 2)[:, 0], b[:, 4:16]
  qh = b[:, 16:48].astype(np.int32) if five_bits else None
  ql = b[:, 48:176] if five_bits else b[:, 16:144]
  out = np.empty((b.shape[0], 256), np.float32)
  for c in range(4):  # 64 weights per step: two sub-blocks sharing 32 bytes of ql
    (sc1, m1), (sc2, m2) = _scale_min_k4_ref(2 * c, scales), _scale_min_k4_ref(2 * c + 1, scales)
    d1, mm1 = d * sc1.astype(np.float32), dmin * m1.astype(np.float32)
    d2, mm2 = d * sc2.astype(np.float32), dmin * m2.astype(np.float32)
    for l in range(32):
      q = ql[:, 32 * c + l].astype(np.int32)
      lo, hi = q & 0xF, q >> 4
      if five_bits:
        lo = lo + 16 * ((qh[:, l] >> (2 * c)) & 1)
        hi = hi + 16 * ((qh[:, l] >> (2 * c + 1)) & 1)
      out[:, 64 * c + l] = d1 * lo.astype(np.float32) - mm1
      out[:, 64 * c + 32 + l] = d2 * hi.astype(np.float32) - mm2
  return out


def _q6_k_ref(b: np.ndarray) -> np.ndarray:
  d = _f16_np(b, 208)[:, 0]
  out = np.empty((b.shape[0], 256), np.float32)
  for n in range(2):  # two halves of 128 weights
    ql = b[:, 64 * n:64 * n + 64].astype(np.int32)
    qh = b[:, 128 + 32 * n:128 + 32 * n + 32].astype(np.int32)
    sc = b[:, 192 + 8 * n:192 + 8 * n + 8].view(np.int8).astype(np.float32)
    for l in range(32):
      i = l // 16
      q1 = ((ql[:, l] & 0xF) | (((qh[:, l] >> 0) & 3) << 4)) - 32
      q2 = ((ql[:, l + 32] & 0xF) | (((qh[:, l] >> 2) & 3) << 4)) - 32
      q3 = ((ql[:, l] >> 4) | (((qh[:, l] >> 4) & 3) << 4)) - 32
      q4 = ((ql[:, l + 32] >> 4) | (((qh[:, l] >> 6) & 3) << 4)) - 32
      for k, q in enumerate((q1, q2, q3, q4)):
        out[:, 128 * n + 32 * k + l] = d * sc[:, i + 2 * k] * q.astype(np.float32)
  return out


def _iq4_xs_ref(b: np.ndarray) -> np.ndarray:
  d = _f16_np(b, 0)[:, 0]
  scales_h = b[:, 2:4].copy().view("<u2")[:, 0].astype(np.int32)
  kv = np.array(KVALUES_IQ4NL, np.float32)
  out = np.empty((b.shape[0], 256), np.float32)
  for ib in range(8):
    ls = ((b[:, 4 + ib // 2].astype(np.int32) >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
    dl = d * (ls - 32).astype(np.float32)
    qs = b[:, 8 + 16 * ib:8 + 16 * ib + 16]
    out[:, 32 * ib:32 * ib + 16] = dl[:, None] * kv[qs & 0xF]
    out[:, 32 * ib + 16:32 * ib + 32] = dl[:, None] * kv[qs >> 4]
  return out


_K_REF = {Q4_K: lambda b: _q45_k_ref(b, False), Q5_K: lambda b: _q45_k_ref(b, True), Q6_K: _q6_k_ref, IQ4_XS: _iq4_xs_ref}

"""The tinygrad dequantizers against straight numpy transcriptions of ggml's block formats, and against
gguf-py's dequantizer through the fixtures in engine/tests/fixtures/dequant."""
import json
from pathlib import Path

import numpy as np
import pytest
from tinygrad import GlobalCounters, Tensor, dtypes

from egpu_worker.quant import (BF16, F16, F32, IQ4_NL, IQ4_XS, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0,
                               SUPPORTED_TYPES, dequantize, dequantize_rows, dq_ref)
from egpu_worker.gguf import GGML_TYPES

ROWS, COLS = 8, 256  # 8 blocks of 32 (or one of 256) per row
ALL_TYPES = [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS]
ALL_IDS = [GGML_TYPES[t][0] for t in ALL_TYPES]
# byte offsets of each block's f16 scale fields (d, and m/dmin where there is one)
F16_FIELDS = {Q4_0: (0,), Q4_1: (0, 2), Q5_0: (0,), Q5_1: (0, 2), Q8_0: (0,), Q4_K: (0, 2), Q5_K: (0, 2),
              Q6_K: (208,), IQ4_NL: (0,), IQ4_XS: (0,)}
FIXTURES = Path(__file__).resolve().parents[2] / "engine" / "tests" / "fixtures" / "dequant"


def random_blocks(ggml_type: int, rng: np.random.Generator) -> np.ndarray:
  """Random quantized bytes for a (ROWS, COLS) matrix, with finite, varied f16 scales (and mins)."""
  if ggml_type == F32: return rng.standard_normal(ROWS * COLS).astype(np.float32).view(np.uint8)
  if ggml_type == F16: return rng.standard_normal(ROWS * COLS).astype(np.float16).view(np.uint8)
  if ggml_type == BF16:  # the top halves of random f32s
    return (rng.standard_normal(ROWS * COLS).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
  _, elems, nbytes = GGML_TYPES[ggml_type]
  b = rng.integers(0, 256, size=(ROWS * COLS // elems, nbytes), dtype=np.uint8)
  for off in F16_FIELDS[ggml_type]:
    vals = (rng.uniform(0.5, 2, b.shape[0]) * 10.0 ** rng.integers(-4, 0, b.shape[0]) * rng.choice([-1, 1], b.shape[0]))
    b[:, off:off + 2] = vals.astype(np.float16).view(np.uint8).reshape(-1, 2)
  return b.reshape(-1)


def test_every_supported_type_is_tested():
  assert set(ALL_TYPES) == SUPPORTED_TYPES


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=ALL_IDS)
def test_dequant_matches_numpy(ggml_type):
  rng = np.random.default_rng(ggml_type)
  raw = random_blocks(ggml_type, rng)
  ref = dq_ref(raw, ggml_type).reshape(ROWS, COLS)
  got_t = dequantize(Tensor(raw), ggml_type, (ROWS, COLS))
  assert got_t.dtype == dtypes.float16 and got_t.shape == (ROWS, COLS)
  got = got_t.numpy().astype(np.float32)
  # one rounding to f16 of the exact value: relative error <= 2^-11 (plus f16 subnormal spacing)
  np.testing.assert_allclose(got, ref.astype(np.float16).astype(np.float32), rtol=0, atol=0)
  assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0 ** -11 + 2.0 ** -24)


def test_reference_decodes_known_block():
  """Hand-made Q4_1 and Q8_0 blocks, so the numpy reference itself is checked against the spec."""
  q41 = np.zeros(20, np.uint8)
  q41[0:2] = np.array([0.5], np.float16).view(np.uint8)   # d
  q41[2:4] = np.array([-1.0], np.float16).view(np.uint8)  # m
  q41[4] = 0x3A  # low nibble 10 -> w[0], high nibble 3 -> w[16]
  w = dq_ref(q41, Q4_1)
  assert w[0] == 0.5 * 10 - 1 and w[16] == 0.5 * 3 - 1 and w[1] == -1.0
  q8 = np.zeros(34, np.uint8)
  q8[0:2] = np.array([0.25], np.float16).view(np.uint8)
  q8[2:4] = np.array([-128, 7], np.int8).view(np.uint8)
  w = dq_ref(q8, Q8_0)
  assert w[0] == -32.0 and w[1] == 1.75 and w[2] == 0.0
  q50 = np.zeros(22, np.uint8)
  q50[0:2] = np.array([2.0], np.float16).view(np.uint8)
  q50[2:6] = np.array([(1 << 0) | (1 << 17)], "<u4").view(np.uint8)  # high bit of elements 0 and 17
  q50[6], q50[7] = 0x21, 0x50  # element 0: 1 | 16, element 16: 2, element 1: 0, element 17: 5 | 16
  w = dq_ref(q50, Q5_0)
  assert (w[0], w[16], w[1], w[17], w[2]) == (2.0 * (17 - 16), 2.0 * (2 - 16), 2.0 * -16, 2.0 * (21 - 16), -32.0)
  iq = np.zeros(18, np.uint8)
  iq[0:2] = np.array([0.5], np.float16).view(np.uint8)
  iq[2] = 0xF0  # element 0 -> kvalues[0] = -127, element 16 -> kvalues[15] = 113
  w = dq_ref(iq, IQ4_NL)
  assert (w[0], w[16], w[1]) == (-63.5, 56.5, -63.5)


def test_reference_decodes_known_k_blocks():
  """Hand-made Q4_K, Q5_K, Q6_K and IQ4_XS blocks: the numpy references against the layouts in ggml-common.h."""
  f16 = lambda v: np.array([v], np.float16).view(np.uint8)
  q4k = np.zeros(144, np.uint8)
  q4k[0:2], q4k[2:4] = f16(0.5), f16(0.25)  # d, dmin
  q4k[4 + 0] = 0xC0 | 3        # scale 0 = 3; top bits 0b11 of scale 4
  q4k[4 + 4] = 0x40 | 5        # min 0 = 5; top bits 0b01 of min 4
  q4k[4 + 8] = 0x72            # scale 4 low = 2, min 4 low = 7  -> scale 4 = 2 | 3<<4 = 50, min 4 = 7 | 1<<4 = 23
  q4k[16] = 0x9A               # element 0 of sub-block 0: 10; element 0 of sub-block 1: 9 (scale 0, min 0)
  q4k[16 + 64] = 0x04          # element 0 of sub-block 4 (chunk 2, low nibble): 4
  w = dq_ref(q4k, Q4_K)
  assert (w[0], w[1], w[32], w[128], w[129]) == (0.5 * 3 * 10 - 0.25 * 5, -1.25, 0.0, 0.5 * 50 * 4 - 0.25 * 23, -5.75)
  q5k = np.concatenate([q4k[:16], np.zeros(32, np.uint8), q4k[16:]])  # qh inserted before qs
  q5k[16 + 0] = 1 << 4  # bit 4 of element 0 of sub-block 4
  w5 = dq_ref(q5k, Q5_K)
  assert (w5[0], w5[128]) == (w[0], 0.5 * 50 * (4 + 16) - 0.25 * 23)
  q6k = np.zeros(210, np.uint8)
  q6k[208:210] = f16(0.125)
  q6k[192:208] = np.arange(-8, 8, dtype=np.int8).view(np.uint8)  # scale i = i - 8
  q6k[0] = 0x5F                # ql: element 0 low 4 bits = 15, element 64 low 4 bits = 5
  q6k[128] = 0b10_00_00_11     # qh: element 0 top bits 3, element 96 top bits 2
  w = dq_ref(q6k, Q6_K)
  # element 0: q = 15 | 3<<4 = 63 -> 31, scale 0 = -8; element 64: q = 5 -> -27, scale 4 = -4;
  # element 96: q = 0 | 2<<4 = 32 -> 0; element 128 (second half): q = 0 -> -32, scale 8 = 0
  assert (w[0], w[64], w[96], w[16], w[255]) == (0.125 * -8 * 31, 0.125 * -4 * -27, 0.0, 0.125 * -7 * -32, 0.125 * 7 * -32)
  xs = np.zeros(136, np.uint8)
  xs[0:2] = f16(0.5)
  xs[2:4] = np.array([0b10 << 14 | 0b01], "<u2").view(np.uint8)  # high bits: sub-block 0 -> 1, sub-block 7 -> 2
  xs[4], xs[7] = 0x21, 0xF0     # low bits: sub-block 0 -> 1, 1 -> 2, 6 -> 0, 7 -> 15
  xs[8] = 0xF0                  # sub-block 0: element 0 -> kvalues[0], element 16 -> kvalues[15]
  w = dq_ref(xs, IQ4_XS)
  # ls: sub-block 0 = 1 | 1<<4 = 17 -> -15; sub-block 1 = 2 -> -30; sub-block 7 = 15 | 2<<4 = 47 -> 15
  assert (w[0], w[16], w[32], w[224]) == (0.5 * -15 * -127, 0.5 * -15 * 113, 0.5 * -30 * -127, 0.5 * 15 * -127)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=ALL_IDS)
def test_dequant_fuses_into_one_matvec_kernel(ggml_type):
  rng = np.random.default_rng(7)
  raw = random_blocks(ggml_type, rng)
  x = rng.standard_normal(COLS).astype(np.float32)
  w_dev, x_dev = Tensor(raw).realize(), Tensor(x).realize()
  GlobalCounters.reset()
  y = x_dev.matmul(dequantize(w_dev, ggml_type, (ROWS, COLS)).T).realize()
  assert GlobalCounters.kernel_count == 1, "the dequantized weights must not be materialized"
  w = dq_ref(raw, ggml_type).reshape(ROWS, COLS).astype(np.float64)
  ref = w @ x
  # whether or not the backend keeps the f16 rounding of the weights inside the fused kernel, the result is
  # within f16 rounding (2^-11 relative per weight) of the exact product, plus f32 accumulation noise
  bound = 2.0 ** -11 * (np.abs(w) @ np.abs(x)) + 1e-5 * np.abs(ref).max()
  assert np.all(np.abs(y.numpy() - ref) <= bound), (y.numpy() - ref, bound)


def test_unsupported_type_is_refused():
  with pytest.raises(NotImplementedError, match="ggml type 10 "):  # Q2_K
    dequantize(Tensor(np.zeros(84, np.uint8)), 10, (1, 256))


# ---------------------------------------------------------------- against gguf-py (an outside reference)

def _fixture(ggml_type: int) -> tuple[np.ndarray, np.ndarray]:
  """(raw bytes, gguf-py's f32 dequantization) of the fixture for `ggml_type`."""
  manifest = json.loads((FIXTURES / "manifest.json").read_text())
  (entry,) = [f for f in manifest["fixtures"] if f["type"] == GGML_TYPES[ggml_type][0]]
  assert entry["ggml_id"] == ggml_type
  raw = np.fromfile(FIXTURES / entry["raw_file"], np.uint8)
  ref = np.fromfile(FIXTURES / entry["f32_file"], "<f4").astype(np.float32)
  assert ref.size == entry["n_elements"] and ref.size % 256 == 0
  return raw, ref


def _assert_f16_equal(got: np.ndarray, ref16: np.ndarray, max_ulp: int = 0):
  """got == ref16 (both f16) value for value: infinities must match exactly (same sign), finite values may be
  `max_ulp` f16 steps apart (+0 and -0 count as equal), and neither side may hold a NaN."""
  assert not np.isnan(got).any() and not np.isnan(ref16).any()
  inf = np.isinf(ref16)
  np.testing.assert_array_equal(got[inf], ref16[inf])
  assert not np.isinf(got[~inf]).any(), "overflow to inf where the reference is finite"
  def ordered(a):  # f16 bit patterns mapped to integers in value order, so ulp distance is a difference
    bits = a.view(np.uint16).astype(np.int32)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)
  ulp = np.abs(ordered(got[~inf]) - ordered(ref16[~inf]))
  assert ulp.max(initial=0) <= max_ulp, f"{(ulp > max_ulp).sum()} values more than {max_ulp} ulp off (max {ulp.max()})"


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=ALL_IDS)
def test_dequant_matches_gguf_py_fixtures(ggml_type):
  """The f16 weights equal gguf-py's `gguf.quants.dequantize` (f32) rounded to f16.

  Tolerance: 0 ulp. The brief allows 1 f16 ulp where the f32 operation order may differ from gguf-py's, but
  it cannot differ here: every product in these formats is exact in f32 (see quant.py's docstring), so the
  only f32 rounding is the final add of a min, done in the same place as gguf-py. Measured: bit-exact on
  DEV=CPU for every type, signed zeros included. Some fixture blocks carry the largest finite f16 scale
  (65504) or f16 subnormal scales; where the f16 result overflows, the reference rounded to f16 overflows too
  and the two must be the same infinity (a finite 65504 against inf fails). The fixtures' F32/BF16 values
  span the whole f32/bf16 range, so there too f16 rounding gives infinities, zeros and subnormals."""
  raw, ref = _fixture(ggml_type)
  cols = 256
  rows = ref.size // cols
  got = dequantize(Tensor(raw), ggml_type, (rows, cols)).numpy()
  assert got.dtype == np.float16
  with np.errstate(over="ignore"):
    ref16 = ref.astype(np.float16).reshape(rows, cols)
  _assert_f16_equal(got, ref16)
  # the embedding path: a gather of whole quantized rows (repeated and out of order), f32 output
  pick = [rows - 1, 0, rows // 2, 0]
  emb = dequantize_rows(Tensor(raw), ggml_type, rows, cols, Tensor(pick, dtype=dtypes.int32)).numpy()
  assert emb.dtype == np.float32
  np.testing.assert_array_equal(emb.view(np.uint32), ref.reshape(rows, cols)[pick].view(np.uint32))

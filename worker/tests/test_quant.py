"""The tinygrad dequantizers against straight numpy transcriptions of ggml's block formats."""
import numpy as np
import pytest
from tinygrad import GlobalCounters, Tensor, dtypes

from egpu_worker.quant import F16, F32, IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, dequantize, dq_ref
from egpu_worker.gguf import GGML_TYPES

ROWS, COLS = 8, 256  # 8 blocks of 32 per row


def random_blocks(ggml_type: int, rng: np.random.Generator) -> np.ndarray:
  """Random quantized bytes for a (ROWS, COLS) matrix, with finite, varied f16 scales (and mins)."""
  if ggml_type == F32: return rng.standard_normal(ROWS * COLS).astype(np.float32).view(np.uint8)
  if ggml_type == F16: return rng.standard_normal(ROWS * COLS).astype(np.float16).view(np.uint8)
  _, elems, nbytes = GGML_TYPES[ggml_type]
  b = rng.integers(0, 256, size=(ROWS * COLS // elems, nbytes), dtype=np.uint8)
  n_scales = 2 if ggml_type in (Q4_1, Q5_1) else 1
  for s in range(n_scales):
    vals = (rng.uniform(0.5, 2, b.shape[0]) * 10.0 ** rng.integers(-4, 0, b.shape[0]) * rng.choice([-1, 1], b.shape[0]))
    b[:, 2 * s:2 * s + 2] = vals.astype(np.float16).view(np.uint8).reshape(-1, 2)
  return b.reshape(-1)


@pytest.mark.parametrize("ggml_type", [F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL],
                         ids=["F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"])
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


@pytest.mark.parametrize("ggml_type", [Q4_1, Q5_1, Q8_0, IQ4_NL], ids=["Q4_1", "Q5_1", "Q8_0", "IQ4_NL"])
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
  with pytest.raises(NotImplementedError, match="Q6_K"):
    dequantize(Tensor(np.zeros(210, np.uint8)), 14, (1, 256))

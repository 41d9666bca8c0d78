"""The GPU mat-vec layout (egpu_worker.matvec) gives the same products as numpy, for every quantized type.

The layout only applies to devices with shared memory, so this runs on tinygrad's PYTHON device: an emulator
of a GPU (work-groups, local memory, barriers) that needs no GPU and executes the kernels exactly as laid out."""
import numpy as np
import pytest
from tinygrad import Device, Tensor
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.helpers import Context

from egpu_worker import matvec
from egpu_worker.gguf import GGML_TYPES
from egpu_worker.quant import BF16, F16, F32, SUPPORTED_TYPES, dequantize, dq_ref

ROWS, COLS = 64, 512
QUANT_TYPES = sorted(SUPPORTED_TYPES - {F32, F16, BF16})


def _blocks(ggml_type: int, rng: np.random.Generator, rows: int = ROWS) -> np.ndarray:
  _, elems, nbytes = GGML_TYPES[ggml_type]
  b = rng.integers(0, 256, size=(rows * COLS // elems, nbytes), dtype=np.uint8)
  d_offsets = {14: (208,)}.get(ggml_type, (0,) if nbytes % 2 == 0 and ggml_type not in (3, 7, 12, 13) else (0, 2))
  for off in d_offsets:  # small, finite, normal scales (the emulator does not round f16 subnormals like a GPU)
    d = rng.uniform(0.5, 2, b.shape[0]) * rng.choice([-1e-2, 1e-2], b.shape[0])
    b[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
  return b.reshape(-1)


def test_layout_parses_and_prints():
  layout = matvec.Layout.parse("t16,u2,b2,l8,r2")
  assert layout == matvec.Layout(16, 2, 2, 8, 2) and matvec.Layout.parse(str(layout)) == layout
  with pytest.raises(ValueError, match="bad EGPU_MATVEC part"): matvec.Layout.parse("q3")


def _install_recording(monkeypatch, layout: str) -> list:
  """Install the hook with `layout` for this test only; returns the list of layouts it applies."""
  laid_out = []
  original = matvec.apply_layout
  monkeypatch.setattr(matvec, "apply_layout", lambda k, lay: laid_out.append(str(lay)) or original(k, lay))
  monkeypatch.setattr(matvec, "_installed", False)
  monkeypatch.setenv("EGPU_MATVEC", layout)
  import tinygrad.codegen as codegen
  import tinygrad.engine.realize as realize
  monkeypatch.setattr(codegen, "apply_opts", codegen.apply_opts)  # restored after the test
  monkeypatch.setattr(realize, "_compile_kernel", realize._compile_kernel)
  matvec.install()
  return laid_out


CASES = [(t, "t8,u4,b4,l4,r1", 64) for t in QUANT_TYPES] + [(t, "t16,u2,b2,l2,r2", 128) for t in (12, 14)]


@pytest.mark.parametrize("ggml_type,layout,rows", CASES, ids=[f"{GGML_TYPES[t][0]}-{lay}" for t, lay, _ in CASES])
def test_laid_out_matvec_matches_numpy(ggml_type, layout, rows, monkeypatch):
  """(Each layout has its own row count: tinygrad caches programs by kernel, so the same kernel under another
  layout would be served from that cache without being laid out again.)"""
  rng = np.random.default_rng(ggml_type)
  raw = _blocks(ggml_type, rng, rows)
  x = rng.standard_normal((2, COLS)).astype(np.float32)
  w = dq_ref(raw, ggml_type).reshape(rows, COLS).astype(np.float64)
  laid_out = _install_recording(monkeypatch, layout)
  with Context(PARALLEL=0):
    y = Tensor(x, device="PYTHON").matmul(dequantize(Tensor(raw, device="PYTHON"), ggml_type, (rows, COLS)).T).numpy()
  assert laid_out == [layout], "the kernel was not recognised as a quantized mat-vec"
  ref = x.astype(np.float64) @ w.T
  bound = 2.0 ** -11 * (np.abs(x) @ np.abs(w).T) + 1e-5 * np.abs(ref).max()
  bad = np.argwhere(np.abs(y - ref) > bound)
  assert len(bad) == 0, (bad[:8], y[tuple(bad[0])], ref[tuple(bad[0])])


def test_split_gate_is_laid_out(monkeypatch):
  """SwiGLU as the model runs it on a GPU: the gate realized on its own (Model.split_gate), then silu(gate) * up
  with the output split over several axes by a reshape. Both projections are laid out, and the result is
  right. (Fused, gate and up would be one kernel with two reductions, which is left to tinygrad.)"""
  rng = np.random.default_rng(3)
  rows = 96
  gate, up = _blocks(12, rng, rows), _blocks(12, rng, rows)
  x = rng.standard_normal((1, COLS)).astype(np.float32)
  laid_out = _install_recording(monkeypatch, "t8,u4,b2,l4,r1")
  with Context(PARALLEL=0):
    xd = Tensor(x, device="PYTHON")
    g = xd.matmul(dequantize(Tensor(gate, device="PYTHON"), 12, (rows, COLS)).T).contiguous()
    u = xd.matmul(dequantize(Tensor(up, device="PYTHON"), 12, (rows, COLS)).T)
    y = (g.silu() * u).reshape(1, 4, 2, 12).numpy().reshape(1, rows)
  assert laid_out == ["t8,u4,b2,l4,r1"] * 2
  wg, wu = (dq_ref(b, 12).reshape(rows, COLS).astype(np.float64) for b in (gate, up))
  gr, ur = x @ wg.T, x @ wu.T
  np.testing.assert_allclose(y, gr / (1 + np.exp(-gr)) * ur, rtol=2e-3, atol=1e-4)


def test_cpu_kernels_are_left_to_tinygrad(monkeypatch):
  """No shared memory, no layout: the CPU keeps tinygrad's own choice (and its results)."""
  laid_out = _install_recording(monkeypatch, "t8,u4,b4,l4,r1")
  rng = np.random.default_rng(1)
  raw = _blocks(12, rng)
  x = rng.standard_normal((1, COLS)).astype(np.float32)
  y = Tensor(x, device="CPU").matmul(dequantize(Tensor(raw, device="CPU"), 12, (ROWS, COLS)).T).numpy()
  assert laid_out == []
  np.testing.assert_allclose(y, x @ dq_ref(raw, 12).reshape(ROWS, COLS).T, rtol=1e-4, atol=1e-4)

"""SmolLM2-135M-Instruct Q4_1 end to end against llama.cpp's greedy output, through the multi-slot step API.

Reference numbers are copied from the llama.cpp reference file of this project
(shared/reference/smollm2-llamacpp.txt: llama.cpp 0c1e57098, CPU, greedy, raw prompt, no BOS), prompt 1
"The capital of France is". llama.cpp quantizes activations to Q8 for Q4_1/Q8_0 dot products, so an
implementation with exact dequantized weights may pick the other token where llama.cpp's top-2 logits are
close. That file also lists an exact-f32 greedy run (no activation quantization): it differs from llama.cpp
first at generated index 5 (llama.cpp gap 0.260; the f32 run prefers token 2988 by 0.22), before the first
near-tie (< 0.2) llama.cpp lists, index 14. So:
  * free-running greedy (argmax of the returned logits) must equal llama.cpp up to index 5 and the exact-f32
    run for all 16 tokens;
  * teacher-forced on llama.cpp's tokens, our argmax must equal llama.cpp's token at every index 0..13 except
    index 5, where llama.cpp's token must still be within 0.5 of our top logit.
Then the batched decode (4 rows at different positions and slots) must give each row the logits it gets alone.

The model file is not in the repository: set EGPU_SMOLLM2 to it, or put it in $EGPU_MODELS or models/
(scripts/fetch-models.sh fetches it). Without it these tests are skipped, with the reason.
"""
import os
import pathlib

import numpy as np
import pytest

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = pathlib.Path(__file__).resolve().parents[2]

PROMPT = [504, 3575, 282, 4649, 314]
LLAMACPP = [7042, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33, 33,
            2215, 701, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33]
EXACT_F32 = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33]
FIRST_NEAR_TIE = 14
EXACT_DIFFERS_AT = 5
# the same logits computed by another path (jitted B=1 decode vs prefill, alone vs batched). Logits here have a
# std of about 6 (max |37|). Measured max abs diff: 8e-6 at position 0, then up to 7e-3 by position 17 between the
# B=1 decode kernels (matrix-vector, another f32 summation order) and prefill or B>1 decode, which agreed with
# each other to the last bit in that run; the growth with position fits f32 differences that flip the f16
# rounding of some cached keys/values, which later positions read.
SAME = 1e-2
CTX, SLOTS = 64, 4


def model_path() -> pathlib.Path | None:
  cands = [os.environ.get("EGPU_SMOLLM2"), os.environ.get("EGPU_MODELS") and f"{os.environ['EGPU_MODELS']}/{NAME}",
           REPO / "models" / NAME]
  return next((pathlib.Path(c) for c in cands if c and pathlib.Path(c).is_file()), None)


@pytest.fixture(scope="module")
def model():
  path = model_path()
  if path is None: pytest.skip(f"{NAME} not found (set EGPU_SMOLLM2 or EGPU_MODELS, or run scripts/fetch-models.sh)")
  from egpu_worker.model import load_model
  m = load_model(str(path), ctx=CTX, slots=SLOTS)
  yield m
  m.close()


@pytest.fixture(scope="module")
def greedy(model):
  """Slot 0: prefill of the prompt, then 15 jitted decode steps (B=1). Returns (tokens, logits per token)."""
  from egpu_worker.model import StepItem
  logits = [model.step([StepItem(0, 0, PROMPT, "last")])[0]]
  toks = [int(logits[0].argmax())]
  for i in range(15):
    logits.append(model.step([StepItem(0, len(PROMPT) + i, [toks[-1]], "last")])[0])
    toks.append(int(logits[-1].argmax()))
  return toks, np.stack(logits)


@pytest.fixture(scope="module")
def forced(model):
  """Slot 1: prefill of the prompt + llama.cpp's first 13 tokens, logits of every position."""
  from egpu_worker.model import StepItem
  return model.step([StepItem(1, 0, PROMPT + LLAMACPP[:FIRST_NEAR_TIE - 1], "all")])[0]


def test_config(model):
  c = model.cfg
  assert (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.n_vocab) == (30, 576, 9, 3, 64, 1536, 49152)
  assert c.rope_base == 100000.0 and model.output.name == "token_embd.weight"  # tied LM head
  kv = 30 * 2 * SLOTS * CTX * 3 * 64 * 2
  # quantized tensors + f16 KV + RoPE tables (cosines and signed sines, full head width)
  assert model.memory_bytes() - model.graph_bytes == 96_576_768 + kv + 2 * CTX * 64 * 4


def test_greedy_continuation(greedy):
  out, logits = greedy
  assert logits.shape == (16, 49152) and logits.dtype == np.float32 and np.isfinite(logits).all()
  assert out[:EXACT_DIFFERS_AT] == LLAMACPP[:EXACT_DIFFERS_AT]
  assert out == EXACT_F32


def test_teacher_forced_against_llamacpp(model, forced):
  assert forced.shape == (len(PROMPT) + FIRST_NEAR_TIE - 1, model.cfg.n_vocab) and np.isfinite(forced).all()
  preds = forced[len(PROMPT) - 1:]  # row i predicts generated index i
  for i, row in enumerate(preds):
    want = LLAMACPP[i]
    if i == EXACT_DIFFERS_AT:
      assert row.max() - row[want] < 0.5, f"index {i}: llama.cpp's token {want} is {row.max() - row[want]:.3f} below our top"
    else:
      assert int(row.argmax()) == want, f"index {i}: ours {int(row.argmax())}, llama.cpp {want}"


def test_decode_matches_prefill_logits(greedy, forced):
  """Greedy and llama.cpp agree on generated indices 0..4, so the greedy run's logits (prefill for index 0, jitted
  decode after) must equal the teacher-forced prefill's rows there."""
  _, logits = greedy
  n = EXACT_DIFFERS_AT + 1
  diff = float(np.abs(logits[:n] - forced[len(PROMPT) - 1:len(PROMPT) - 1 + n]).max())
  print(f"decode vs prefill: max abs diff {diff:.3g}")
  assert diff < SAME
  assert (logits[:n].argmax(-1) == forced[len(PROMPT) - 1:len(PROMPT) - 1 + n].argmax(-1)).all()


def test_batched_decode_rows_match_alone(model, greedy, forced):
  """One B=4 jitted decode per step, four rows at different positions and slots: slot 0 re-feeds the greedy run
  from position 5 (overwriting identical cache entries), slot 1 the forced sequence from position 10, slot 2 the
  forced sequence from 0, slot 3 other tokens from 0. Rows 0-2 must give the logits they got alone."""
  from egpu_worker.model import StepItem
  _, glog = greedy
  seq = PROMPT + LLAMACPP[:FIRST_NEAR_TIE - 1]
  other = list(reversed(seq))
  worst = 0.0
  for i in range(6):
    out = model.step([StepItem(0, 5 + i, [EXACT_F32[i]], "last"), StepItem(1, 10 + i, [seq[10 + i]], "last"),
                      StepItem(2, i, [seq[i]], "last"), StepItem(3, i, [other[i]], "last")])
    for got, want in ((out[0], glog[i + 1]), (out[1], forced[10 + i]), (out[2], forced[i])):
      worst = max(worst, float(np.abs(got - want).max()))
      assert int(got.argmax()) == int(want.argmax())
    assert np.isfinite(out[3]).all()
  print(f"batched (B=4) vs alone: max abs diff {worst:.3g}")
  assert worst < SAME


def test_context_overflow_is_refused(model):
  from egpu_worker.model import StepItem
  with pytest.raises(ValueError, match="context overflow"):
    model.step([StepItem(3, 0, [1] * (CTX + 1), "none")])


def test_close_frees_device_memory():
  """Load, generate (so the jit holds its buffers), close: tinygrad's count of bytes in use on the device
  goes back to where it was before the load (small slack for synchronize's signal buffer)."""
  path = model_path()
  if path is None: pytest.skip(f"{NAME} not found")
  import gc
  from tinygrad import Device, GlobalCounters
  from egpu_worker.model import StepItem, load_model
  dev = Device.DEFAULT
  gc.collect()
  Device[dev].synchronize()
  before = GlobalCounters.mem_used_per_device[dev]
  m = load_model(str(path), ctx=CTX, slots=SLOTS)  # same shapes as the module's model: its kernels are reused
  tok = int(m.step([StepItem(0, 0, PROMPT, "last")])[0].argmax())
  for i in range(3):
    tok = int(m.step([StepItem(0, len(PROMPT) + i, [tok], "last")])[0].argmax())
  assert tok == EXACT_F32[3]
  loaded = GlobalCounters.mem_used_per_device[dev]
  assert loaded - before >= m.memory_bytes() >= 96_576_768  # at least the quantized tensor bytes
  m.close()
  del m
  gc.collect()
  assert GlobalCounters.mem_used_per_device[dev] - before < 4096
  assert sum(size * len(v) for (size, _), v in Device[dev].allocator.cache.items()) == 0

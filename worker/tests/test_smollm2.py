"""SmolLM2-135M-Instruct Q4_1 end to end against llama.cpp's greedy output.

Reference numbers are copied from the llama.cpp reference file of this project
(shared/reference/smollm2-llamacpp.txt: llama.cpp 0c1e57098, CPU, greedy, raw prompt, no BOS), prompt 1
"The capital of France is". llama.cpp quantizes activations to Q8 for Q4_1/Q8_0 dot products, so an
implementation with exact dequantized weights may pick the other token where llama.cpp's top-2 logits are
close. That file also lists an exact-f32 greedy run (no activation quantization): it differs from llama.cpp
first at generated index 5 (llama.cpp gap 0.260; the f32 run prefers token 2988 by 0.22), before the first
near-tie (< 0.2) llama.cpp lists, index 14. So:
  * free-running greedy must equal llama.cpp up to index 5 and the exact-f32 run for all 16 tokens;
  * teacher-forced on llama.cpp's tokens, our argmax must equal llama.cpp's token at every index 0..13 except
    index 5, where llama.cpp's token must still be within 0.5 of our top logit.

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


def model_path() -> pathlib.Path | None:
  cands = [os.environ.get("EGPU_SMOLLM2"), os.environ.get("EGPU_MODELS") and f"{os.environ['EGPU_MODELS']}/{NAME}",
           REPO / "models" / NAME]
  return next((pathlib.Path(c) for c in cands if c and pathlib.Path(c).is_file()), None)


@pytest.fixture(scope="module")
def model():
  path = model_path()
  if path is None: pytest.skip(f"{NAME} not found (set EGPU_SMOLLM2 or EGPU_MODELS, or run scripts/fetch-models.sh)")
  from egpu_worker.model import Llama
  return Llama(str(path), max_ctx=64)


def test_config(model):
  c = model.cfg
  assert (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.n_vocab) == (30, 576, 9, 3, 64, 1536, 49152)
  assert c.rope_base == 100000.0 and model.output.name == "token_embd.weight"  # tied LM head


def test_greedy_continuation(model):
  out = list(model.generate(PROMPT, 16))  # prefill, then 15 jitted decode steps (capture at 1-2, replay after)
  assert out[:EXACT_DIFFERS_AT] == LLAMACPP[:EXACT_DIFFERS_AT]
  assert out == EXACT_F32


def test_teacher_forced_against_llamacpp(model):
  forced = LLAMACPP[:FIRST_NEAR_TIE - 1]
  logits = model.prefill(PROMPT + forced, all_logits=True).numpy()
  assert logits.shape == (len(PROMPT) + len(forced), model.cfg.n_vocab) and np.isfinite(logits).all()
  preds = logits[len(PROMPT) - 1:]  # row i predicts generated index i
  for i, row in enumerate(preds):
    want = LLAMACPP[i]
    if i == EXACT_DIFFERS_AT:
      assert row.max() - row[want] < 0.5, f"index {i}: llama.cpp's token {want} is {row.max() - row[want]:.3f} below our top"
    else:
      assert int(row.argmax()) == want, f"index {i}: ours {int(row.argmax())}, llama.cpp {want}"


def test_decode_matches_prefill_logits(model):
  """The jitted single-token step and a prefill over the same tokens pick the same next token."""
  seq = PROMPT + EXACT_F32[:6]
  chunked = int(model.prefill(seq).numpy().argmax())
  model.prefill(seq[:-1])
  stepped = model.decode(seq[-1], len(seq) - 1)
  assert chunked == stepped == EXACT_F32[6]


def test_context_overflow_is_refused(model):
  with pytest.raises(ValueError, match="context overflow"):
    model.prefill([1] * (model.max_ctx + 1))


def test_close_frees_device_memory():
  """Load, generate (so the jit holds its buffers), close: tinygrad's count of bytes in use on the device
  goes back to where it was before the load (small slack for synchronize's signal buffer)."""
  path = model_path()
  if path is None: pytest.skip(f"{NAME} not found")
  import gc
  from tinygrad import Device, GlobalCounters
  from egpu_worker.model import Llama
  dev = Device.DEFAULT
  gc.collect()
  Device[dev].synchronize()
  before = GlobalCounters.mem_used_per_device[dev]
  m = Llama(str(path), max_ctx=32)
  assert list(m.generate(PROMPT, 4)) == EXACT_F32[:4]
  loaded = GlobalCounters.mem_used_per_device[dev]
  assert loaded - before >= 96_576_768  # at least the quantized tensor bytes (sum of the table: 96,576,768)
  m.close()
  del m
  gc.collect()
  assert GlobalCounters.mem_used_per_device[dev] - before < 4096
  assert sum(size * len(v) for (size, _), v in Device[dev].allocator.cache.items()) == 0

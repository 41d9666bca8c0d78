"""BERT (an encoder, for egpud's Embed) against sentence-transformers on the engine's tiny random BERT
(engine/tests/fixtures/models/tiny-bert.gguf + .ref.json, from scripts/gen_tiny_bert.py): the last hidden states of
the first text, and every text's mean-pooled, normalized embedding, each text one pass from position 0 padded up
to its bucket (so the mask that keeps queries off the pad rows is exercised by every text).

BOUND: the KV cache is f16 (keys and values round to 11 bits) and the rest f32, as in the engine, whose own
BERT test measures 3.5e-4 on the hidden states and 3.2e-5 on the pooled vectors."""
import json
import pathlib

import numpy as np
import pytest

from egpu_worker.model import StepItem, load_model

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = REPO / "engine" / "tests" / "fixtures" / "models" / "tiny-bert"
HIDDEN_BOUND = 2e-3
POOLED_BOUND = 2e-4


@pytest.fixture(scope="module")
def bert():
  path, ref = FIXTURE.with_suffix(".gguf"), FIXTURE.with_suffix(".ref.json")
  if not path.is_file() or not ref.is_file(): pytest.skip(f"{path} not found")
  model = load_model(str(path), ctx=128, slots=2)
  yield model, json.loads(ref.read_text())
  model.close()


def unit(v):
  v = np.asarray(v, dtype=np.float64)
  return v / np.linalg.norm(v)


def test_bert_matches_sentence_transformers(bert):
  model, ref = bert
  ids = ref["input_ids"]
  [hidden] = model.step([StepItem(slot=0, start_pos=0, tokens=ids[0], logits="all")], hidden=True)
  want = np.asarray(ref["hidden_first_text"])
  assert hidden.shape == want.shape
  diff = np.abs(hidden - want).max()
  assert diff < HIDDEN_BOUND, f"hidden states: max abs diff {diff:.3g}"
  worst = 0.0
  for i, (tokens, mean) in enumerate(zip(ids, ref["mean"])):
    # alternate slots: a slot's earlier text must not leak into the next (every text starts at 0)
    [rows] = model.step([StepItem(slot=i % 2, start_pos=0, tokens=tokens, logits="all")], hidden=True)
    assert rows.shape == (len(tokens), model.cfg.n_embd)
    worst = max(worst, np.abs(unit(rows.mean(0)) - unit(mean)).max())
  assert worst < POOLED_BOUND, f"mean-pooled embeddings: max abs diff {worst:.3g}"


def test_an_encoder_refuses_what_it_cannot_do(bert):
  model, ref = bert
  tokens = ref["input_ids"][1]
  with pytest.raises(ValueError, match="from position 0"):
    model.step([StepItem(slot=0, start_pos=3, tokens=tokens, logits="all")], hidden=True)
  with pytest.raises(ValueError, match="no LM head"):
    model.step([StepItem(slot=0, start_pos=0, tokens=tokens, logits="last")])

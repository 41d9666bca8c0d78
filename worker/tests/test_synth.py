"""The synthetic-model writer: files read back with the worker's own GGUF reader, run by the worker.

Set EGPU_ENGINE_GENERATE to the Rust engine's `generate` example binary to also check that the engine
loads every type's file and generates from it (skipped otherwise)."""
import os
import subprocess

import numpy as np
import pytest
from tinygrad import Context

from egpu_worker import synth
from egpu_worker.gguf import GGML_TYPES, GGUFFile
from egpu_worker.model import StepItem, load_model
from egpu_worker.quant import F32, IQ4_XS, Q4_0, Q4_K, Q6_K, Q8_0, dq_ref

CFG = synth.SynthConfig()
TYPES = [Q4_0, Q8_0, Q4_K, Q6_K, IQ4_XS]
IDS = [GGML_TYPES[t][0] for t in TYPES]


def expected_shapes(ggml_type: int) -> dict[str, tuple[tuple[int, ...], int]]:
  """Tensor name -> (GGUF shape, ggml type)."""
  e, ff, hd = CFG.n_embd, CFG.n_ff, CFG.head_dim
  out = {"token_embd.weight": ((e, CFG.n_vocab), ggml_type), "output_norm.weight": ((e,), F32)}
  for il in range(CFG.n_layer):
    p = f"blk.{il}."
    out.update({p + "attn_norm.weight": ((e,), F32), p + "ffn_norm.weight": ((e,), F32),
                p + "attn_q.weight": ((e, CFG.n_head * hd), ggml_type), p + "attn_k.weight": ((e, CFG.n_head_kv * hd), ggml_type),
                p + "attn_v.weight": ((e, CFG.n_head_kv * hd), ggml_type), p + "attn_output.weight": ((CFG.n_head * hd, e), ggml_type),
                p + "ffn_gate.weight": ((e, ff), ggml_type), p + "ffn_up.weight": ((e, ff), ggml_type),
                p + "ffn_down.weight": ((ff, e), ggml_type)})
  return out


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_synth_file_reads_back_and_runs(tmp_path, ggml_type):
  path = str(tmp_path / "m.gguf")
  synth.main([path, "--type", GGML_TYPES[ggml_type][0], "--seed", "3"])
  f = GGUFFile(path)
  m = f.metadata
  assert f.version == 3 and f.data_offset % 32 == 0 and m["general.alignment"] == 32
  assert f.arch == "llama"
  assert (f.arch_key("embedding_length"), f.arch_key("feed_forward_length"), f.arch_key("block_count")) == (256, 512, 2)
  assert (f.arch_key("attention.head_count"), f.arch_key("attention.head_count_kv"), f.arch_key("context_length")) == (4, 2, 256)
  assert f.arch_key("rope.dimension_count") == 64 and f.arch_key("rope.freq_base") == 10000.0
  assert f.arch_key("attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
  # the byte-level BPE vocab: 256 byte tokens, merges of existing tokens into existing tokens, <|endoftext|> last
  tokens, merges = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.merges"]
  assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "gpt-2"
  assert len(tokens) == len(set(tokens)) == len(m["tokenizer.ggml.token_type"]) == CFG.n_vocab
  assert tokens[ord("a")] == "a" and tokens[ord(" ")] == "\u0120" and tokens[10] == "\u010a"
  assert m["tokenizer.ggml.bos_token_id"] == m["tokenizer.ggml.eos_token_id"] == len(tokens) - 1
  assert tokens[-1] == "<|endoftext|>" and m["tokenizer.ggml.token_type"][-1] == 3
  vocab = set(tokens)
  assert len(merges) == len(tokens) - 257
  assert all(a in vocab and b in vocab and a + b in vocab for a, b in (line.split(" ") for line in merges))
  # tensors: names, shapes, types; weights finite with a spread of about 1/sqrt(fan_in), norms near 1
  want = expected_shapes(ggml_type)
  assert {n: (t.shape, t.ggml_type) for n, t in f.tensors.items()} == want
  assert all(t.offset % 32 == 0 for t in f.tensors.values())
  for name, t in f.tensors.items():
    w = dq_ref(np.array(f.tensor_bytes(name)), t.ggml_type)
    assert np.isfinite(w).all(), name
    if t.ggml_type == F32: assert abs(w.mean() - 1) < 0.05, name
    else: assert 0.7 < w.std() * np.sqrt(t.shape[0]) < 1.4, name
  # the worker runs it. NOOPT: on DEV=CPU, tinygrad's kernel optimizer plus lowering of the fused
  # dequant-matmul kernels takes 10-50 s per type on 2 cores; without it, a few seconds. The math is the same.
  with Context(NOOPT=1):
    model = load_model(path, ctx=64, slots=1)
    logits = model.step([StepItem(slot=0, start_pos=0, tokens=[1, 2, 3], logits="last")])[0]
    model.close()
  assert logits.shape == (CFG.n_vocab,) and np.isfinite(logits).all()
  assert 0.1 < logits.std() < 10  # around unit scale, as the scales were chosen for


def test_synth_is_deterministic(tmp_path):
  a, b, c = (str(tmp_path / n) for n in ("a.gguf", "b.gguf", "c.gguf"))
  synth.write(a, Q4_K, seed=1)
  synth.write(b, Q4_K, seed=1)
  synth.write(c, Q4_K, seed=2)
  ra, rb, rc = (open(p, "rb").read() for p in (a, b, c))
  assert ra == rb and ra != rc and len(ra) == len(rc)


GENERATE = os.environ.get("EGPU_ENGINE_GENERATE")


@pytest.mark.skipif(not GENERATE, reason="EGPU_ENGINE_GENERATE (the engine's generate example) is not set")
@pytest.mark.parametrize("name", list(synth.TYPE_BY_NAME))
def test_engine_generates_from_synth_file(tmp_path, name):
  path = str(tmp_path / f"{name}.gguf")
  synth.main([path, "--type", name])
  r = subprocess.run([GENERATE, path, "--prompt", "hello", "-n", "8", "-t", "1"], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  assert "generated ids:" in r.stdout + r.stderr

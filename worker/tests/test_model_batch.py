"""The multi-slot step API on a tiny random llama written here (2 layers, so each new kernel shape compiles in
seconds on DEV=CPU): batched decode rows do not depend on the rest of the batch, jitted decode equals prefill,
mixed steps, logits shapes, clear errors, memory accounting.

Logits of this model have a std of about 1.5; "the same up to f32 round-off" is asserted as max abs diff < 1e-4
(measured: 0 to ~2e-6)."""
import numpy as np
import pytest

from test_model_ggufwrite import write_gguf

V, E, H, KVH, D, FF, NL = 128, 64, 4, 2, 16, 96, 2
ROUNDOFF = 1e-4


def tiny_llama(path, seed=0, arch="llama", extra=None, f32=()):
  """`f32`: suffixes of tensors (e.g. "attn_k.weight") to store as F32 rather than F16, with the same values."""
  rng = np.random.default_rng(seed)
  def mat(o, i): return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float16)
  def norm(n): return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
  t = {"token_embd.weight": rng.standard_normal((V, E)).astype(np.float16), "output_norm.weight": norm(E),
       "output.weight": (2 * mat(V, E)).astype(np.float16)}
  for il in range(NL):
    p = f"blk.{il}."
    t |= {p + "attn_norm.weight": norm(E), p + "attn_q.weight": mat(H * D, E), p + "attn_k.weight": mat(KVH * D, E),
          p + "attn_v.weight": mat(KVH * D, E), p + "attn_output.weight": mat(E, H * D), p + "ffn_norm.weight": norm(E),
          p + "ffn_gate.weight": mat(FF, E), p + "ffn_up.weight": mat(FF, E), p + "ffn_down.weight": mat(E, FF)}
  t = {name: w.astype(np.float32) if name.endswith(tuple(f32)) and w.dtype == np.float16 else w for name, w in t.items()}
  meta = {"general.architecture": arch, f"{arch}.block_count": NL, f"{arch}.embedding_length": E,
          f"{arch}.feed_forward_length": FF, f"{arch}.attention.head_count": H, f"{arch}.attention.head_count_kv": KVH,
          f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.freq_base": 10000.0,
          f"{arch}.context_length": 64} | (extra or {})
  write_gguf(path, meta, t)
  return path


@pytest.fixture(scope="module")
def path(tmp_path_factory):
  return str(tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"))


@pytest.fixture(scope="module")
def model(path):
  from egpu_worker.model import load_model
  m = load_model(path, ctx=32, slots=4)
  yield m
  m.close()


SEQS = [list(np.random.default_rng(10 + k).integers(0, V, n)) for k, n in enumerate([9, 7, 8, 6])]
SEQS = [[int(t) for t in s] for s in SEQS]


def run_alone(model, seq, slot):
  """One token per step, nothing else in the batch; logits after each token."""
  from egpu_worker.model import StepItem
  return np.stack([model.step([StepItem(slot, p, [t], "last")])[0] for p, t in enumerate(seq)])


def test_batched_rows_match_alone(model):
  """Every sequence fed alone (B=1, slot 0) vs all four fed together with staggered starts (so the batch is
  1, 2, 3, 4, then 4..1 rows, at different positions, in other slots): same logits up to f32 round-off."""
  from egpu_worker.model import StepItem
  alone = [run_alone(model, s, 0) for s in SEQS]
  slot_of = [3, 1, 0, 2]
  got = [[] for _ in SEQS]
  sizes = set()
  for step in range(max(len(s) + k for k, s in enumerate(SEQS))):
    items, who = [], []
    for k, s in enumerate(SEQS):
      p = step - k  # sequence k starts at step k
      if 0 <= p < len(s):
        items.append(StepItem(slot_of[k], p, [s[p]], "last"))
        who.append(k)
    sizes.add(len(items))
    for k, lg in zip(who, model.step(items)): got[k].append(lg)
  assert sizes == {1, 2, 3, 4}
  worst = max(float(np.abs(np.stack(g) - a).max()) for g, a in zip(got, alone))
  print(f"batched vs alone: max abs diff {worst:.3g}")
  assert worst < ROUNDOFF
  for g, a in zip(got, alone): assert (np.stack(g).argmax(-1) == a.argmax(-1)).all()
  assert all(np.isfinite(a).all() and a.std() > 0.5 for a in alone)


def test_decode_matches_prefill(model):
  """The jitted one-token steps and a prefill of the whole sequence (logits "all") agree at every position, and a
  prefill in two chunks agrees too."""
  from egpu_worker.model import StepItem
  seq = SEQS[0]
  stepped = run_alone(model, seq, 1)
  full = model.step([StepItem(2, 0, seq, "all")])[0]
  assert full.shape == (len(seq), V) and full.dtype == np.float32
  a, b = model.step([StepItem(3, 0, seq[:4], "all")])[0], model.step([StepItem(3, 4, seq[4:], "all")])[0]
  chunked = np.concatenate([a, b])
  d1, d2 = float(np.abs(full - stepped).max()), float(np.abs(chunked - stepped).max())
  print(f"prefill vs decode: {d1:.3g}, two chunks vs decode: {d2:.3g}")
  assert d1 < ROUNDOFF and d2 < ROUNDOFF
  assert (full.argmax(-1) == stepped.argmax(-1)).all()


def test_mixed_step_and_logits_kinds(model):
  """A step with prompt chunks and decode rows together gives what separate steps give; "none" gives None,
  "last" (n_vocab,), "all" (len(tokens), n_vocab)."""
  from egpu_worker.model import StepItem
  s0, s1, s2 = SEQS[1], SEQS[2], SEQS[3]
  ref0 = model.step([StepItem(0, 0, s0[:5], "all")])[0]
  ref1 = run_alone(model, s1[:3], 1)
  ref2 = model.step([StepItem(2, 0, s2[:4], "last")])[0]
  # now the same content again, mixed: slot 0 decodes its 5th token, slot 1 prefills 3, slot 2 prefills 4
  model.step([StepItem(0, 0, s0[:4], "none")])
  out = model.step([StepItem(2, 0, s2[:4], "last"), StepItem(0, 4, [s0[4]], "all"), StepItem(1, 0, s1[:3], "all"),
                    StepItem(3, 0, [5], "none")])
  assert out[3] is None and out[0].shape == (V,) and out[1].shape == (1, V) and out[2].shape == (3, V)
  assert np.abs(out[0] - ref2).max() < ROUNDOFF
  assert np.abs(out[1][0] - ref0[4]).max() < ROUNDOFF
  assert np.abs(out[2] - ref1).max() < ROUNDOFF


def test_invalid_steps_are_refused(model):
  from egpu_worker.model import StepItem
  model.step([StepItem(0, 0, [1, 2], "none")])
  before = list(model.lengths)
  bad = {
    "slot 4 out of range": [StepItem(4, 0, [1])],
    "slot -1 out of range": [StepItem(-1, 0, [1])],
    "slot 0 appears twice": [StepItem(0, 2, [1]), StepItem(0, 3, [2])],
    "context overflow": [StepItem(1, 0, [1] * 33)],
    "context overflow: start_pos 31 \\+ 2": [StepItem(0, 31, [1, 2])],
    "token id 128 out of range": [StepItem(1, 0, [1, 128])],
    "token id -1 out of range": [StepItem(1, 0, [-1])],
    "no tokens": [StepItem(1, 0, [])],
    "logits='first'": [StepItem(1, 0, [1], "first")],
    "leaves a gap": [StepItem(0, 3, [1])],
    "no items": [],
  }
  for msg, items in bad.items():
    with pytest.raises(ValueError, match=msg):
      model.step(items)
  assert model.lengths == before  # nothing ran: a refused step changes no slot
  # a valid item next to an invalid one is not run either
  with pytest.raises(ValueError, match="out of range"):
    model.step([StepItem(1, 0, [3]), StepItem(2, 0, [V])])
  assert model.lengths == before


def test_memory_bytes(model, path):
  from egpu_worker.gguf import GGUFFile
  f = GGUFFile(path)
  weights = sum(t.nbytes for t in f.tensors.values())
  kv = NL * 2 * 4 * 32 * KVH * D * 2  # layers x (K,V) x slots x ctx x kv heads x head_dim x f16
  rope = 2 * 32 * D * 4  # cos and signed sin, full width (model.rope)
  assert model.memory_bytes() == weights + kv + rope + model.graph_bytes


def test_copy_prefix_gives_the_logits_of_prefilling_it(model):
  """egpud's prefix copy between slots (a shared system prompt): slot 3 takes the first 6 positions of slot 0,
  then its own tokens, and gets the logits of a slot that prefilled the whole input."""
  from egpu_worker.model import StepItem
  shared, tail_a, tail_b = [5, 9, 14, 20, 33, 41], [7, 8], [60, 61, 62]
  model.step([StepItem(0, 0, shared + tail_a, "none")])
  model.step([StepItem(3, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9], "none")])  # whatever slot 3 held is overwritten
  model.copy_prefix(0, 3, len(shared))
  assert model.lengths[3] == len(shared)
  for il in range(NL):
    kv = model.kv[il].numpy()
    assert np.array_equal(kv[:, 3, :len(shared)], kv[:, 0, :len(shared)])
  copied = model.step([StepItem(3, len(shared), tail_b, "all")])[0]
  fresh = model.step([StepItem(2, 0, shared + tail_b, "all")])[0][len(shared):]
  assert np.abs(copied - fresh).max() < ROUNDOFF
  # bad arguments change nothing
  for args in [(3, 3, 2), (0, 3, len(shared) + len(tail_a) + 1), (0, 4, 1), (-1, 3, 1)]:
    with pytest.raises(ValueError, match="copy_prefix"):
      model.copy_prefix(*args)
  assert model.lengths[3] == len(shared) + len(tail_b)


def test_memory_bytes_count_the_captured_graphs(path):
  """What egpud's budget sees after each step (StepResponse.bytes): the load's bytes plus what the captured
  TinyJits hold, grown once per new batch size or prompt bucket and by nothing on replays; dropping the jits
  returns exactly that to tinygrad."""
  import gc
  from tinygrad import GlobalCounters
  from egpu_worker.model import StepItem, load_model
  m = load_model(path, ctx=32, slots=4)
  try:
    dev, loaded = m.device, m.memory_bytes()
    at_load = GlobalCounters.mem_used_per_device[dev]
    assert m.graph_bytes == 0
    seen = []
    def steps(items_at):  # a jit's plain run, its capture, a replay
      for _ in range(3):
        m.step(items_at())
        seen.append(m.graph_bytes)
    steps(lambda: [StepItem(0, m.lengths[0], [3], "last")])
    steps(lambda: [StepItem(s, m.lengths[s], [5], "last") for s in (0, 1)])
    steps(lambda: [StepItem(3, 0, [1, 2, 3, 4, 5], "last")])
    assert seen[0] == 0 and seen[3] == seen[2] and seen[6] == seen[5]  # plain runs free what they used
    assert 0 < seen[1] == seen[2] < seen[4] == seen[5] < seen[7] == seen[8]  # captures hold, replays add nothing
    assert m.memory_bytes() == loaded + m.graph_bytes
    for j in [*m._decode_jits.values(), *m._prefill_jits.values()]: j.reset()
    gc.collect()
    assert GlobalCounters.mem_used_per_device[dev] == at_load
  finally:
    m.close()


def test_unsupported_architecture(tmp_path):
  from egpu_worker.model import load_model
  p = tiny_llama(tmp_path / "m.gguf", arch="mamba")
  with pytest.raises(NotImplementedError, match='"mamba".*supported architectures: llama'):
    load_model(str(p), ctx=8, slots=1)


def test_bad_construction(path):
  from egpu_worker.model import load_model
  with pytest.raises(ValueError, match="at least 1"):
    load_model(path, ctx=0, slots=1)
  with pytest.raises(ValueError, match="at least 1"):
    load_model(path, ctx=8, slots=0)


def test_stale_non_finite_cache_entries_never_reach_the_output(path):
  """A slot's cache past its sequence holds whatever an earlier sequence left there (egpud reuses slots and keeps
  prompt prefixes); if a model once overflowed f16 those entries are inf or NaN. A batched decode reads every row's
  cache up to the batch's last position, so a short row reads such entries; their attention weight is an exact 0,
  and the mask applies to each weight × value product, so they cannot turn into 0 × inf = NaN. A model whose whole
  cache starts as NaN gives the clean model's logits, bit for bit, through prefills and batched decode steps of
  rows at different positions (jitted: replays from the third)."""
  from tinygrad import Tensor, dtypes
  from egpu_worker.model import StepItem, load_model
  long, short = SEQS[0], SEQS[3]
  outs = []
  for poisoned in (False, True):
    m = load_model(path, ctx=32, slots=2)
    try:
      if poisoned:
        m.kv = [Tensor.full(kv.shape, float("nan"), dtype=dtypes.float16, device=m.device).contiguous().realize()
                for kv in m.kv]
      logits = [m.step([StepItem(0, 0, long[:6], "last")])[0], m.step([StepItem(1, 0, short[:2], "last")])[0]]
      for k in range(3):
        rows = m.step([StepItem(0, 6 + k, [long[6 + k]], "last"), StepItem(1, 2 + k, [short[2 + k]], "last")])
        logits += list(rows)
      outs.append(np.stack(logits))
    finally:
      m.close()
  assert np.isfinite(outs[1]).all()
  np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("f32", [("attn_k.weight",), ("attn_v.weight",)], ids=["q-k-differ", "v-differs"])
def test_q_k_v_of_different_types_pack_where_they_can(tmp_path, path, f32):
  """Q, K and V share one packed mat-vec only where their types agree: all three (the fixture), Q|K with V apart
  (V of another type, as Q4_K_M gives half the layers), or none (K of another type). The same weights stored as F32
  instead of F16 give the same logits up to f32 round-off whichever way the layer is split."""
  from egpu_worker.model import StepItem, load_model
  mixed = str(tiny_llama(tmp_path / "mixed.gguf", f32=f32))
  outs = []
  for p in (path, mixed):
    m = load_model(p, ctx=32, slots=1)
    try:
      want = [["q", "k", "v"]] if p == path else ([["q", "k"], ["v"]] if f32 == ("attn_v.weight",) else None)
      got = [[n.split(".")[2][-1] for n in key.split("+")] for key, _, _ in m.qkv_packs.get(0, [])] or None
      assert got == want
      outs.append(np.stack([m.step([StepItem(0, 0, SEQS[0][:5], "last")])[0],
                            m.step([StepItem(0, 5, [SEQS[0][5]], "last")])[0]]))
    finally:
      m.close()
  np.testing.assert_allclose(outs[0], outs[1], atol=ROUNDOFF, rtol=0)

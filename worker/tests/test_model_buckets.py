"""Prefill chunks padded up to a bucket length (egpu_worker.model.PREFILL_BUCKETS) give what the exact-length pass
gives, leave the slot's later decode unchanged, compile nothing new for a second length in the same bucket, and
fall back to exact bucket-sized pieces near the end of the context.

The exact-length pass is the same Model with `prefill_buckets = None`. "The same" is ROUNDOFF (1e-4, logits with
a std of about 1.5): the padded pass has other matmul shapes, hence another f32 summation order, nothing more.

New compiles are counted as new entries of tinygrad's program cache (tinygrad.codegen.to_program_cache: every
kernel lowered and compiled in this process, keyed by its AST and renderer, whether or not the compiler's disk
cache had the binary)."""
import numpy as np
import pytest

from test_model_batch import ROUNDOFF, V, tiny_llama

CTX = 40


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  from egpu_worker.model import load_model
  m = load_model(str(tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")), ctx=CTX, slots=3)
  yield m
  m.close()


def seq(n, seed=0, vocab=V):
  return [int(t) for t in np.random.default_rng(100 + seed).integers(0, vocab, n)]


def run(m, items, buckets):
  """One step with bucketing on (the default) or off (every chunk at its own length)."""
  from egpu_worker.model import PREFILL_BUCKETS
  m.prefill_buckets = PREFILL_BUCKETS if buckets else None
  try:
    return m.step(items)
  finally:
    m.prefill_buckets = PREFILL_BUCKETS


def n_programs():
  from tinygrad.codegen import to_program_cache
  return len(to_program_cache)


@pytest.mark.parametrize("T", [2, 3, 5, 17])
def test_padded_prefill_equals_exact(model, T):
  """"last" and "all" from position 0, padded to the next bucket vs run at length T; the pad rows really land in
  the cache (after the real ones)."""
  from egpu_worker.model import PREFILL_BUCKETS, StepItem
  R = next(b for b in PREFILL_BUCKETS if b >= T)
  assert model._prefill_pieces(0, T) == [(0, T, R)]
  s = seq(T, T)
  for kind in ("last", "all"):
    exact = run(model, [StepItem(1, 0, s, kind)], False)[0]
    model.kv[0].assign(model.kv[0].zeros_like()).realize()  # layer 0's cache, to see what the pass writes
    padded = run(model, [StepItem(0, 0, s, kind)], True)[0]
    assert padded.shape == exact.shape == ((V,) if kind == "last" else (T, V))
    d = float(np.abs(padded - exact).max())
    print(f"T={T} (bucket {R}) {kind}: padded vs exact max abs diff {d:.3g}")
    assert d < ROUNDOFF
    assert model.lengths[0] == T
    keys = model.kv[0][0, 0].float().numpy()  # (CTX, KVH, D) of slot 0, layer 0
    assert (np.abs(keys[:R]).sum((1, 2)) > 0).all()     # real and pad rows written
    assert (keys[R:] == 0).all()                         # nothing past the bucket


def test_chunks_mid_sequence(model):
  """A prompt fed as chunks of 5, 3 and 9 (padded to 8, 4 and 16: each chunk overwrites the last one's pads, and
  its own pads reach past the next chunk's start) against the same chunks at exact length and against one exact
  prefill of the whole prompt."""
  from egpu_worker.model import StepItem
  s = seq(17, 1)
  cuts = [(0, 5), (5, 8), (8, 17)]
  whole = run(model, [StepItem(2, 0, s, "all")], False)[0]
  for buckets in (False, True):
    got = np.concatenate([run(model, [StepItem(0, a, s[a:b], "all")], buckets)[0] for a, b in cuts])
    # the same with "none", "none", "last" in slot 1
    last = [run(model, [StepItem(1, a, s[a:b], k)], buckets)[0] for (a, b), k in zip(cuts, ("none", "none", "last"))]
    d, dl = float(np.abs(got - whole).max()), float(np.abs(last[2] - whole[-1]).max())
    print(f"chunks 5+3+9 ({'padded' if buckets else 'exact'}) vs one exact prefill: all {d:.3g}, last {dl:.3g}")
    assert last[0] is None and last[1] is None and d < ROUNDOFF and dl < ROUNDOFF
    assert model.lengths[0] == model.lengths[1] == 17


def test_decode_after_padded_prefill(model):
  """Greedy decode (B=2: the padded slot and the exact one in the same steps, and each alone) after a 5-token
  prompt padded to 8: the pads at positions 5..7 are in the cache when decode starts and are overwritten by it."""
  from egpu_worker.model import StepItem
  p = seq(5, 2)
  first_p = run(model, [StepItem(0, 0, p, "last")], True)[0]
  first_e = run(model, [StepItem(1, 0, p, "last")], False)[0]
  first_a = run(model, [StepItem(2, 0, p, "last")], True)[0]
  assert np.abs(first_p - first_e).max() < ROUNDOFF and np.abs(first_a - first_e).max() < ROUNDOFF
  tok = [int(first_p.argmax())] * 3
  assert int(first_e.argmax()) == tok[1]
  worst = 0.0
  for pos in range(5, 5 + 8):
    both = model.step([StepItem(0, pos, [tok[0]], "last"), StepItem(1, pos, [tok[1]], "last")])
    alone = model.step([StepItem(2, pos, [tok[2]], "last")])[0]
    worst = max(worst, float(np.abs(both[0] - both[1]).max()), float(np.abs(alone - both[1]).max()))
    tok = [int(both[0].argmax()), int(both[1].argmax()), int(alone.argmax())]
    assert tok[0] == tok[1] == tok[2], f"greedy differs at position {pos + 1}"
  print(f"decode after padded vs exact prefill: max abs diff {worst:.3g}")
  assert worst < ROUNDOFF


def test_same_bucket_compiles_nothing_new(tmp_path):
  """Lengths 5 then 7 and 6 (bucket 8), in other slots, at other starts: the first pass compiles a set, the others
  nothing; "all" has its own head kernel (once). At exact length, each new length compiles a whole set. A model of
  its own (ctx 24): the start Variable's range is in every kernel, so none of the module fixture's (ctx 40) apply."""
  from egpu_worker.model import StepItem, load_model
  m = load_model(str(tiny_llama(tmp_path / "t.gguf")), ctx=24, slots=3)
  def new_programs(items, buckets=True):
    n = n_programs()
    run(m, items, buckets)
    return n_programs() - n
  try:
    first = new_programs([StepItem(0, 0, seq(5, 3), "last")])
    again = [new_programs([StepItem(1, 0, seq(7, 4), "last")]),
             new_programs([StepItem(2, 0, seq(6, 5), "none")]),
             new_programs([StepItem(2, 6, seq(6, 6), "last")]),   # mid-sequence
             new_programs([StepItem(0, 2, seq(5, 7), "last")])]   # rewinds slot 0
    first_all = new_programs([StepItem(0, 0, seq(5, 3), "all")])
    again.append(new_programs([StepItem(1, 3, seq(7, 4), "all")]))
    print(f"bucket 8: first pass {first} new programs ({first_all} more for \"all\"), then {again}")
    assert first > 0 and again == [0] * 5
    exact = [new_programs([StepItem(0, 0, seq(n, 8), "last")], False) for n in (11, 13)]
    print(f"exact lengths 11, 13: {exact} new programs")
    assert min(exact) > 0
  finally:
    m.close()


def test_pieces_plan(model):
  """The plan: (offset, real tokens, pass length) per pass."""
  from egpu_worker.model import PREFILL_BUCKETS
  pieces = model._prefill_pieces
  assert pieces(0, 5) == [(0, 5, 8)] and pieces(0, 8) == [(0, 8, 8)] and pieces(0, 9) == [(0, 9, 16)]
  assert pieces(30, 5) == [(0, 5, 8)] and pieces(32, 5) == [(0, 5, 8)]   # 32 + 8 = ctx: still fits
  assert pieces(33, 5) == [(0, 4, 4), (4, 1, 1)]                         # 33 + 8 > ctx: 4 + 1, exact
  assert pieces(29, 11) == [(0, 8, 8), (8, 2, 2), (10, 1, 1)]
  assert pieces(24, 9) == [(0, 9, 16)] and pieces(25, 9) == [(0, 8, 8), (8, 1, 1)]
  assert pieces(37, 3) == [(0, 2, 2), (2, 1, 1)] and pieces(38, 2) == [(0, 2, 2)]
  big = PREFILL_BUCKETS[-1]
  model.ctx = 2000  # only the plan reads it here
  try:
    assert pieces(0, 1200) == [(0, big, big), (big, big, big), (2 * big, 1200 - 2 * big, 256)]
    assert pieces(1993, 7) == [(0, 4, 4), (4, 2, 2), (6, 1, 1)] and pieces(1992, 7) == [(0, 7, 8)]
  finally:
    model.ctx = CTX


def test_end_of_context_fallback(model):
  """Chunks whose bucket would pass ctx run as exact bucket-sized pieces: same logits as the exact pass, every
  position up to ctx usable, nothing new compiled for them (buckets 4, 2, 1 are compiled by the first)."""
  from egpu_worker.model import StepItem
  s = seq(CTX, 8)
  whole = run(model, [StepItem(2, 0, s, "all")], False)[0]
  for buckets in (False, True):
    got = [run(model, [StepItem(0, 0, s[:33], "all")], buckets)[0]]             # 33 -> 32 + 1
    got.append(run(model, [StepItem(0, 33, s[33:38], "all")], buckets)[0])     # 5 at 33: 4 + 1
    got.append(run(model, [StepItem(0, 38, s[38:], "last")], buckets)[0][None])  # the last 2 positions
    assert model.lengths[0] == CTX
    d = float(np.abs(np.concatenate(got) - np.concatenate([whole[:38], whole[-1:]])).max())
    print(f"to the end of ctx ({'bucketed' if buckets else 'exact'}) vs one exact prefill: {d:.3g}")
    assert d < ROUNDOFF
  n = n_programs()
  run(model, [StepItem(1, 0, s[:34], "none")], True)
  out = run(model, [StepItem(1, 34, s[34:], "all")], True)[0]  # 6 at 34: 4 + 2
  assert out.shape == (6, V) and np.abs(out - whole[34:]).max() < ROUNDOFF
  assert n_programs() == n


def padded_vs_exact(path, ctx, cuts, decode=0):
  """A prompt fed as chunks `cuts` ("all"), padded in slot 0 and exact in slot 1, then `decode` greedy steps of
  both slots together; the max abs logit diff between the two slots."""
  from egpu_worker.model import StepItem, load_model
  m = load_model(path, ctx=ctx, slots=2)
  try:
    s = seq(cuts[-1][1], 9, m.cfg.n_vocab)
    padded, exact = [np.concatenate([run(m, [StepItem(slot, a, s[a:b], "all")], buckets)[0] for a, b in cuts])
                     for slot, buckets in ((0, True), (1, False))]
    worst = float(np.abs(padded - exact).max())
    tok = [int(padded[-1].argmax())] * 2
    for pos in range(len(s), len(s) + decode):
      both = m.step([StepItem(0, pos, [tok[0]], "last"), StepItem(1, pos, [tok[1]], "last")])
      worst = max(worst, float(np.abs(both[0] - both[1]).max()))
      tok = [int(b.argmax()) for b in both]
      assert tok[0] == tok[1], f"greedy differs at position {pos + 1}"
    return m._prefill_pieces, worst
  finally:
    m.close()


def test_gemma3_sliding_window(tmp_path):
  """Tiny Gemma 3 (a window of 3 keys on 6 of its 7 layers): chunks 5 (-> 8) and 5 at 5 (-> 8), then 3 decode
  steps. The window only bounds keys from below; pads are above every real query, as on global layers."""
  from test_model_gemma3 import tiny_gemma3
  tiny_gemma3(tmp_path / "g.gguf")
  _, worst = padded_vs_exact(str(tmp_path / "g.gguf"), 16, [(0, 5), (5, 10)], decode=3)
  print(f"gemma3: padded vs exact max abs diff {worst:.3g}")
  assert worst < ROUNDOFF


def test_gpt2_learned_positions():
  """Tiny GPT-2 (64 trained positions, ctx 80): a chunk's pads stay below 64 (56 -> 64, 3 at 56 -> 4), a chunk
  whose bucket would pass them falls back (5 at 59: 4 + 1), though the cache would hold more."""
  from test_model_archs import load_case
  path, _ = load_case("tiny-gpt2")
  pieces, worst = padded_vs_exact(path, 80, [(0, 56), (56, 59), (59, 64)])
  assert pieces(56, 3) == [(0, 3, 4)] and pieces(59, 5) == [(0, 4, 4), (4, 1, 1)] and pieces(60, 4) == [(0, 4, 4)]
  print(f"gpt2: padded vs exact max abs diff {worst:.3g}")
  assert worst < ROUNDOFF


def test_prefill_replay_equals_plain_pass(tmp_path):
  """Prefill passes are jitted per bucket: tinygrad runs a jit's first call plainly, captures the second and
  replays from the third. A replayed pass (other tokens, slot and start than the captured one) gives the logits a
  plain pass gives, writes the same cache (the decode after it agrees), and schedules nothing new."""
  from egpu_worker.model import StepItem, load_model
  path = str(tiny_llama(tmp_path / "t.gguf"))
  jitted, plain = load_model(path, ctx=24, slots=3), load_model(path, ctx=24, slots=3)
  try:
    jitted.step([StepItem(0, 0, seq(5, 1), "last")])             # bucket 8: plain run
    jitted.step([StepItem(1, 0, seq(7, 2), "last")])             # captured
    jitted.step([StepItem(2, 0, seq(3, 9), "none")])             # bucket 4, slot 2 positions 0..2
    plain.step([StepItem(2, 0, seq(3, 9), "none")])
    n = n_programs()
    got = jitted.step([StepItem(2, 3, seq(6, 3), "last")])[0]    # replayed: new slot, start and tokens
    assert n_programs() == n
    jit = jitted._prefill_jits[(8, "last", False, False)]
    assert jit.captured is not None
    want = plain.step([StepItem(2, 3, seq(6, 3), "last")])[0]     # the plain model's first bucket-8 pass
    np.testing.assert_allclose(got, want, rtol=0, atol=ROUNDOFF)
    nxt = seq(1, 4)
    np.testing.assert_allclose(jitted.step([StepItem(2, 9, nxt, "last")])[0], plain.step([StepItem(2, 9, nxt, "last")])[0],
                               rtol=0, atol=ROUNDOFF)
  finally:
    jitted.close()
    plain.close()

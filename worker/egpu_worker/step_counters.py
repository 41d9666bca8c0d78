"""Kernels launched and bytes moved by one decode step of the tinygrad worker, LLaMA-3.1-8B shape, on DEV=CPU.

    python -m egpu_worker.step_counters [--json PATH] [--vocab N] [--prompt P] [--kernels]

Why: a batch-1 decode step on the 7900 XTX is bounded by the bytes it moves (the quantized weights, read once)
and, over Thunderbolt, by the number of kernels it launches (issue 19 part 4: at most 5 kernels per layer per
step, from ~16). Both numbers depend only on the model's shapes and types and on how tinygrad schedules the
step, so they can be measured deterministically, without a GPU, from tinygrad's own counters on the CPU device.

What: synthetic GGUF files (random weights, synth.py) of LLaMA-3.1-8B width (n_embd 4096, 32 heads, 8 KV heads,
head_dim 128, n_ff 14336, vocab 128256) with llama.cpp's Q4_K_M type choice: Q4_K for token_embd, attn_q, attn_k,
attn_output, ffn_gate and ffn_up; output Q6_K; attn_v and ffn_down Q6_K in the layers llama.cpp's use_more_bits
picks (16 of the 8B's 32: 0-3, 6, 9, ..., 27, 28-31) and Q4_K in the others. Three models are measured:
  1 layer  and 2 layers  with Q6_K attn_v/ffn_down (what the 8B file's first layers are): their difference is
                         one such layer, and 1 layer minus that is the fixed part (embedding, final norm, head);
  1 layer  with Q4_K attn_v/ffn_down: minus the fixed part, one layer of the other kind.
The 8B step is then fixed + 16 layers of each kind. Each model is loaded with the worker's own loader and the
engine's configuration (as egpud sends it), gets a P-token prefill in each of 8 slots, then decode steps at batch
1 (slot 0) and at batch 8 (all slots) at positions P, P+1, P+2 (the decode TinyJit runs plainly, captures, then
replays) and one measured step at P+3 per batch size, a jit replay, so the step's KV reads cover P+4 positions.
The KV cache holds exactly those P+4 positions: tinygrad's estimate counts the masked loads of the batch's cache
gather (and of the RoPE rows) over the whole buffer, so a longer cache would inflate the batch-8 bytes by up to
the cache's size (measured: +2.4 MB per layer with 256 positions), a counting artifact, not traffic.

How counted: GlobalCounters is reset right before `model.step` and read right after. In tinygrad 0.14 a jit replay
goes through run_linear with update_stats on, so every replayed call is counted (engine/realize.py track_stats):
kernel_count is one per kernel on the CPU, which has no graph runner. On a GPU a captured graph batch counts as
one, so the script also counts the PROGRAM calls in the captured jit (`jit.captured.linear`, graph batches
expanded) and checks the two agree. global_mem and global_ops are tinygrad's estimates from each kernel's loads
and stores (a buffer's re-reads count up to its size), not a hardware measurement. On a GPU with shared memory
the worker realizes the SwiGLU gate in its own kernel (matvec.py), one kernel per layer more than counted here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from importlib.metadata import version

import numpy as np

from . import synth
from .env import default_cache_env
from .gguf import GGML_TYPES
from .quant import Q4_K, Q6_K

SHAPE = synth.SHAPES["llama8b"]
N_LAYER_8B = 32
SLOTS = 8
BATCHES = (1, SLOTS)
WARM_STEPS = 3  # a TinyJit runs plainly, then captures; the third call is already a replay
PEAK_BW = 960e9  # RX 7900 XTX memory bandwidth (AMD's specification)
LAUNCH_COSTS_S = (10e-6, 20e-6)  # assumed per-kernel cost over Thunderbolt; not measured here
ANSI = re.compile(r"\x1b\[[0-9;]*m")
MODELS = (  # (label, layers, attn_v/ffn_down type)
  ("1 layer, Q6_K v/down", 1, Q6_K),
  ("2 layers, Q6_K v/down", 2, Q6_K),
  ("1 layer, Q4_K v/down", 1, Q4_K),
)


def tensor_bytes(ggml_type: int, n: int) -> int:
  _, block_elems, block_bytes = GGML_TYPES[ggml_type]
  return n // block_elems * block_bytes


def write_model(path: str, n_layer: int, more_bits: int, n_vocab: int, seed: int = 0) -> None:
  """synth's llama model with Q4_K_M's types: everything Q4_K from synth.build, then attn_v and ffn_down of every
  layer replaced by `more_bits` matrices and an untied Q6_K output.weight added."""
  cfg = replace(SHAPE, n_layer=n_layer, n_vocab=n_vocab)
  meta, tensors = synth.build(Q4_K, seed, cfg)
  rng = np.random.default_rng(seed + 1)

  def matrix(name: str, ggml_type: int, rows: int, cols: int):
    return (name, ggml_type, (cols, rows), synth.quantized_matrix(rng, ggml_type, rows, cols, cols ** -0.5))

  kv_dim = cfg.n_head_kv * cfg.head_dim
  swap = {f"blk.{il}.{n}.weight": spec for il in range(n_layer)
          for n, spec in (("attn_v", (kv_dim, cfg.n_embd)), ("ffn_down", (cfg.n_embd, cfg.n_ff)))}
  if more_bits != Q4_K: tensors = [matrix(t[0], more_bits, *swap[t[0]]) if t[0] in swap else t for t in tensors]
  tensors.append(matrix("output.weight", Q6_K, cfg.n_vocab, cfg.n_embd))
  synth.write_gguf(path, meta, tensors)


def ideal_bytes(n_vocab: int, batch: int, n_kv: int) -> dict[str, int]:
  """What a step must move at the least, for the 32-layer 8B file: every weight once (16 layers with Q6_K
  attn_v/ffn_down, 16 with Q4_K, norms F32), one token_embd row per batch row, and each row's KV cache: keys and
  values (f16) of n_kv positions read, one position written."""
  e, ff, kv_dim = SHAPE.n_embd, SHAPE.n_ff, SHAPE.n_head_kv * SHAPE.head_dim
  common = sum(tensor_bytes(Q4_K, n) for n in (e * e, kv_dim * e, e * e, ff * e, ff * e)) + 2 * 4 * e
  layer = {t: common + tensor_bytes(t, kv_dim * e) + tensor_bytes(t, e * ff) for t in (Q6_K, Q4_K)}
  weights = N_LAYER_8B // 2 * (layer[Q6_K] + layer[Q4_K]) + tensor_bytes(Q6_K, n_vocab * e) + 4 * e
  return {"weights": weights, "embedding_rows": batch * tensor_bytes(Q4_K, e),
          "kv_cache": N_LAYER_8B * batch * 2 * kv_dim * 2 * (n_kv + 1)}


def jit_kernels(model, batch: int, var_vals: dict[str, int]) -> list[dict]:
  """The kernels of the captured decode jit of `batch` rows, in launch order: name, estimated bytes and the
  model tensors each reads (graph batches, which GPUs have, expanded)."""
  from tinygrad.engine.realize import estimate_uop
  from tinygrad.uop.ops import Ops, sym_infer
  names = {t.uop.base: n.removesuffix(".weight") for n, t in model.bufs.items()}
  out, calls = [], list(model._decode_jits[(batch, False)].captured.linear.src)  # the 8B shape has no window
  while calls:
    call = calls.pop(0)
    ast = call.src[0]
    if ast.op is Ops.CUSTOM_FUNCTION and ast.arg == "graph":
      calls[:0] = ast.src[0].src
      continue
    if ast.op is not Ops.PROGRAM: continue
    reads = [names[a.base] for a in call.src[1:] if not a.is_bound_var and a.base in names]
    out.append({"name": ANSI.sub("", ast.arg.name), "bytes": int(sym_infer(estimate_uop(call).mem, var_vals)),
                "tensors": list(dict.fromkeys(reads))})
  return out


def measure(path: str, prompt: int, ctx: int) -> tuple[dict[int, dict], dict[int, list[dict]]]:
  """Per batch size the counters of one replayed decode step and the kernels of its jit."""
  from tinygrad import Device, GlobalCounters
  from .model import StepItem, load_model
  model = load_model(path, ctx=ctx, slots=SLOTS)
  try:
    vocab = model.cfg.n_vocab
    tok = lambda i: (7919 * i + 13) % vocab
    for s in range(SLOTS): model.step([StepItem(s, 0, [tok(s * prompt + i) for i in range(prompt)], "none")])
    res, kernels = {}, {}
    for B in BATCHES:
      for k in range(WARM_STEPS + 1):
        pos = prompt + k
        items = [StepItem(s, pos, [tok(100 * s + pos)], "last") for s in range(B)]
        Device[model.device].synchronize()
        GlobalCounters.reset()
        model.step(items)
      res[B] = {"kernels": GlobalCounters.kernel_count, "bytes": GlobalCounters.global_mem, "ops": GlobalCounters.global_ops}
      var_vals = {"max_pos": pos, **{f"{v}{s}": x for s in range(B) for v, x in (("tok", tok(100 * s + pos)), ("slot", s), ("pos", pos))}}
      kernels[B] = jit_kernels(model, B, var_vals)
      res[B]["jit_kernels"] = len(kernels[B])
    return res, kernels
  finally:
    model.close()


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m egpu_worker.step_counters", description=__doc__.strip().splitlines()[0])
  ap.add_argument("--vocab", type=int, default=SHAPE.n_vocab,
                  help=f"vocabulary size (default {SHAPE.n_vocab}, LLaMA 3's; smaller only shrinks the fixed part)")
  ap.add_argument("--prompt", type=int, default=4, help="tokens prefilled per slot before the decode steps")
  ap.add_argument("--kernels", action="store_true", help="also list the kernels of the 2-layer steps")
  ap.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
  args = ap.parse_args(argv)
  if args.prompt < 1: ap.error("--prompt must be at least 1")
  if args.vocab < 257: ap.error("--vocab must be at least 257 (synth's byte-level tokenizer)")
  os.environ.setdefault("DEV", "CPU")
  default_cache_env()
  from tinygrad import Device

  t_start = time.perf_counter()
  n_kv = args.prompt + WARM_STEPS + 1
  rows, listing = [], {}
  with tempfile.TemporaryDirectory(prefix="egpu-step-counters-") as tmp:
    for label, n_layer, more_bits in MODELS:
      t0 = time.perf_counter()
      path = os.path.join(tmp, "m.gguf")
      write_model(path, n_layer, more_bits, args.vocab)
      res, kernels = measure(path, args.prompt, ctx=n_kv)
      os.remove(path)
      for B, r in res.items():
        if r["kernels"] != r["jit_kernels"]:
          print(f"note: {label}, batch {B}: GlobalCounters counted {r['kernels']} kernels, the captured jit has "
                f"{r['jit_kernels']}", file=sys.stderr)
        rows.append({"model": label, "layers": n_layer, "v_down": GGML_TYPES[more_bits][0], "batch": B, **r})
      if n_layer == 2: listing = kernels
      print(f"{label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

  print(f"device {Device.DEFAULT}, tinygrad {version('tinygrad')}; LLaMA-3.1-8B shape, vocab {args.vocab}, Q4_K_M types; "
        f"prompt {args.prompt}, measured step at position {n_kv - 1} (a jit replay)\n")
  print(f"{'model':24} {'batch':>5} {'kernels':>8} {'in jit':>7} {'MB/step':>9} {'GFLOP/step':>11}")
  for r in rows:
    print(f"{r['model']:24} {r['batch']:>5} {r['kernels']:>8} {r['jit_kernels']:>7} {r['bytes'] / 1e6:>9.2f} {r['ops'] / 1e9:>11.3f}")

  derived = {}
  for B in BATCHES:
    m = {(r["layers"], r["v_down"]): r for r in rows if r["batch"] == B}
    one, two, other = m[(1, "Q6_K")], m[(2, "Q6_K")], m[(1, "Q4_K")]
    d = {}
    for key in ("kernels", "bytes", "ops"):
      layer6 = two[key] - one[key]
      fixed = one[key] - layer6
      layer4 = other[key] - fixed
      d[key] = {"per_layer_q6k_v_down": layer6, "per_layer_q4k_v_down": layer4, "fixed": fixed,
                "total_32_layers": fixed + N_LAYER_8B // 2 * (layer6 + layer4)}
    ideal = ideal_bytes(args.vocab, B, n_kv)
    total_bytes, total_kernels, ideal_total = d["bytes"]["total_32_layers"], d["kernels"]["total_32_layers"], sum(ideal.values())
    t_bw = total_bytes / PEAK_BW
    d["ideal_bytes"] = {**ideal, "total": ideal_total}
    d["xtx_tok_s"] = {"bandwidth_only": B / t_bw, "ideal_bytes_bandwidth_only": B / (ideal_total / PEAK_BW),
                      **{f"launch_{c * 1e6:.0f}us": B / (t_bw + total_kernels * c) for c in LAUNCH_COSTS_S}}
    derived[B] = d
    k, b = d["kernels"], d["bytes"]
    print(f"\nbatch {B}:")
    print(f"  kernels: {k['per_layer_q6k_v_down']} per layer (Q6_K v/down), {k['per_layer_q4k_v_down']} per layer (Q4_K v/down), "
          f"{k['fixed']} fixed -> {total_kernels} per step for 32 layers")
    print(f"  bytes:   {b['per_layer_q6k_v_down'] / 1e6:.2f} MB per layer (Q6_K v/down), {b['per_layer_q4k_v_down'] / 1e6:.2f} MB "
          f"per layer (Q4_K v/down), {b['fixed'] / 1e6:.2f} MB fixed -> {total_bytes / 1e6:.1f} MB per step for 32 layers")
    print(f"  ideal:   {ideal_total / 1e6:.1f} MB per step (weights {ideal['weights'] / 1e6:.1f}, embedding rows "
          f"{ideal['embedding_rows'] / 1e3:.1f} kB, KV cache {ideal['kv_cache'] / 1e3:.1f} kB); counted/ideal {total_bytes / ideal_total:.3f}")
    x = d["xtx_tok_s"]
    print(f"  7900 XTX at {PEAK_BW / 1e9:.0f} GB/s, upper bound from bytes alone (no launch cost): {x['bandwidth_only']:.1f} tok/s "
          f"({x['ideal_bytes_bandwidth_only']:.1f} with the ideal bytes)" + (" aggregate" if B > 1 else ""))
    print("  with an assumed launch cost per kernel (not measured): "
          + ", ".join(f"{c * 1e6:.0f} us -> {x[f'launch_{c * 1e6:.0f}us']:.1f} tok/s" for c in LAUNCH_COSTS_S))

  if args.kernels:
    for B, ks in listing.items():
      print(f"\nkernels of the 2-layer batch-{B} step ({len(ks)}), in launch order: estimated MB, name, tensors read")
      for i, kn in enumerate(ks):
        print(f"  {i:3d} {kn['bytes'] / 1e6:9.3f}  {kn['name']:44} {', '.join(kn['tensors'])}")
  elapsed = time.perf_counter() - t_start
  print(f"\n{elapsed:.0f} s", file=sys.stderr)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": Device.DEFAULT, "tinygrad": version("tinygrad"), "vocab": args.vocab, "prompt": args.prompt,
                 "measured_position": n_kv - 1, "peak_bandwidth": PEAK_BW, "assumed_launch_costs_s": list(LAUNCH_COSTS_S),
                 "measured": rows, "derived": {str(B): d for B, d in derived.items()}, "kernels_2_layers": {str(B): ks for B, ks in listing.items()},
                 "seconds": elapsed}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())

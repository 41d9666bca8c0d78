#!/usr/bin/env python3
"""What the tinygrad worker's steps move and cost at long contexts, on a model with sliding-window layers.

    scripts/setup-worker.sh
    worker/.venv/bin/python bench/window_bytes.py [--model models/gemma-3-270m-q4_k_m.gguf] [--positions 256 2048 8192] [--chunk 64]

Why: Gemma 3 attends globally on one layer in six and over a window (512 keys for the 270M and 1B, 1024 for 4B,
12B and 27B) on the other five. A step that reads every cached key on every layer moves, at long contexts, far more KV
cache than the window needs, and on a GPU a decode step is bound by the bytes it moves (issue 19 part 4).

What: for each position P, the model is loaded with a cache of about P + the chunk positions (so that tinygrad's
estimate, which counts a cache gather's masked loads over the whole buffer, stays close to what the step reads),
every slot is marked as holding P tokens, and decode steps at P, P+1, ... run at batch 1 and 2 (the TinyJit runs
plainly, captures, then replays); then a prompt chunk of --chunk tokens at P, likewise. Printed per step: kernels,
tinygrad's estimate of the bytes the step moves and of its FLOPs (GlobalCounters, reset right before the step),
and the median wall time of `--reps` replayed steps on the device (DEV, CPU by default). Beside them, the KV
cache bytes of an ideal step: every global layer reads all P + T positions, every local one only the keys its
queries' windows hold (min(P + T, window + T - 1) for T queries).

The cache holds zeros, not a real prompt's keys: a prefill of thousands of tokens takes minutes on DEV=CPU, and
neither the counters nor the step's time depend on the cached values. The logits are not looked at here; the
worker's tests check the windowed reads against references (test_model_gemma3.py).

Run it at two commits (a `git worktree` of the older one, PYTHONPATH pointing at its worker/) to compare.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if not any(Path(p).resolve() == (REPO / "worker").resolve() for p in sys.path if p):
  sys.path.append(str(REPO / "worker"))  # PYTHONPATH (another checkout's worker) comes first
WARM_STEPS = 3  # a TinyJit runs plainly, then captures; the third call is already a replay
BATCHES = (1, 2)


def measure(path: str, position: int, reps: int, chunk: int) -> list[dict]:
  from tinygrad import Device, GlobalCounters
  from egpu_worker.model import StepItem, load_model
  model = load_model(path, ctx=position + max(WARM_STEPS + reps + 2, chunk), slots=max(BATCHES))
  try:
    cfg = model.cfg
    vocab = cfg.n_vocab
    tok = lambda i: (7919 * i + 13) % vocab
    out = []
    for B in BATCHES:
      for s in range(B): model.lengths[s] = position  # see the module's doc: zeros stand for a prompt of P tokens
      times, counters = [], None
      for k in range(WARM_STEPS + reps):
        pos = position + k
        items = [StepItem(s, pos, [tok(100 * s + pos)], "last") for s in range(B)]
        Device[model.device].synchronize()
        GlobalCounters.reset()
        t0 = time.perf_counter()
        model.step(items)  # returns numpy logits: the step has finished
        dt = time.perf_counter() - t0
        if k == WARM_STEPS: counters = (GlobalCounters.kernel_count, GlobalCounters.global_mem, GlobalCounters.global_ops)
        if k >= WARM_STEPS: times.append(dt)
      local = sum(cfg.swa_layers) if cfg.sliding_window else 0
      n_kv = position + WARM_STEPS + 1
      kv_pos = (cfg.n_layer - local) * n_kv + local * min(n_kv, cfg.sliding_window or n_kv)
      ideal_kv = B * kv_pos * 2 * cfg.n_head_kv * cfg.head_dim * 2
      out.append({"step": f"decode, batch {B}", "kernels": counters[0], "bytes": counters[1], "ops": counters[2],
                  "ms": 1e3 * statistics.median(times), "ideal_kv_bytes": ideal_kv})
    if chunk:
      # a prompt's chunk of `chunk` tokens at `position` (its own jitted pass: plain, captured, then replays)
      times = []
      for k in range(WARM_STEPS + reps):
        model.lengths[0] = position
        Device[model.device].synchronize()
        GlobalCounters.reset()
        t0 = time.perf_counter()
        model.step([StepItem(0, position, [tok(position + k + i) for i in range(chunk)], "last")])
        if k == WARM_STEPS: counters = (GlobalCounters.kernel_count, GlobalCounters.global_mem, GlobalCounters.global_ops)
        if k >= WARM_STEPS: times.append(time.perf_counter() - t0)
      n_kv = position + chunk
      kv_pos = (cfg.n_layer - local) * n_kv + local * min(n_kv, (cfg.sliding_window or n_kv) + chunk - 1)
      out.append({"step": f"prompt chunk of {chunk}", "kernels": counters[0], "bytes": counters[1], "ops": counters[2],
                  "ms": 1e3 * statistics.median(times), "ideal_kv_bytes": kv_pos * 2 * cfg.n_head_kv * cfg.head_dim * 2})
    return out
  finally:
    model.close()


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  ap.add_argument("--model", default=str(REPO / "models" / "gemma-3-270m-q4_k_m.gguf"))
  ap.add_argument("--positions", type=int, nargs="+", default=[256, 2048, 8192])
  ap.add_argument("--reps", type=int, default=5, help="replayed steps timed per batch size (median)")
  ap.add_argument("--chunk", type=int, default=64, help="also time a prompt chunk of this many tokens (0: no)")
  args = ap.parse_args(argv)
  if args.reps < 1: ap.error("--reps must be at least 1")
  # one pass of exactly the chunk's length: a prefill bucket (the worker splits other lengths into several passes)
  if args.chunk and (args.chunk & (args.chunk - 1) or args.chunk > 512): ap.error("--chunk must be 0 or a power of two up to 512")
  if not Path(args.model).is_file(): ap.error(f"{args.model}: no such file (scripts/fetch-models.sh fetches it)")
  os.environ.setdefault("DEV", "CPU")
  from egpu_worker.env import default_cache_env
  default_cache_env()
  from egpu_worker import model as model_module
  from tinygrad import Device
  print(f"device {Device.DEFAULT}; {Path(args.model).name}; worker {Path(model_module.__file__).parent}")
  print("| position | step | kernels | MB/step (tinygrad) | KV MB/step (ideal) | GFLOP/step | ms/step |")
  print("|---|---|---|---|---|---|---|")
  for p in args.positions:
    for r in measure(args.model, p, args.reps, args.chunk):
      print(f"| {p} | {r['step']} | {r['kernels']} | {r['bytes'] / 1e6:.1f} | {r['ideal_kv_bytes'] / 1e6:.1f} | "
            f"{r['ops'] / 1e9:.3f} | {r['ms']:.1f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

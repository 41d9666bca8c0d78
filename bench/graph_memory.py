#!/usr/bin/env python3
"""How much device memory the tinygrad worker's captured graphs hold, beside a model's weights and caches.

    scripts/setup-worker.sh
    worker/.venv/bin/python bench/graph_memory.py [--model models/gemma-3-270m-q4_k_m.gguf] [--ctx 2048] [--slots 4]
        [--chunk 128]

Why: every decode batch size and every prompt bucket gets a TinyJit of its own, and a captured jit keeps its
activation buffers for as long as the model is loaded; a model with a sliding window keeps a second, windowed
graph per batch size and bucket once its contexts pass the window. egpud counts what a model holds against the
device's budget: the worker reports `Model.memory_bytes()` (weights, caches and `graph_bytes`) after every step.

What: loads the model on DEV (CPU by default), then runs, each three times (a jit's plain run, its capture and a
replay), what a server meets: a prompt chunk of --chunk tokens (egpud's --batch-tokens, the largest bucket it
sends), decode steps at every batch size 1..--slots, the smaller prompt buckets from 2, and, for a model with a sliding
window, the same again past the window. Printed after each: the model's bytes and what the graphs add. The cache
holds whatever the steps wrote; nothing here looks at the logits (the worker's tests do).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if not any(Path(p).resolve() == (REPO / "worker").resolve() for p in sys.path if p):
  sys.path.append(str(REPO / "worker"))
RUNS = 3  # plain, captured, replayed


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default=str(REPO / "models" / "gemma-3-270m-q4_k_m.gguf"))
  ap.add_argument("--ctx", type=int, default=2048)
  ap.add_argument("--slots", type=int, default=4)
  ap.add_argument("--chunk", type=int, default=128, help="the largest prompt bucket sent (egpud's --batch-tokens)")
  args = ap.parse_args()
  from egpu_worker.model import PREFILL_BUCKETS, StepItem, load_model
  if args.chunk not in PREFILL_BUCKETS or args.slots < 1:
    ap.error(f"--chunk must be one of {PREFILL_BUCKETS}, --slots at least 1")
  model = load_model(args.model, ctx=args.ctx, slots=args.slots)
  try:
    cfg = model.cfg
    window = cfg.sliding_window or 0
    at_load = model.memory_bytes()
    print(f"{Path(args.model).name}: ctx {args.ctx}, {args.slots} slots, device {model.device}")
    print(f"{'after':44s} {'model MiB':>10s} {'graphs MiB':>11s}")
    print(f"{'load':44s} {at_load / 2**20:10.1f} {model.graph_bytes / 2**20:11.1f}")
    tok = lambda i: (7919 * i + 13) % cfg.n_vocab

    def report(what: str) -> None:
      print(f"{what:44s} {model.memory_bytes() / 2**20:10.1f} {model.graph_bytes / 2**20:11.1f}", flush=True)

    def chunks(start: int, sizes: list[int], label: str) -> None:
      for R in sizes:
        for k in range(RUNS):
          model.lengths[0] = start
          model.step([StepItem(0, start, [tok(start + k + i) for i in range(R)], "last")])
        report(f"{label}prompt bucket {R} at {start}")

    def decode(start: int, label: str) -> None:
      for B in range(1, args.slots + 1):
        for s in range(B): model.lengths[s] = start
        for k in range(RUNS):
          model.step([StepItem(s, model.lengths[s], [tok(100 * s + k)], "last") for s in range(B)])
        report(f"{label}decode, batch {B}, from {start}")

    smaller = [b for b in PREFILL_BUCKETS if 1 < b < args.chunk]  # a one-token item is a decode step
    chunks(0, [args.chunk], "")
    decode(args.chunk, "")
    chunks(0, smaller, "")
    past = window + 8
    if window and past + args.chunk + RUNS <= args.ctx:
      chunks(past, [args.chunk], "windowed ")
      decode(past, "windowed ")
      chunks(past, smaller, "windowed ")
    print(f"graphs: {model.graph_bytes / 2**20:.1f} MiB, {100 * model.graph_bytes / at_load:.1f}% of the load's "
          f"{at_load / 2**20:.1f} MiB")
  finally:
    model.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Greedy continuation of token ids, with timings, through the multi-slot step API.

  python -m egpu_worker.generate MODEL.gguf --ids 504,3575,282,4649,314 -n 16 [--batch 4]

With --batch B, B copies of the prompt are prefilled into slots 0..B-1 and decoded together, one batched
(jitted) step per token; the aggregate tok/s counts the tokens of all rows.
The device comes from the environment (DEV=CPU, DEV=AMD, DEV=CUDA, ...; tinygrad's default otherwise).
"""
from __future__ import annotations

import argparse
import sys
import time

from .env import default_cache_env


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m egpu_worker.generate", description=__doc__.strip().splitlines()[0])
  ap.add_argument("model", help="GGUF file")
  ap.add_argument("--ids", required=True, help="comma-separated prompt token ids (no BOS is added)")
  ap.add_argument("-n", type=int, default=16, help="new tokens to generate per sequence")
  ap.add_argument("--ctx", type=int, default=512, help="KV cache length in tokens (per slot)")
  ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (copies of the prompt)")
  args = ap.parse_args(argv)
  ids = [int(x) for x in args.ids.split(",") if x.strip()]
  if args.n < 1: ap.error("-n must be at least 1")
  if args.batch < 1: ap.error("--batch must be at least 1")
  if not ids: ap.error("--ids is empty")
  B = args.batch

  default_cache_env()
  from tinygrad import Device, GlobalCounters
  from .model import StepItem, load_model

  t0 = time.perf_counter()
  model = load_model(args.model, ctx=args.ctx, slots=B)
  Device[model.device].synchronize()
  t_load = time.perf_counter() - t0

  first, t_prefills = [], []
  for b in range(B):  # one prefill per slot: the first runs plainly, the second is captured, later ones replay
    t0 = time.perf_counter()
    first.append(model.step([StepItem(b, 0, ids, "last")])[0])
    t_prefills.append(time.perf_counter() - t0)
  toks = [[int(lg.argmax())] for lg in first]
  pos = len(ids)
  stamps, kernels = [], 0
  t0 = time.perf_counter()
  for i in range(args.n - 1):
    GlobalCounters.reset()
    out = model.step([StepItem(b, pos, [toks[b][-1]], "last") for b in range(B)])  # one batched decode step
    kernels = GlobalCounters.kernel_count
    for b, lg in enumerate(out): toks[b].append(int(lg.argmax()))
    pos += 1
    stamps.append(time.perf_counter() - t0)
  print(",".join(map(str, toks[0])))
  if any(t != toks[0] for t in toks[1:]): print("warning: the batch rows generated different tokens", file=sys.stderr)
  print(f"device {model.device}  load {t_load:.2f} s ({model.memory_bytes() / 2**20:.1f} MiB)  prompt {len(ids)} tokens x {B}  "
        f"prefill per slot {', '.join(f'{t * 1e3:.0f}' for t in t_prefills)} ms "
        f"(the first includes kernel compiles on a cold cache; replays from the third)", file=sys.stderr)
  # decode steps 1 and 2 run and capture the jit; replay starts at step 3
  if len(stamps) > 3:
    steady = stamps[2:]
    steps = len(steady) - 1
    dt = steady[-1] - steady[0]
    print(f"decode: {len(stamps)} steps of batch {B} in {stamps[-1]:.2f} s; jit replay {steps / dt:.2f} steps/s, "
          f"aggregate {B * steps / dt:.2f} tok/s ({1e3 * dt / steps:.1f} ms/step over {steps} steps, "
          f"{kernels} kernels/step)", file=sys.stderr)
  model.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Greedy continuation of token ids, with timings.

  python -m egpu_worker.generate MODEL.gguf --ids 504,3575,282,4649,314 -n 16

The device comes from the environment (DEV=CPU, DEV=AMD, DEV=CUDA, ...; tinygrad's default otherwise).
"""
from __future__ import annotations

import argparse
import sys
import time

from .env import default_cache_env


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m egpu_worker.generate", description=__doc__.strip().splitlines()[0])
  ap.add_argument("model", help="GGUF file (llama architecture; F32/F16/Q4_0/Q4_1/Q8_0 tensors)")
  ap.add_argument("--ids", required=True, help="comma-separated prompt token ids (no BOS is added)")
  ap.add_argument("-n", type=int, default=16, help="new tokens to generate")
  ap.add_argument("--ctx", type=int, default=512, help="KV cache length in tokens")
  args = ap.parse_args(argv)
  ids = [int(x) for x in args.ids.split(",") if x.strip()]
  if args.n < 1: ap.error("-n must be at least 1")

  default_cache_env()
  from tinygrad import Device
  from .model import Llama

  t0 = time.perf_counter()
  model = Llama(args.model, max_ctx=args.ctx)
  Device[model.device].synchronize()
  t_load = time.perf_counter() - t0

  out, stamps = [], []
  t0 = time.perf_counter()
  for tok in model.generate(ids, args.n):
    out.append(tok)
    stamps.append(time.perf_counter() - t0)
  print(",".join(map(str, out)))
  print(f"device {model.device}  load {t_load:.2f} s  prompt {len(ids)} tokens  first token {stamps[0]*1e3:.0f} ms "
        f"(prefill, not jitted; includes kernel compiles on a cold cache)", file=sys.stderr)
  # decode steps 1 and 2 run and capture the jit; replay starts at step 3
  if len(stamps) > 4:
    steady = stamps[3:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    print(f"decode: {len(stamps)-1} steps in {stamps[-1]-stamps[0]:.2f} s; jit replay {rate:.2f} tok/s "
          f"({1e3/rate:.1f} ms/token over {len(steady)-1} steps)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

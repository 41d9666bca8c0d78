#!/usr/bin/env python3
"""Time the worker's dequantizing mat-vec kernels under several launch layouts (egpu_worker.matvec).

For each layout (and for "off", tinygrad's own choice, and optionally "beam", tinygrad's BEAM=2 search) a fresh
process builds the projections of two real models' shapes -- SmolLM2-135M (Q4_1, tied Q8_0 head) and
LLaMA-3.1-8B (Q4_K, Q6_K head) -- from uninitialised device memory, runs L copies of each in one TinyJit (so
launch overhead is amortised as it is in a decode step), and reports microseconds per mat-vec and the weight
bytes read per second. A fresh process per layout because tinygrad caches compiled programs per kernel.

  DEV=CUDA worker/.venv/bin/python bench/matvec_sweep.py [--layouts t8,u4,b4,l4,r1 ...] [--beam] [--json out.json]

Prints one line per (layout, shape) and, per shape, the layouts ranked; the last line names the layout with
the best geometric mean over the shapes ("best: ...").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))

# (label, ggml type name, rows N, cols K, batch rows B)
SHAPES = [
  ("smol q/o", "Q4_1", 576, 576, 1), ("smol up", "Q4_1", 1536, 576, 1), ("smol down", "Q4_1", 576, 1536, 1),
  ("smol head", "Q8_0", 49152, 576, 1),
  ("8b q/o", "Q4_K", 4096, 4096, 1), ("8b up", "Q4_K", 14336, 4096, 1), ("8b down", "Q4_K", 4096, 14336, 1),
  ("8b head", "Q6_K", 128256, 4096, 1), ("8b up b4", "Q4_K", 14336, 4096, 4),
]
CANDIDATES = ["t8,u4,b4,l4,r1", "t8,u4,b2,l4,r1", "t16,u2,b2,l4,r1", "t8,u4,b8,l1,r1", "t8,u4,b4,l2,r2",
              "t4,u8,b8,l4,r1", "t16,u2,b1,l8,r1", "t8,u4,b16,l1,r1"]
TARGET_BYTES = 256 << 20  # weights per timed call, so one call is well above launch overhead


def time_one_layout(reps: int, only: str) -> list[dict]:
  """In this process (EGPU_MATVEC / BEAM already set): time every shape."""
  from tinygrad import Device, Tensor, TinyJit, dtypes
  from egpu_worker import matvec
  from egpu_worker.gguf import GGML_TYPES
  from egpu_worker.quant import dequantize
  matvec.install()
  by_name = {v[0]: k for k, v in GGML_TYPES.items()}
  results = []
  for label, tname, n, k, b in (s for s in SHAPES if only in s[0]):
    ggml_type = by_name[tname]
    _, block_elems, block_bytes = GGML_TYPES[ggml_type]
    nbytes = n * k // block_elems * block_bytes
    copies = max(1, min(64, TARGET_BYTES // nbytes))
    weights = [Tensor.empty(nbytes, dtype=dtypes.uint8).realize() for _ in range(copies)]
    x = Tensor.empty(b, k, dtype=dtypes.float32).realize()

    @TinyJit
    def run(x):
      return [x.matmul(dequantize(w, ggml_type, (n, k)).T).realize() for w in weights]

    t0 = time.perf_counter()
    for _ in range(3): run(x)
    Device[Device.DEFAULT].synchronize()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps): run(x)
    Device[Device.DEFAULT].synchronize()
    us = (time.perf_counter() - t0) / (reps * copies) * 1e6
    results.append({"shape": label, "type": tname, "n": n, "k": k, "b": b, "us": round(us, 2),
                    "gbps": round(nbytes / us / 1e3, 1), "copies": copies, "warm_s": round(compile_s, 2)})
    print(json.dumps(results[-1]), flush=True)
    del weights, run
  return results


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--layouts", nargs="*", default=CANDIDATES)
  ap.add_argument("--beam", action="store_true", help="also time tinygrad's BEAM=2 search (slow to compile)")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--timeout", type=float, default=120, help="seconds per layout")
  ap.add_argument("--shapes", default="", help="only shapes whose label contains this (e.g. smol, 8b)")
  ap.add_argument("--json", help="write every measurement here")
  ap.add_argument("--one", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.one is not None:
    time_one_layout(args.reps, args.shapes)
    return
  runs = ["off", *args.layouts] + (["beam"] if args.beam else [])
  table: dict[str, dict[str, dict]] = {}
  for layout in runs:
    env = dict(os.environ, EGPU_MATVEC="off" if layout == "beam" else layout)
    if layout == "beam": env["BEAM"] = "2"
    print(f"== {layout}", flush=True)
    try:
      out = subprocess.run([sys.executable, __file__, "--one", layout, "--reps", str(args.reps),
                                                     "--shapes", args.shapes], env=env, text=True,
                           capture_output=True, timeout=args.timeout).stdout
    except subprocess.TimeoutExpired as e:
      out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      print(f"   (timed out after {args.timeout:.0f} s)")
    for line in out.splitlines():
      if line.startswith("{"):
        r = json.loads(line)
        table.setdefault(layout, {})[r["shape"]] = r
        print(f"   {r['shape']:<12} {r['type']:<5} {r['n']:>6}x{r['k']:<6} B={r['b']}  {r['us']:>9.1f} us  {r['gbps']:>7.1f} GB/s")
  shapes = [s[0] for s in SHAPES if args.shapes in s[0]]
  print("\n== per shape, fastest first (us per mat-vec)")
  for s in shapes:
    ranked = sorted((t[s]["us"], lay) for lay, t in table.items() if s in t)
    print(f"   {s:<12} " + "  ".join(f"{lay}={us:.1f}" for us, lay in ranked[:5]))
  complete = {lay: t for lay, t in table.items() if all(s in t for s in shapes)}
  if "off" in complete:
    print("\n== geometric-mean speedup over tinygrad's own choice (off)")
    gm = {lay: math.exp(sum(math.log(complete["off"][s]["us"] / t[s]["us"]) for s in shapes) / len(shapes))
          for lay, t in complete.items()}
    for lay, g in sorted(gm.items(), key=lambda kv: -kv[1]): print(f"   {lay:<18} {g:6.2f}x")
    best = max((lay for lay in gm if lay not in ("off", "beam")), key=gm.get, default="off")
    print(f"best: {best}")
  if args.json: Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
  main()

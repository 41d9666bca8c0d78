"""Time and device memory of the tinygrad worker's jitted prefill, bucket by bucket.

  DEV=CPU PYTHONPATH=worker worker/.venv/bin/python bench/prefill_jit_memory.py models/SmolLM2-135M-Instruct.Q4_1.gguf

Runs prompts of three lengths in each of the buckets 8, 64 and 512 (the first pass of a bucket runs plainly,
the second is captured, the third replays) and prints each pass's time and tinygrad's allocated bytes after it,
so the memory each captured bucket keeps shows as the step after its second pass.
"""
import sys
import time

from tinygrad import GlobalCounters

from egpu_worker.model import StepItem, load_model


def main() -> None:
  model = load_model(sys.argv[1], ctx=1024, slots=1)
  print(f"after load: {GlobalCounters.mem_used / 2**20:.1f} MiB allocated")
  for n in (5, 6, 7, 60, 61, 62, 300, 301, 302):
    t0 = time.perf_counter()
    model.step([StepItem(0, 0, list(range(1, n + 1)), "last")])
    print(f"{n:>3} tokens: {time.perf_counter() - t0:6.2f} s, {GlobalCounters.mem_used / 2**20:.1f} MiB allocated", flush=True)


if __name__ == "__main__":
  main()

"""Marian translation: egpu's CPU engine against transformers (PyTorch, CPU) on the same folder, the
same sentences and the same decoding (beams, length), in the same run. llama.cpp has no Marian
architecture, so transformers — the reference implementation — is the yardstick here.

  /work/venv-ref/bin/python bench/bench_marian.py FOLDER [--threads 2] [--beams 4] [--max-tokens 64]

FOLDER: bench/make_hf_marian.py's output (or a real opus-mt folder). Builds the release example
`translate_bench` first. Prints sentences/s and output tokens/s for egpu (f32 and q8_0) and
transformers, with the ratios, egpu's conversion time, and memory: egpu's resident set after the
runs and its peak (which includes the conversion's buffer); for transformers the process peak
(ru_maxrss, PyTorch's own libraries included).
"""
import argparse
import json
import os
import resource
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = (ROOT / "bench" / "data" / "marian-sentences.txt").read_text(encoding="utf-8").splitlines()


def egpu(folder: str, args, quantize: str) -> dict:
  target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
  exe = Path(target) / "release" / "examples" / "translate_bench"
  cmd = [str(exe), folder, "--threads", str(args.threads), "--beams", str(args.beams),
         "--max-tokens", str(args.max_tokens), "--reps", str(args.reps), "--quantize", quantize,
         "--sentences", str(ROOT / "bench" / "data" / "marian-sentences.txt")]
  return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def transformers_run(folder: str, args) -> dict:
  import torch
  import transformers as tf
  torch.set_num_threads(args.threads)
  tok = tf.MarianTokenizer.from_pretrained(folder)
  model = tf.MarianMTModel.from_pretrained(folder).eval()
  batch = tok(SENTENCES, return_tensors="pt", padding=True)
  best, tokens = float("inf"), 0
  with torch.no_grad():
    for rep in range(args.reps + 1):
      start = time.perf_counter()
      out = model.generate(**batch, num_beams=args.beams, max_length=args.max_tokens + 1, do_sample=False)
      seconds = time.perf_counter() - start
      tokens = int((out[:, 1:] != model.config.pad_token_id).sum())
      if rep > 0:
        best = min(best, seconds)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"seconds": best, "sentences_per_s": len(SENTENCES) / best, "output_tokens": tokens,
          "output_tokens_per_s": tokens / best, "rss_bytes": rss, "peak_rss_bytes": rss}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("folder")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--beams", type=int, default=4)
  ap.add_argument("--max-tokens", type=int, default=64)
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  subprocess.run(["cargo", "build", "--release", "-q", "-p", "egpu-engine", "--example", "translate_bench"],
                 check=True, cwd=ROOT)
  results = {"egpu f32": egpu(args.folder, args, "f32"), "egpu q8_0": egpu(args.folder, args, "q8_0"),
             "transformers f32": transformers_run(args.folder, args)}
  ref = results["transformers f32"]["sentences_per_s"]
  print(f"{len(SENTENCES)} sentences, {args.beams} beams, up to {args.max_tokens} tokens, {args.threads} threads")
  print("| engine | sentences/s | output tok/s | ratio vs transformers | RSS after MB | peak RSS MB | convert s |")
  print("|---|---|---|---|---|---|---|")
  for name, r in results.items():
    convert = f"{r['convert_s']:.2f}" if "convert_s" in r else "-"
    print(f"| {name} | {r['sentences_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
          f"{r['sentences_per_s'] / ref:.2f} | {r['rss_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / 1e6:.0f} | {convert} |")


if __name__ == "__main__":
  main()

"""Side-by-side speed of egpu's CPU engine and llama.cpp on the same GGUF, in one run.

For each model and thread count it alternates the two engines `--reps` times and reports the
median tokens/s for prefill (a `--prompt`-token prompt, default 512) and decode (`--gen` tokens,
default 128, one token per step as in llama-bench's tg test), and egpu's ratio to llama.cpp.

llama.cpp runs in this process through llama-cpp-python (PyPI, which builds llama.cpp from
source for this CPU); egpu runs as `target/release/examples/egpu_bench` (a subprocess that
prints JSON). Both read the same file and use the same thread count. Decode follows the prompt
(positions prompt..prompt+gen).

With `--llama-bench PATH` llama.cpp runs as its own `llama-bench` tool instead (built from the
same llama.cpp source by `bench/build-llama-bench.sh`), with `-r 1` per repetition, and both
engines decode from an empty context, as llama-bench's `tg` test does: the method behind the
reference figures in issue 3.

    python -m venv .venv && .venv/bin/pip install llama-cpp-python==0.3.36
    cargo build --release -p egpu-engine --example egpu_bench
    .venv/bin/python bench/bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 1 2

With `--kernels avx512 avx2` egpu runs once per kernel path in every repetition (a column each,
and which prefill tile kernel each path chose), so both paths and llama.cpp share one run.
Add `--llama-bench-avx2 PATH` (a llama-bench built by `LLAMA_CPU=avx2 bench/build-llama-cpp.sh`,
for a machine without AVX-512) and the avx2 column gets a second ratio, against that build in the
same repetitions: how the two engines compare on an AVX2-only machine, which a machine with
AVX-512 can only imitate (same cores, caches and clocks; no AVX-512 on either side).

Prints a Markdown table for BENCHMARKS.md. Speed is measured here, never asserted in tests.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def llamacpp_run(model: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(
        model_path=model,
        n_ctx=n_prompt + n_gen + 16,
        n_batch=n_prompt,
        n_ubatch=n_prompt,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )
    # Token ids 100.. as a synthetic prompt, like llama-bench (the text does not change speed).
    prompt = [100 + (i * 7919) % 1000 for i in range(n_prompt)]
    llm.reset()
    llm.eval(prompt[:8])  # warm-up: first-touch page faults and thread start-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = 100
    t2 = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([tok])
    t3 = time.perf_counter()
    llm.close()
    return {"prefill_tok_s": n_prompt / (t1 - t0), "decode_tok_s": n_gen / (t3 - t2)}


def llama_bench_run(tool: str, model: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    out = subprocess.run(
        [tool, "-m", model, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
         "-r", "1", "-o", "json"],
        check=True, capture_output=True, text=True,
    )
    result = {}
    for test in json.loads(out.stdout):
        key = "prefill_tok_s" if test["n_prompt"] > 0 else "decode_tok_s"
        result[key] = test["avg_ts"]
    return result


def egpu_run(binary: Path, model: str, threads: int, n_prompt: int, n_gen: int,
             decode_from_empty: bool, kernels: str | None = None) -> dict:
    cmd = [str(binary), "--model", model, "--threads", str(threads),
           "--prompt", str(n_prompt), "--gen", str(n_gen), "--json"]
    if decode_from_empty:
        cmd.append("--decode-from-empty")
    env = dict(os.environ)
    if kernels:
        env["EGPU_KERNELS"] = kernels
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--binary", default=str(REPO / "target/release/examples/egpu_bench"))
    ap.add_argument("--llama-bench", metavar="PATH",
                    help="run llama.cpp's llama-bench tool; decode then starts from an empty context")
    ap.add_argument("--llama-bench-avx2", metavar="PATH",
                    help="also run this llama-bench (built with LLAMA_CPU=avx2) and give the avx2 "
                         "column a ratio against it")
    ap.add_argument("--kernels", nargs="+", metavar="PATH",
                    help="run egpu once per kernel path (EGPU_KERNELS: avx512, avx2, portable, ...) "
                         "in the same repetitions, a column each; default: the best path only")
    args = ap.parse_args()
    paths = args.kernels or [None]
    if args.llama_bench_avx2 and not (args.llama_bench and "avx2" in paths):
        ap.error("--llama-bench-avx2 needs --llama-bench and --kernels with avx2")

    if args.llama_bench:
        engine = f"llama-bench {args.llama_bench}, decode from an empty context"
        if args.llama_bench_avx2:
            engine += f"; AVX2-only llama-bench {args.llama_bench_avx2}"
    else:
        import llama_cpp
        engine = f"llama-cpp-python {llama_cpp.__version__}, decode after the prompt"
    print(f"<!-- {time.strftime('%Y-%m-%d %H:%M')} · {platform.processor() or platform.machine()} · "
          f"{os.cpu_count()} CPUs · {engine} -->")
    header = ["model", "threads", "test"]
    for path in paths:
        header += [f"egpu{f' ({path})' if path else ''} tok/s", "ratio"]
        if path == "avx2" and args.llama_bench_avx2:
            header.append("ratio to AVX2 llama.cpp")
    header.append("llama.cpp tok/s")
    if args.llama_bench_avx2:
        header.append("AVX2 llama.cpp tok/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for model in args.model:
        for threads in args.threads:
            runs = {"llama.cpp": [], "llama.cpp avx2": [], **{path: [] for path in paths}}
            for _ in range(args.reps):
                for path in paths:
                    runs[path].append(egpu_run(Path(args.binary), model, threads, args.prompt, args.gen,
                                               decode_from_empty=bool(args.llama_bench), kernels=path))
                if args.llama_bench:
                    runs["llama.cpp"].append(
                        llama_bench_run(args.llama_bench, model, threads, args.prompt, args.gen))
                    if args.llama_bench_avx2:
                        runs["llama.cpp avx2"].append(llama_bench_run(
                            args.llama_bench_avx2, model, threads, args.prompt, args.gen))
                else:
                    runs["llama.cpp"].append(llamacpp_run(model, threads, args.prompt, args.gen))
            for key, label in [("prefill_tok_s", f"pp{args.prompt}"), ("decode_tok_s", f"tg{args.gen}")]:
                theirs = statistics.median(r[key] for r in runs["llama.cpp"])
                cells = [Path(model).name, str(threads), label]
                theirs_avx2 = (statistics.median(r[key] for r in runs["llama.cpp avx2"])
                               if args.llama_bench_avx2 else None)
                for path in paths:
                    ours = statistics.median(r[key] for r in runs[path])
                    cells += [f"{ours:.1f}", f"{ours / theirs:.2f}×"]
                    if path == "avx2" and theirs_avx2:
                        cells.append(f"{ours / theirs_avx2:.2f}×")
                cells.append(f"{theirs:.1f}")
                if theirs_avx2:
                    cells.append(f"{theirs_avx2:.1f}")
                print("| " + " | ".join(cells) + " |")
                sys.stdout.flush()
    tiles = {path or "best": r.get("tile", "?") for path in paths for r in runs[path][:1]}
    print(f"\nprefill tile kernel per path: {tiles}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Embedding throughput (issue 20): one request with many texts, egpud against llama.cpp's
llama-server (--embeddings) on the same model, same machine, same run.

    cargo build --release -p egpud -p egpuctl && cargo build --release -p egpu-engine --example hf_convert
    python3 bench/embed_bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --model models/gemma-3-270m-q4_k_m.gguf --model models/all-MiniLM-L6-v2 \\
        --llama-server target/llama-bench/build/bin/llama-server

Each server gets the same 64 sentences (~15 tokens each) in one OpenAI /v1/embeddings request;
the time is the request's wall time, median of --reps after one warm-up. Both return unit-length
embeddings: last-token pooled for the decoder models (llama-server --pooling last), the file's
pooling (mean) for the BERT folder, which egpud loads as it is and llama-server gets as egpu's
GGUF conversion of it (hf_convert). llama-server runs --parallel slots (default 8) so that it
can batch the request's texts, as egpud does."""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_servers import start_egpud, start_llama_server, stop  # noqa: E402

WORDS = ("river stone garden window market engine letter winter silver forest "
         "harbor lantern meadow copper signal thunder orchard canvas bridge candle").split()
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + f" number {i}."
         for i in range(64)]


def embed(port, model):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings",
                                 data=json.dumps({"model": model, "input": TEXTS}).encode(),
                                 headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    assert len(out["data"]) == len(TEXTS)
    return time.perf_counter() - started, out["usage"]["prompt_tokens"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--llama-server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=8, help="llama-server slots")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    print("| model | server | texts/s | tokens/s | egpud / llama.cpp |")
    print("|---|---|---|---|---|")
    for model in args.model:
        rates = {}
        folder = Path(model).is_dir()
        servers = [("egpud", lambda tmp: start_egpud(model, args.threads, tmp, 1, 512)[:2], "m")]
        if args.llama_server:
            def llama(tmp, model=model, folder=folder):
                gguf = model
                if folder:
                    gguf = str(Path(tmp) / "converted.gguf")
                    subprocess.run([str(repo / "target/release/examples/hf_convert"), model, gguf],
                                   check=True, capture_output=True)
                pooling = () if folder else ("--pooling", "last")
                return start_llama_server(args.llama_server, gguf, args.threads, tmp, args.parallel,
                                          512, extra=("--embeddings", *pooling))
            servers.append(("llama-server", llama, "m"))
        for name, start, model_name in servers:
            with tempfile.TemporaryDirectory() as tmp:
                proc, port = start(tmp)
                try:
                    embed(port, model_name)
                    runs = [embed(port, model_name) for _ in range(args.reps)]
                finally:
                    stop(proc)
            seconds = statistics.median(t for t, _ in runs)
            tokens = runs[0][1]
            rates[name] = len(TEXTS) / seconds
            ratio = f"{rates['egpud'] / rates[name]:.2f}×" if name != "egpud" else ""
            print(f"| {Path(model).name} | {name} | {len(TEXTS) / seconds:.1f} | {tokens / seconds:.0f} "
                  f"| {ratio} |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""egpud's own costs, measured against the engine in-process on the same machine, same run.

    cargo build --release -p egpud -p egpu-engine --example egpu_bench
    PYTHONPATH=$(scripts/python-deps.sh) python3 bench/daemon_bench.py [--threads 2] [--reps 5]

Starts a release egpud on a private socket with the real SmolLM2 and prints a markdown table:

- decode tok/s through the daemon (greedy, 128 tokens, EOS ignored) vs `egpu_bench` in-process
  with the same prompt length, alternating, medians of --reps;
- time to first token as the client sees it vs the engine's prefill of the same prompt
  (in-process): the difference is what the socket, gRPC, tokenization and scheduling add;
- aggregate decode tok/s with 1, 2, 4 and 8 concurrent streams (8 slots);
- load time of SmolLM2 (Load RPC, client side; the file is in the page cache after the first).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "clients" / "python"))
import egpu_client  # noqa: E402  (generates and imports the stubs)

import grpc  # noqa: E402

pb, pb_grpc = egpu_client.load_stubs()

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the printing press begins in the fifteenth century when",
    "Here is a short guide to growing tomatoes on a balcony. First,",
    "The main differences between lakes and rivers are that",
    "In the morning the market opens early and the first traders",
    "A recipe for bread needs only four things: flour, water,",
    "The spacecraft left orbit at dawn, and the crew watched as",
    "When learning a new language, the most useful habit is",
]


def target_dir():
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release"


def start_daemon(run_dir, threads):
    socket = run_dir / "egpud.sock"
    log = open(run_dir / "egpud.log", "w")
    proc = subprocess.Popen(
        [
            str(target_dir() / "egpud"),
            "--socket", str(socket),
            "--state-dir", str(run_dir / "state"),
            "--threads", str(threads),
        ],
        stderr=log,
        env={**os.environ, "EGPU_LOG": "warn"},
    )
    for _ in range(200):
        if socket.exists():
            break
        if proc.poll() is not None:
            sys.exit(f"egpud exited: {(run_dir / 'egpud.log').read_text()}")
        time.sleep(0.05)
    channel = grpc.insecure_channel(
        f"unix:{socket}", options=[("grpc.default_authority", "localhost")]
    )
    grpc.channel_ready_future(channel).result(timeout=10)
    return proc, channel


def load(stub, model, name, slots, ctx=1024):
    t0 = time.perf_counter()
    for event in stub.Load(pb.LoadRequest(source=model, name=name, slots=slots, context_length=ctx)):
        pass
    return time.perf_counter() - t0


def generate(stub, name, prompt, n, sampling=None):
    """(client ttft s, Done message); greedy unless `sampling` (a SamplingOptions) says."""
    request = pb.GenerateRequest(
        model=name, prompt=prompt, raw=True, max_tokens=n, stop_at_eos=False, sampling=sampling
    )
    t0 = time.perf_counter()
    ttft, done = None, None
    for event in stub.Generate(request):
        if event.HasField("chunk") and ttft is None and event.chunk.token_ids:
            ttft = time.perf_counter() - t0
        if event.HasField("done"):
            done = event.done
    return ttft, done


def aggregate(stub, name, n, gen, sampling=None):
    """n concurrent streams of `gen` tokens: completion tokens per wall-clock second."""
    results = [None] * n

    def run(i):
        results[i] = generate(stub, name, PROMPTS[i % len(PROMPTS)], gen, sampling)[1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(r.completion_tokens for r in results) / wall


def engine_bench(model, threads, n_prompt, n_gen):
    out = subprocess.run(
        [
            str(target_dir() / "examples" / "egpu_bench"),
            "--model", model, "--threads", str(threads),
            "--prompt", str(n_prompt), "--gen", str(n_gen), "--json",
        ],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gen", type=int, default=128)
    args = ap.parse_args()
    model = str(Path(args.model).resolve())

    with tempfile.TemporaryDirectory(prefix="egpu-bench-") as tmp:
        proc, channel = start_daemon(Path(tmp), args.threads)
        try:
            stub = pb_grpc.EgpuStub(channel)
            load_times = []
            for i in range(args.reps):
                load_times.append(load(stub, model, "m", slots=8))
                if i + 1 < args.reps:
                    stub.Unload(pb.UnloadRequest(name="m"))

            # Single stream: daemon vs in-process, alternating.
            prompt = PROMPTS[0]
            generate(stub, "m", prompt, 8)  # warm-up
            daemon_decode, engine_decode, ttfts, daemon_prefill, engine_prefill = [], [], [], [], []
            n_prompt = None
            for _ in range(args.reps):
                ttft, done = generate(stub, "m", prompt, args.gen)
                n_prompt = done.prompt_tokens
                daemon_decode.append(done.timings.decode_tokens_per_s)
                daemon_prefill.append(done.timings.prefill_ms / 1e3)
                ttfts.append(ttft)
                e = engine_bench(model, args.threads, n_prompt, args.gen)
                engine_decode.append(e["decode_tok_s"])
                engine_prefill.append(n_prompt / e["prefill_tok_s"])

            # Concurrency: N streams at once, aggregate completion tokens per wall second.
            by_streams = {}
            for n in [1, 2, 4, 8]:
                rates = []
                for _ in range(max(1, args.reps // 2)):
                    rates.append(aggregate(stub, "m", n, args.gen))
                by_streams[n] = statistics.median(rates)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    med = statistics.median
    dd, ed = med(daemon_decode), med(engine_decode)
    ttft, ep = med(ttfts), med(engine_prefill)
    print(f"{Path(args.model).name}, {args.threads} threads, {args.reps} reps (medians), prompt {n_prompt} tokens, {args.gen} generated\n")
    print("| what | daemon | in-process engine | result | target |")
    print("|---|---|---|---|---|")
    print(f"| decode tok/s (1 stream) | {dd:.1f} | {ed:.1f} | overhead {100 * (1 - dd / ed):+.1f}% | ≤ 3% |")
    print(f"| time to first token | {ttft * 1e3:.1f} ms (client) | {ep * 1e3:.1f} ms (prefill) | +{(ttft - ep) * 1e3:.1f} ms | ≤ 5 ms |")
    print(f"| daemon-internal prefill (admission → first token) | {med(daemon_prefill) * 1e3:.1f} ms | | | |")
    for n, rate in by_streams.items():
        print(f"| aggregate decode, {n} stream{'s' if n > 1 else ''} | {rate:.1f} tok/s | | {rate / by_streams[1]:.2f}× one stream | 8 streams ≥ 4× |")
    print(f"| load the model (Load RPC) | {med(load_times) * 1e3:.0f} ms median, {min(load_times) * 1e3:.0f} ms best | | | ≤ 200 ms |")


if __name__ == "__main__":
    main()

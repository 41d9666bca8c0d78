#!/usr/bin/env python3
"""What choosing each token costs through egpud, per sampling setting, same daemon, same run.

    cargo build --release -p egpud
    PYTHONPATH=$(scripts/python-deps.sh) python3 bench/sampling_bench.py [--model M.gguf ...] [--streams 1 8] [--reps 3]

Starts a release egpud (CARGO_TARGET_DIR's, so an older build can be measured the same way)
on a private socket, loads each model with 8 slots, and decodes 128 tokens per stream (EOS
ignored) with the settings the front ends send when a client leaves them at their defaults:
greedy, OpenAI's (temperature 1, nothing cut) and Ollama's (temperature 0.8, top-k 40, top-p
0.9, repeat penalty 1.1 over 64 tokens). Settings alternate within each repetition; prints a
markdown table of medians, with each setting's speed as a fraction of greedy's.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_bench as db  # noqa: E402  (starts egpud, generates the stubs)

pb = db.pb

SETTINGS = {
    "greedy": pb.SamplingOptions(temperature=0.0),
    "OpenAI defaults": pb.SamplingOptions(temperature=1.0, seed=1),
    "Ollama defaults": pb.SamplingOptions(
        temperature=0.8, top_k=40, top_p=0.9, repeat_penalty=1.1, penalty_last_n=64, seed=1
    ),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    args = ap.parse_args()
    models = args.model or [
        str(db.REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"),
        str(db.REPO / "models" / "gemma-3-270m-q4_k_m.gguf"),
    ]
    print(f"egpud at {db.target_dir()}, {args.threads} threads, {args.gen} tokens per stream, "
          f"medians of {args.reps}\n")
    print("| model | streams | setting | aggregate tok/s | × greedy |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="egpu-sampling-") as tmp:
        proc, channel = db.start_daemon(Path(tmp), args.threads)
        try:
            stub = db.pb_grpc.EgpuStub(channel)
            for i, model in enumerate(models):
                name = f"m{i}"
                db.load(stub, str(Path(model).resolve()), name, slots=8)
                db.generate(stub, name, db.PROMPTS[0], 8)  # warm-up
                for streams in args.streams:
                    rates = {s: [] for s in SETTINGS}
                    for _ in range(args.reps):
                        for setting, sampling in SETTINGS.items():
                            rates[setting].append(
                                db.aggregate(stub, name, streams, args.gen, sampling)
                            )
                    greedy = statistics.median(rates["greedy"])
                    for setting, r in rates.items():
                        rate = statistics.median(r)
                        print(f"| {Path(model).name} | {streams} | {setting} | {rate:.1f} | "
                              f"{rate / greedy:.2f}× |", flush=True)
                stub.Unload(pb.UnloadRequest(name=name))
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The tinygrad backend against the native CPU engine, through one egpud, same run, alternating.

    scripts/setup-worker.sh && cargo build --release -p egpud
    DEV=CPU PYTHONPATH=$(scripts/python-deps.sh) python3 bench/tinygrad_bench.py [--model FILE] [--reps 3]

Starts a release egpud with `--backend tinygrad` on a private socket (its worker on the DEV from
the environment: CPU here, CUDA/NV/AMD on a GPU), loads the same GGUF on both backends and
prints a markdown table of, per backend: load time, time to first token (client side), decode
tok/s of one stream (the daemon's own decode timing, EOS ignored), and aggregate decode tok/s
of --streams concurrent streams (batched steps), with the ratio tinygrad / cpu.

`--worker-python` / EGPU_WORKER_PYTHON picks the worker's interpreter (default: worker/.venv).
`--egpud` picks the binary (default: target/release/egpud, or $CARGO_TARGET_DIR's).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
# The same prompts and Generate helper as the daemon benchmark (it also loads the stubs).
from daemon_bench import PROMPTS, aggregate, generate, grpc, pb, pb_grpc  # noqa: E402


def default_egpud():
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "egpud"


def start_daemon(run_dir, egpud, worker_python, threads, timeout):
    socket = run_dir / "egpud.sock"
    log_path = run_dir / "egpud.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(egpud), "--socket", str(socket), "--state-dir", str(run_dir / "state"),
         "--threads", str(threads), "--backend", "tinygrad", "--worker-python", str(worker_python)],
        stderr=log, env={**os.environ, "EGPU_LOG": "info"})
    channel = grpc.insecure_channel(f"unix:{socket}", options=[
        ("grpc.default_authority", "localhost"), ("grpc.max_receive_message_length", 64 << 20)])
    stub = pb_grpc.EgpuStub(channel)
    deadline = time.monotonic() + timeout
    # egpud answers Status at once; the worker is ready when Status says so.
    while True:
        if proc.poll() is not None:
            sys.exit(f"egpud exited:\n{log_path.read_text()}")
        try:
            st = stub.Status(pb.StatusRequest(), timeout=2)
            tg = [b for b in st.backends if b.backend == "tinygrad"]
            if tg and tg[0].state == "ready":
                return proc, stub, tg[0], log_path
            if tg and tg[0].state == "lost" and tg[0].restarts >= 2:
                sys.exit(f"the tinygrad worker does not start: {tg[0].detail}")
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"the worker was not ready within {timeout} s:\n{log_path.read_text()}")
        time.sleep(0.2)


def load(stub, model, name, backend, slots, ctx):
    t0 = time.perf_counter()
    info = None
    for event in stub.Load(pb.LoadRequest(source=model, name=name, slots=slots, context_length=ctx,
                                          backend=backend)):
        if event.HasField("model"):
            info = event.model
    return time.perf_counter() - t0, info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--backends", default="cpu,tinygrad", help="which to measure, comma-separated")
    ap.add_argument("--egpud", default=str(default_egpud()))
    ap.add_argument("--worker-python", default=os.environ.get(
        "EGPU_WORKER_PYTHON", str(REPO / "worker" / ".venv" / "bin" / "python")))
    ap.add_argument("--start-timeout", type=float, default=600)
    args = ap.parse_args()
    model = str(Path(args.model).resolve())
    backends = args.backends.split(",")

    with tempfile.TemporaryDirectory(prefix="egpu-tg-bench-") as tmp:
        proc, stub, device, log_path = start_daemon(Path(tmp), args.egpud, args.worker_python,
                                                    args.threads, args.start_timeout)
        rows = {}
        try:
            for b in backends:
                secs, info = load(stub, model, b, b, slots=args.streams, ctx=args.ctx)
                # Warm-up: the first passes on tinygrad compile kernels and capture the jit.
                generate(stub, b, PROMPTS[0], 8)
                aggregate(stub, b, args.streams, 8)
                rows[b] = {"load": secs, "bytes": info.bytes, "decode": [], "ttft": [], "agg": []}
            for _ in range(args.reps):
                for b in backends:  # alternating, so drift hits both alike
                    ttft, done = generate(stub, b, PROMPTS[0], args.gen)
                    rows[b]["ttft"].append(ttft)
                    rows[b]["decode"].append(done.timings.decode_tokens_per_s)
                    rows[b]["agg"].append(aggregate(stub, b, args.streams, args.gen))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    med = statistics.median
    d = device.device
    print(f"model {Path(model).name}; tinygrad on {device.dev or 'default DEV'} = {d.name} "
          f"({device.arch}); cpu backend {args.threads} threads; {args.reps} reps (medians), "
          f"{args.gen} tokens, {args.streams} streams\n")
    print("| backend | load | first token | decode, 1 stream | decode, "
          f"{args.streams} streams (aggregate) | resident bytes |")
    print("|---|---|---|---|---|---|")
    for b, r in rows.items():
        print(f"| {b} | {r['load']:.2f} s | {med(r['ttft']) * 1e3:.0f} ms | {med(r['decode']):.1f} tok/s "
              f"| {med(r['agg']):.1f} tok/s | {r['bytes'] / 1e6:.0f} MB |")
    if "cpu" in rows and "tinygrad" in rows:
        c, t = rows["cpu"], rows["tinygrad"]
        print(f"\ntinygrad / cpu: decode {med(t['decode']) / med(c['decode']):.2f}×, "
              f"{args.streams} streams {med(t['agg']) / med(c['agg']):.2f}×")


if __name__ == "__main__":
    main()

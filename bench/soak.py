#!/usr/bin/env python3
"""Soak test: many clients doing a random mix of everything, while faults are injected.

    cargo build --release -p egpud
    PYTHONPATH=$(scripts/python-deps.sh) python3 bench/soak.py --minutes 20 --clients 64
    PYTHONPATH=$(scripts/python-deps.sh) python3 bench/soak.py --short       # CI: ~1 minute

egpud serves SmolLM2 (pinned, cpu), a tiny LLaMA on the tinygrad backend (pinned, DEV=CPU;
left out with --no-tinygrad or without worker/.venv) and a tiny Qwen2 that clients load and
unload. Each client loops over a random request:

- generate, greedy, 12 tokens: the tokens must equal what the same request gave alone at the
  start (batch invariance: neighbours never change a result); anything else is a wrong result;
- generate, streaming, dropped after the first chunk (a client that disconnects);
- generate with a 20 ms deadline (DEADLINE_EXCEEDED or a result, nothing else);
- score, tokenize; load or unload of the swap model.

Every stream that is not dropped on purpose must end with its final message or an error
status; one that ends with neither is "lost" (must be 0). Meanwhile the tinygrad worker is
killed (SIGKILL) at random intervals, and at mid-run egpud itself is killed with SIGKILL and
started again on the same state folder; the pinned models must come back each time. Every
second the budget is sampled from Status (used bytes never above the budget) and egpud's RSS.

Prints a JSON report and exits 1 if a request was lost, a result was wrong, a pinned model did
not come back, or the budget was exceeded.
"""

import argparse
import atexit
import collections
import json
import os
import random
import signal
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

SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURES = REPO / "engine" / "tests" / "fixtures" / "models"
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the printing press begins in the fifteenth century when",
    "Here is a short guide to growing tomatoes on a balcony. First,",
    "The main differences between lakes and rivers are that",
    "A recipe for bread needs only four things: flour, water,",
    "When learning a new language, the most useful habit is",
]
GREEDY_TOKENS = 12
# Each channel gets its own connections, retried at most a second apart. gRPC's defaults
# share one subchannel between all channels to a target and back off up to 2 minutes: while
# egpud restarts, 64 clients failing to connect grow that backoff past any restart.
CHANNEL_OPTIONS = [
    ("grpc.default_authority", "localhost"),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def binary(name, profile):
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / profile / name


class Daemon:
    """One egpud process on a fixed socket and state folder (restartable)."""

    def __init__(self, run_dir, args):
        self.run_dir, self.args = run_dir, args
        self.socket = run_dir / "egpud.sock"
        self.proc = None
        self.log = open(run_dir / "egpud.log", "a")

    def start(self):
        cmd = [
            str(binary("egpud", self.args.profile)),
            "--socket", str(self.socket),
            "--state-dir", str(self.run_dir / "state"),
            "--models-dir", str(self.run_dir / "models"),
            "--threads", str(self.args.threads),
            "--memory-budget", self.args.budget,
            "--http", "off", "--http-socket", "off",
            "--max-queue", "256",
        ]
        env = {**os.environ, "EGPU_LOG": "warn"}
        if self.args.tinygrad:
            cmd += ["--backend", "tinygrad", "--worker-python", str(REPO / "worker" / ".venv" / "bin" / "python"),
                    "--worker-heartbeat", "1s", "--worker-heartbeat-timeout", "20s"]
            env.update(DEV="CPU", NOOPT="1")
        self.proc = subprocess.Popen(cmd, stderr=self.log, env=env)
        # Whatever ends this script (a failed check, Ctrl-C), egpud ends with it.
        atexit.register(self.proc.kill)
        channel = grpc.insecure_channel(
            f"unix:{self.socket}", options=CHANNEL_OPTIONS
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=60)
        except grpc.FutureTimeoutError:
            self.log.flush()
            tail = (self.run_dir / "egpud.log").read_text(errors="replace")[-4000:]
            state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
            # Is it egpud or this process's gRPC channel? Ask from a fresh process.
            probe = subprocess.run([str(binary("egpuctl", self.args.profile)), "--socket", str(self.socket),
                                    "status"], capture_output=True, text=True, timeout=30)
            state += f"; egpuctl status from a fresh process: exit {probe.returncode}"
            sys.exit(f"egpud did not answer within 60 s of starting (pid {self.proc.pid}, {state}); "
                     f"its log ends:\n{tail}")
        finally:
            channel.close()

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def rss_mib(self):
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


def stub_for(socket):
    channel = grpc.insecure_channel(
        f"unix:{socket}", options=CHANNEL_OPTIONS
    )
    return channel, pb_grpc.EgpuStub(channel)


def load(stub, source, name, pin=False, backend="", ctx=512, slots=4):
    info = None
    for event in stub.Load(pb.LoadRequest(source=str(source), name=name, pin=pin, backend=backend,
                                          context_length=ctx, slots=slots), timeout=600):
        if event.HasField("model"):
            info = event.model
    return info


def greedy(stub, model, prompt, timeout=None):
    """(token ids, finished with its final message)."""
    request = pb.GenerateRequest(model=model, prompt=prompt, raw=True, max_tokens=GREEDY_TOKENS,
                                 stop_at_eos=False)
    ids, done = [], False
    for event in stub.Generate(request, timeout=timeout):
        if event.HasField("chunk"):
            ids.extend(event.chunk.token_ids)
        if event.HasField("done"):
            done = True
    return ids, done


def wait_pinned(stub, names, timeout, since, dead_worker=None):
    """Seconds from `since` (the fault) until every pinned name is ready again, or None. After a
    worker kill, only a new worker counts: until egpud notices, the old state still says ready."""
    while time.monotonic() - since < timeout:
        try:
            status = stub.Status(pb.StatusRequest(), timeout=5)
            ready = {m.name for m in status.models if m.state == pb.MODEL_STATE_READY}
            worker = next((b for b in status.backends if b.backend == "tinygrad"), None)
            replaced = dead_worker is None or (worker is not None and worker.pid not in (0, dead_worker))
            if replaced and set(names) <= ready:
                return time.monotonic() - since
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    return None


class Report:
    def __init__(self):
        self.lock = threading.Lock()
        self.served = collections.Counter()
        self.errors = collections.Counter()
        self.lost = 0
        self.wrong = []
        self.dropped = 0
        self.error_examples = {}

    def ok(self, kind):
        with self.lock:
            self.served[kind] += 1

    def error(self, kind, err):
        code = err.code().name if isinstance(err, grpc.RpcError) else type(err).__name__
        key = f"{kind}:{code}"
        with self.lock:
            self.errors[key] += 1
            if isinstance(err, grpc.RpcError):
                self.error_examples.setdefault(key, err.details())


def client_loop(index, args, state, report, expected, stop_at):
    rng = random.Random(args.seed * 1000 + index)
    channel, stub = stub_for(state["socket"])
    models = ["smol"] + (["tiny"] if args.tinygrad else [])
    while time.monotonic() < stop_at:
        kind = rng.choices(["greedy", "drop", "deadline", "score", "tokenize", "swap"],
                           weights=[40, 15, 10, 15, 15, 5])[0]
        model = rng.choice(models)
        prompt = rng.choice(PROMPTS)
        try:
            if kind == "greedy":
                ids, done = greedy(stub, model, prompt, timeout=300)
                if not done:
                    with report.lock:
                        report.lost += 1
                elif ids != expected[(model, prompt)]:
                    with report.lock:
                        report.wrong.append({"model": model, "prompt": prompt, "got": ids,
                                             "want": expected[(model, prompt)]})
                else:
                    report.ok(kind)
            elif kind == "drop":
                stream = stub.Generate(pb.GenerateRequest(model=model, prompt=prompt, raw=True,
                                                          max_tokens=200, stop_at_eos=False),
                                       timeout=300)
                next(stream)
                stream.cancel()
                with report.lock:
                    report.dropped += 1
            elif kind == "deadline":
                try:
                    _, done = greedy(stub, model, prompt, timeout=0.02)
                    if not done:
                        with report.lock:
                            report.lost += 1
                    else:
                        report.ok(kind)
                except grpc.RpcError as err:
                    # gRPC Python reports a deadline that passes while it is still connecting
                    # as CANCELLED "Timeout expired": the client's own deadline as well.
                    timed_out = err.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
                        err.code() == grpc.StatusCode.CANCELLED and "Timeout expired" in err.details())
                    if not timed_out:
                        raise
                    report.ok(kind)
            elif kind == "score":
                stub.Score(pb.ScoreRequest(model=model, text=prompt), timeout=300)
                report.ok(kind)
            elif kind == "tokenize":
                stub.Tokenize(pb.TokenizeRequest(model=model, text=prompt), timeout=60)
                report.ok(kind)
            else:
                if rng.random() < 0.5:
                    load(stub, FIXTURES / "tiny-qwen2.gguf", "swap", backend="cpu")
                else:
                    stub.Unload(pb.UnloadRequest(name="swap", force=rng.random() < 0.5), timeout=60)
                report.ok(kind)
        except grpc.RpcError as err:
            report.error(kind, err)
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                # egpud may be restarting: a fresh channel, after a moment.
                channel.close()
                time.sleep(0.2)
                channel, stub = stub_for(state["socket"])
        except StopIteration:
            with report.lock:
                report.lost += 1
    channel.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    # SmolLM2 at 8 slots of 512 tokens estimates 221 MB (holds 191 MB) and the swap model 2 MB:
    # a budget near what is used, so that "never above the budget" says something.
    ap.add_argument("--budget", default="240MB")
    ap.add_argument("--worker-kill-every", type=float, default=90, help="mean seconds between worker kills")
    ap.add_argument("--no-tinygrad", action="store_true")
    ap.add_argument("--profile", default="release")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--short", action="store_true", help="CI: 75 s, 16 clients, debug build")
    ap.add_argument("--out", help="write the report here too")
    args = ap.parse_args()
    if args.short:
        args.minutes, args.clients, args.profile = 1.25, 16, "debug"
        args.worker_kill_every = 25
    args.tinygrad = not args.no_tinygrad and (REPO / "worker" / ".venv" / "bin" / "python").exists()
    if not SMOLLM2.exists():
        sys.exit(f"{SMOLLM2} is missing: run scripts/fetch-models.sh")

    with tempfile.TemporaryDirectory(prefix="egpu-soak-") as tmp:
        run_dir = Path(tmp)
        (run_dir / "models").mkdir()
        daemon = Daemon(run_dir, args)
        daemon.start()
        channel, stub = stub_for(daemon.socket)
        pinned = ["smol"]
        load(stub, SMOLLM2, "smol", pin=True, backend="cpu", slots=8)
        if args.tinygrad:
            load(stub, FIXTURES / "tiny-llama31.gguf", "tiny", pin=True, backend="tinygrad", slots=4)
            pinned.append("tiny")
        budget = stub.Status(pb.StatusRequest()).budget_bytes
        # What each request gives alone, before any neighbour or fault.
        expected = {}
        for model in pinned:
            for prompt in PROMPTS:
                expected[(model, prompt)] = greedy(stub, model, prompt)[0]
        rss = {"start_mib": daemon.rss_mib(), "samples": []}
        used_max = 0
        worst_over = -(1 << 62)  # max of used - budget over backends and samples; must stay <= 0
        report = Report()
        faults = {"worker_kills": 0, "egpud_sigkills": 0, "pinned_back_s": []}
        state = {"socket": daemon.socket}
        started = time.monotonic()
        stop_at = started + args.minutes * 60
        clients = [threading.Thread(target=client_loop, args=(i, args, state, report, expected, stop_at))
                   for i in range(args.clients)]
        for c in clients:
            c.start()
        rng = random.Random(args.seed)
        next_worker_kill = started + rng.expovariate(1 / args.worker_kill_every)
        egpud_kill_at = started + args.minutes * 30
        while time.monotonic() < stop_at:
            time.sleep(1)
            now = time.monotonic()
            try:
                status = stub.Status(pb.StatusRequest(), timeout=5)
                for b in status.backends:
                    over = b.used_bytes - b.budget_bytes
                    worst_over = max(worst_over, over)
                    used_max = max(used_max, b.used_bytes)
                worker = next((b for b in status.backends if b.backend == "tinygrad"), None)
            except grpc.RpcError:
                worker = None
            rss["samples"].append(daemon.rss_mib())
            if args.tinygrad and worker and worker.pid and now >= next_worker_kill:
                killed_at = time.monotonic()
                os.kill(worker.pid, signal.SIGKILL)
                faults["worker_kills"] += 1
                back = wait_pinned(stub, pinned, 300, killed_at, dead_worker=worker.pid)
                faults["pinned_back_s"].append(back)
                next_worker_kill = time.monotonic() + rng.expovariate(1 / args.worker_kill_every)
            if faults["egpud_sigkills"] == 0 and now >= egpud_kill_at:
                rss["before_sigkill_mib"] = daemon.rss_mib()
                killed_at = time.monotonic()
                daemon.kill9()
                faults["egpud_sigkills"] += 1
                daemon.start()
                channel.close()
                channel, stub = stub_for(daemon.socket)
                back = wait_pinned(stub, pinned, 600, killed_at)
                faults["pinned_back_s"].append(back)
                rss["after_restart_mib"] = daemon.rss_mib()
        for c in clients:
            c.join()
        rss["end_mib"] = daemon.rss_mib()
        samples = [s for s in rss.pop("samples") if s is not None]
        rss["max_mib"] = max(samples) if samples else None
        daemon.stop()
        channel.close()

    result = {
        "minutes": args.minutes, "clients": args.clients, "tinygrad": args.tinygrad,
        "served": dict(report.served), "served_total": sum(report.served.values()),
        "dropped_on_purpose": report.dropped,
        "errors_by_code": dict(sorted(report.errors.items())),
        "error_examples": dict(sorted(report.error_examples.items())),
        "lost": report.lost, "wrong": len(report.wrong), "wrong_examples": report.wrong[:3],
        "faults": faults, "rss": rss,
        "budget_bytes": budget, "max_used_bytes": used_max,
        "max_over_budget_bytes": worst_over,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    failed = (report.lost or report.wrong or worst_over > 0
              or any(b is None for b in faults["pinned_back_s"]))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

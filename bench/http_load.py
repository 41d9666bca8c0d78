#!/usr/bin/env python3
"""A bounded load test of egpud's HTTP front end: many concurrent clients, mixed OpenAI and
Ollama requests, some streams dropped mid-way on purpose, a short queue so that some requests
are turned away with 429. Clients retry a 429 after a short pause, as apps do. Checks that nothing is wrong or lost and
memory stays flat.

    cargo build --release -p egpud -p egpuctl
    python3 bench/http_load.py [--clients 64] [--requests 640] [--max-queue 16]

Every request is greedy, so each (kind, prompt) has one right answer, taken first from solo
requests. At the end it prints: requests sent, answered correctly, wrong (must be 0), lost (no
final message and not dropped by us; must be 0), dropped on purpose, refused with 429, other
errors by status, egpud's RSS before and after, and the wall time.
"""

import argparse
import collections
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from local_servers import release, free_port  # bench/ is the script's folder, on sys.path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Name a fruit.",
    "What color is the sky?",
    "Count to five.",
    "Say something kind.",
    "Name a large city.",
    "What is two plus two?",
    "Describe the sea in a few words.",
    "Give a word that rhymes with cat.",
]
KINDS = ["openai-chat-stream", "openai-chat", "openai-completion", "ollama-chat-stream", "ollama-generate"]
GEN = 16




def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def request_for(kind, prompt):
    """(path, body, streamed)"""
    if kind.startswith("openai-chat"):
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": GEN, "stream": kind.endswith("stream")}
        return "/v1/chat/completions", body, body["stream"]
    if kind == "openai-completion":
        return "/v1/completions", {"model": "m", "prompt": prompt, "temperature": 0, "max_tokens": GEN}, False
    if kind == "ollama-chat-stream":
        return "/api/chat", {"model": "m", "messages": [{"role": "user", "content": prompt}],
                             "options": {"temperature": 0, "num_predict": GEN}}, True
    return "/api/generate", {"model": "m", "prompt": prompt, "stream": False,
                             "options": {"temperature": 0, "num_predict": GEN}}, False


def run_one(port, kind, prompt, drop_after=None):
    """One request: ("ok", text) | ("dropped", None) | ("status", code) | ("lost", why)."""
    path, body, streamed = request_for(kind, prompt)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return "status", resp.status
        if not streamed:
            data = json.loads(resp.read())
            if kind == "openai-chat":
                return "ok", data["choices"][0]["message"]["content"]
            if kind == "openai-completion":
                return "ok", data["choices"][0]["text"]
            return ("ok", data["response"]) if data.get("done") else ("lost", "not done")
        text, frames, finished = "", 0, False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if kind == "openai-chat-stream":
                if line == b"data: [DONE]":
                    finished = True
                    break
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    return "status", event["error"].get("code")
                for c in event["choices"]:
                    text += c["delta"].get("content") or ""
            else:
                event = json.loads(line)
                if "error" in event:
                    return "status", "stream-error"
                text += event.get("message", {}).get("content", "")
                if event.get("done"):
                    finished = True
                    break
            frames += 1
            if drop_after is not None and frames >= drop_after:
                conn.sock.shutdown(socket.SHUT_RDWR)
                return "dropped", None
        return ("ok", text) if finished else ("lost", "stream ended without its final message")
    except (ConnectionError, OSError, http.client.HTTPException) as e:
        return "lost", repr(e)
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=640)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--drop", type=float, default=0.15, help="share of streams dropped mid-way")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="runs of --requests, RSS after each")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="egpu-load-") as tmp:
        sock = Path(tmp) / "egpud.sock"
        proc = subprocess.Popen(
            [str(release("egpud")), "--socket", str(sock), "--state-dir", f"{tmp}/state",
             "--threads", str(args.threads), "--http", f"127.0.0.1:{port}", "--http-auth", "none",
             "--max-queue", str(args.max_queue)],
            stderr=open(f"{tmp}/egpud.log", "w"), env={**os.environ, "EGPU_LOG": "warn"},
        )
        try:
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=1)
                    break
                except Exception:
                    time.sleep(0.05)
            subprocess.run([str(release("egpuctl")), "--socket", str(sock), "load", args.model,
                            "--name", "m", "--slots", str(args.slots), "--ctx", "512"],
                           check=True, capture_output=True)
            expected = {}
            for kind in KINDS:
                for prompt in PROMPTS:
                    outcome, text = run_one(port, kind, prompt)
                    assert outcome == "ok", (kind, prompt, outcome, text)
                    expected[(kind, prompt)] = text
            rss_before = rss_kib(proc.pid)
            rss_after_round = []
            counts = collections.Counter()
            wrong, lost = [], []
            lock = threading.Lock()
            wall = 0.0
            for _ in range(args.rounds):
                wall += load_round(args, rng, port, expected, counts, wrong, lost, lock)
                rss_after_round.append(rss_kib(proc.pid))
            # Idle again: every slot came back (dropped streams included).
            status = json.loads(subprocess.run([str(release("egpuctl")), "--socket", str(sock), "status", "--json"],
                                               check=True, capture_output=True, text=True).stdout)
            busy = sum(m["active"] + m["queued"] for m in status["models"])
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"{args.rounds} rounds of {args.requests} requests from {args.clients} concurrent clients, {len(KINDS)} kinds "
          f"(OpenAI chat streamed/whole, completions; Ollama chat streamed, generate), "
          f"{args.slots} slots, --max-queue {args.max_queue}, {wall:.1f} s\n")
    print("| outcome | requests |")
    print("|---|---|")
    print(f"| answered, equal to the solo greedy answer | {counts['correct']} |")
    print(f"| wrong answer | {len(wrong)} |")
    print(f"| lost (no final message, not dropped by the client) | {len(lost)} |")
    print(f"| dropped mid-stream by the client on purpose | {counts['dropped on purpose']} |")
    for key in sorted(k for k in counts if k.startswith("status")):
        print(f"| refused: HTTP {key.split()[1]} | {counts[key]} |")
    print(f"| queue full: 429 answers (each retried after a pause) | {counts['429 (retried)']} |")
    print(f"| requests still active or queued after the run | {busy} |")
    rounds = ", ".join(f"{r / 1024:.1f}" for r in rss_after_round)
    print(f"\negpud RSS (MiB): {rss_before / 1024:.1f} after warm-up; after each round: {rounds}")
    for w in wrong[:5]:
        print("WRONG", w, file=sys.stderr)
    for l in lost[:5]:
        print("LOST", l, file=sys.stderr)
    sys.exit(1 if wrong or lost or busy else 0)


def load_round(args, rng, port, expected, counts, wrong, lost, lock):
    """One round of --requests over --clients threads; returns its wall time."""
    jobs = []
    for i in range(args.requests):
        kind, prompt = rng.choice(KINDS), rng.choice(PROMPTS)
        streamed = request_for(kind, prompt)[2]
        drop = rng.randint(1, 4) if streamed and rng.random() < args.drop else None
        jobs.append((kind, prompt, drop))
    next_job = iter(jobs)

    def client():
        while True:
            with lock:
                job = next(next_job, None)
            if job is None:
                return
            kind, prompt, drop = job
            outcome, value = run_one(port, kind, prompt, drop)
            # A full queue is answered 429: back off and try again, as apps do.
            while outcome == "status" and value == 429:
                with lock:
                    counts["429 (retried)"] += 1
                time.sleep(rng.uniform(0.05, 0.2))
                outcome, value = run_one(port, kind, prompt, drop)
            with lock:
                if outcome == "ok":
                    if value == expected[(kind, prompt)]:
                        counts["correct"] += 1
                    else:
                        wrong.append((kind, prompt, value))
                elif outcome == "status":
                    counts[f"status {value}"] += 1
                elif outcome == "dropped":
                    counts["dropped on purpose"] += 1
                else:
                    lost.append((kind, prompt, value))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""egpud's HTTP front end, measured: its overhead against the engine in-process, and egpud
against llama.cpp's own llama-server on the same model file, with OpenAI streaming clients
(the official `openai` package) at 1, 4 and 8 concurrent streams. Same machine, same threads,
one run; the servers take turns (never both running), repetition by repetition.

    cargo build --release -p egpud -p egpuctl -p egpu-engine --example egpu_bench
    bench/build-llama-cpp.sh                      # llama-server from llama-cpp-python's vendored llama.cpp
    PYTHONPATH=$(scripts/python-deps.sh) python3 bench/http_bench.py \
        --llama-server target/llama-bench/build/bin/llama-server [--threads 2] [--reps 3]

Decode rates are what the client sees: tokens after the first over the time from the first to
the last. Both servers get `ignore_eos` so every stream is `--gen` tokens long, greedy unless
`--temperature` asks for sampled requests (the same settings sent to both servers).
Prints markdown tables for BENCHMARKS.md. Speed is measured here, never asserted in tests.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

from local_servers import release, start_egpud, start_llama_server, stop  # bench/ is the script's folder, on sys.path

REPO = Path(__file__).resolve().parent.parent
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
SLOTS = 8
CTX = 1024
CLIENT = "openai"
TEMPERATURE = 0.0
NOTHING_CUT: dict = {}
_unique = iter(range(1 << 30))


def fresh(prompt):
    """A prompt no server has seen, so no prompt cache shortens its prefill."""
    return f"Request {next(_unique)}. {prompt}"





class Egpud:
    """A release egpud with the model loaded in 8 slots."""

    def __init__(self, model, threads, tmp):
        self.proc, port, _ = start_egpud(model, threads, tmp, SLOTS, CTX)
        self.base = f"http://127.0.0.1:{port}/v1"
        self.model = "m"

    def stop(self):
        stop(self.proc)


class LlamaServer:
    def __init__(self, binary, model, threads, tmp):
        self.proc, port = start_llama_server(binary, model, threads, tmp, SLOTS, CTX)
        self.base = f"http://127.0.0.1:{port}/v1"
        self.model = "m"

    def stop(self):
        stop(self.proc)


def stream_raw(base, model, prompt, gen):
    """stream() with a minimal client (http.client, one line read per SSE frame, no JSON
    parsing of content frames), so the client takes as little of the machine's CPU as
    possible from the server it measures."""
    import http.client
    from urllib.parse import urlparse

    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port)
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": TEMPERATURE,
        "max_tokens": gen, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
        **NOTHING_CUT,
    })
    t0 = time.perf_counter()
    conn.request("POST", url.path + "/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = last = None
    tokens = 0
    while True:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data: [DONE]"):
            break
        if line.startswith(b'data: {"choices":[],') or b'"usage":{' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        elif line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
            now = time.perf_counter()
            first = first or now
            last = now
    conn.close()
    decode = (tokens - 1) / (last - first) if last and last > first else 0.0
    return first - t0, decode, tokens, time.perf_counter() - t0


def stream(client, model, prompt, gen):
    """One streamed chat completion: (ttft s, decode tok/s, completion tokens, wall s)."""
    if CLIENT == "raw":
        return stream_raw(client.base_url_text, model, prompt, gen)
    t0 = time.perf_counter()
    first = last = None
    pieces = 0
    usage = None
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=TEMPERATURE,
        max_tokens=gen,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, **NOTHING_CUT},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                now = time.perf_counter()
                first = first or now
                last = now
                pieces += 1
    tokens = usage.completion_tokens if usage else pieces
    decode = (tokens - 1) / (last - first) if last and last > first else 0.0
    return first - t0, decode, tokens, time.perf_counter() - t0


def concurrent(server, n, gen):
    """n streams at once: (aggregate tok/s, median ttft s)."""
    results = [None] * n

    def run(i):
        results[i] = stream(make_client(server), server.model, fresh(PROMPTS[i % len(PROMPTS)]), gen)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(r[2] for r in results) / wall, statistics.median(r[0] for r in results)


def engine_bench(model, threads, n_prompt, n_gen):
    out = subprocess.run(
        [
            str(release("examples") / "egpu_bench"), "--model", model, "--threads", str(threads),
            "--prompt", str(n_prompt), "--gen", str(n_gen), "--json",
        ],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_client(server):
    client = openai.OpenAI(base_url=server.base, api_key="none", max_retries=0)
    client.base_url_text = server.base
    return client


def measure(server, gen, streams):
    client = make_client(server)
    stream(client, server.model, fresh(PROMPTS[0]), 8)  # warm-up
    single = stream(client, server.model, fresh(PROMPTS[0]), gen)
    agg = {n: concurrent(server, n, gen) for n in streams}
    return single, agg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--llama-server", help="llama-server binary (bench/build-llama-cpp.sh)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy; above 0, sampled with nothing cut (OpenAI's meaning of top_p 1; "
                         "llama-server is told top_k 0 and min_p 0 too, which it would otherwise apply)")
    ap.add_argument("--client", choices=["openai", "raw"], default="openai",
                    help="openai: the official package, as apps use it; raw: a minimal client that "
                         "leaves the CPU to the server")
    args = ap.parse_args()
    global CLIENT, TEMPERATURE, NOTHING_CUT
    CLIENT = args.client
    TEMPERATURE = args.temperature
    NOTHING_CUT = {"top_p": 1.0, "top_k": 0, "min_p": 0.0} if args.temperature > 0 else {}
    model = str(Path(args.model).resolve())
    streams = [1, 4, 8]
    egpu_single, egpu_agg, engine, llama_single, llama_agg = [], [], [], [], []
    prompt_tokens = None
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="egpu-http-bench-") as tmp:
            server = Egpud(model, args.threads, tmp)
            try:
                single, agg = measure(server, args.gen, streams)
                egpu_single.append(single)
                egpu_agg.append(agg)
                if prompt_tokens is None:
                    c = openai.OpenAI(base_url=server.base, api_key="none")
                    r = c.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": fresh(PROMPTS[0])}], max_tokens=1
                    )
                    prompt_tokens = r.usage.prompt_tokens
            finally:
                server.stop()
            engine.append(engine_bench(model, args.threads, prompt_tokens, args.gen))
            if args.llama_server:
                server = LlamaServer(args.llama_server, model, args.threads, tmp)
                try:
                    single, agg = measure(server, args.gen, streams)
                    llama_single.append(single)
                    llama_agg.append(agg)
                finally:
                    server.stop()
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)

    med = statistics.median
    name = Path(model).name
    print(f"{name}, {args.threads} threads, {args.reps} reps (medians), chat prompt {prompt_tokens} tokens "
          f"(a new one per request), {args.gen} generated per stream, {SLOTS} slots of {CTX}, "
          f"{args.client} client, " + (f"temperature {args.temperature}, nothing cut\n" if args.temperature > 0 else "greedy\n"))
    e_decode = med(e["decode_tok_s"] for e in engine)
    e_prefill = med(prompt_tokens / e["prefill_tok_s"] for e in engine)
    h_decode = med(s[1] for s in egpu_single)
    h_ttft = med(s[0] for s in egpu_single)
    print(f"| what | egpud over HTTP ({args.client} client) | engine in-process | result | target |")
    print("|---|---|---|---|---|")
    print(f"| decode tok/s, 1 stream | {h_decode:.1f} | {e_decode:.1f} | overhead {100 * (1 - h_decode / e_decode):+.1f}% | ≤ 3% |")
    print(f"| time to first token | {h_ttft * 1e3:.1f} ms | {e_prefill * 1e3:.1f} ms (prefill) | +{(h_ttft - e_prefill) * 1e3:.1f} ms | ≤ 5 ms |")
    if llama_agg:
        print("\n| streams | egpud aggregate tok/s | llama-server aggregate tok/s | ratio | egpud TTFT | llama-server TTFT |")
        print("|---|---|---|---|---|---|")
        for n in streams:
            ea = med(a[n][0] for a in egpu_agg)
            la = med(a[n][0] for a in llama_agg)
            et = med(a[n][1] for a in egpu_agg)
            lt = med(a[n][1] for a in llama_agg)
            print(f"| {n} | {ea:.1f} | {la:.1f} | {ea / la:.2f}× | {et * 1e3:.0f} ms | {lt * 1e3:.0f} ms |")
        print(f"\nsingle-stream decode seen by the client: egpud {h_decode:.1f} tok/s, "
              f"llama-server {med(s[1] for s in llama_single):.1f} tok/s")


if __name__ == "__main__":
    main()

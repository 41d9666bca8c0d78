#!/usr/bin/env python3
"""What a JSON-schema constraint costs a decode step (issue 20): egpud's decode rate with and
without a schema on the same model, and optionally llama.cpp's llama-server doing the same with
its own grammar engine, in one run.

    cargo build --release -p egpud -p egpuctl
    python3 bench/constraint_bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --model models/gemma-3-270m-q4_k_m.gguf [--llama-server target/llama-bench/build/bin/llama-server]

The decode rate is (tokens − 1) / the time from the first token to the last, as each server
reports it (egpud: Ollama's `eval_count`/`eval_duration`; llama-server: `timings`), greedy,
one request at a time, median of --reps. The constrained request asks for a long JSON document
(an object holding an array of at least 40 short strings) so that most of its tokens are
decoded under the mask; the free one is the same prompt without a schema. The difference per
token is what computing and applying the mask costs (llguidance's mask, then −∞ outside it)."""

import argparse
import json
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_servers import start_egpud, start_llama_server, stop  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        "names": {"type": "array", "items": {"type": "string", "maxLength": 24},
                  "minItems": 40, "maxItems": 60},
    },
    "required": ["title", "count", "names"],
    "additionalProperties": False,
}
PROMPT = "Write a JSON object with a title, a count, and a list of at least forty first names."


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def egpud_rate(port, n, schema):
    body = {"model": "m", "prompt": PROMPT, "stream": False,
            "options": {"temperature": 0, "num_predict": n}}
    if schema is not None:
        body["format"] = schema
    out = post(f"http://127.0.0.1:{port}/api/generate", body)
    if schema is not None and out.get("done_reason") == "stop":
        json.loads(out["response"])  # a finished constrained answer that does not parse is a bug
    return (out["eval_count"] - 1) / (out["eval_duration"] / 1e9), out["eval_count"]


def llama_rate(port, n, schema):
    body = {"prompt": PROMPT, "n_predict": n, "temperature": 0, "cache_prompt": False}
    if schema is not None:
        body["json_schema"] = schema
    out = post(f"http://127.0.0.1:{port}/completion", body)
    t = out["timings"]
    return t["predicted_per_second"], t["predicted_n"]


def measure(rate, port, n, reps):
    rows = {}
    for name, schema in (("free", None), ("schema", SCHEMA)):
        rate(port, 8, schema)  # warm-up (and the schema's first compile)
        runs = [rate(port, n, schema) for _ in range(reps)]
        rows[name] = (statistics.median(r for r, _ in runs), statistics.median(t for _, t in runs))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--llama-server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print("| model | server | free decode tok/s | with schema tok/s | schema/free | tokens (free, schema) |")
    print("|---|---|---|---|---|---|")
    for model in args.model:
        servers = [("egpud", lambda tmp: start_egpud(model, args.threads, tmp, 1, 2048)[:2], egpud_rate)]
        if args.llama_server:
            servers.append(("llama-server", lambda tmp: start_llama_server(
                args.llama_server, model, args.threads, tmp, 1, 2048), llama_rate))
        for name, start, rate in servers:
            with tempfile.TemporaryDirectory() as tmp:
                proc, port = start(tmp)
                try:
                    rows = measure(rate, port, args.tokens, args.reps)
                finally:
                    stop(proc)
            (free, free_n), (con, con_n) = rows["free"], rows["schema"]
            print(f"| {Path(model).name} | {name} | {free:.1f} | {con:.1f} | {con / free:.2f} "
                  f"| {free_n:.0f}, {con_n:.0f} |", flush=True)


if __name__ == "__main__":
    main()

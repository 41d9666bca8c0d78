#!/usr/bin/env python3
"""What a JSON-schema constraint costs a decode step (issue 20): egpud's decode rate with and
without a schema on the same model, and optionally llama.cpp's llama-server doing the same with
its own grammar engine, in one run.

    cargo build --release -p egpud -p egpuctl && cargo build --release -p egpu-engine --example with_template
    python3 bench/constraint_bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --model models/gemma-3-270m-q4_k_m.gguf [--llama-server target/llama-bench/build/bin/llama-server] \\
        [--tools-template models/templates/Qwen-Qwen2.5-7B-Instruct.jinja]

The decode rate is (tokens − 1) / the time from the first token to the last, as each server
reports it (egpud: Ollama's `eval_count`/`eval_duration`; llama-server: `timings`), greedy,
one request at a time, median of --reps. The constrained request asks for a long JSON document
(an object holding an array of at least 40 short strings) so that most of its tokens are
decoded under the mask; the free one is the same prompt without a schema. The difference per
token is what computing and applying the mask costs (llguidance's mask, then −∞ outside it).

With --tools-template (a chat template that renders tools, e.g. models/templates/
Qwen-Qwen2.5-7B-Instruct.jinja), a second table: chat with two tools offered, `tool_choice`
auto, against the same chat without tools, on a copy of each model wearing that template
(`with_template` example). egpud constrains auto answers with a lazy grammar (free text, a
schema-checked call once `<tool_call>` starts), so every token of a text answer is masked;
llama-server (started with --jinja and the template) applies its lazy grammar only after the
trigger."""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_servers import release, start_egpud, start_llama_server, stop  # noqa: E402

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
CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                       "required": ["zone"]}}},
]


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


def egpud_chat_rate(port, n, tools):
    body = {"model": "m", "messages": CHAT, "stream": False,
            "options": {"temperature": 0, "num_predict": n}}
    if tools is not None:
        body["tools"] = tools
    out = post(f"http://127.0.0.1:{port}/api/chat", body)
    return (out["eval_count"] - 1) / (out["eval_duration"] / 1e9), out["eval_count"]


def llama_chat_rate(port, n, tools):
    body = {"messages": CHAT, "max_tokens": n, "temperature": 0, "cache_prompt": False}
    if tools is not None:
        body["tools"] = tools
        body["tool_choice"] = "auto"
    out = post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
    t = out["timings"]
    return t["predicted_per_second"], t["predicted_n"]


def measure(rate, port, n, reps, cases=None):
    rows = {}
    for name, schema in cases or (("free", None), ("schema", SCHEMA)):
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
    ap.add_argument("--tools-template", help="a chat template that renders tools (second table)")
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
    if args.tools_template:
        tools_table(args)


def tools_table(args):
    print()
    print("| model | server | chat, no tools tok/s | chat, tools auto tok/s | tools/none | tokens (none, tools) |")
    print("|---|---|---|---|---|---|")
    cases = (("free", None), ("tools", TOOLS))
    for model in args.model:
        with tempfile.TemporaryDirectory() as tmp:
            dressed = str(Path(tmp) / "with-tool-template.gguf")
            subprocess.run([str(release("examples/with_template")), model,
                            args.tools_template, dressed], check=True)
            servers = [("egpud", lambda t: start_egpud(dressed, args.threads, t, 1, 2048)[:2],
                        egpud_chat_rate)]
            if args.llama_server:
                servers.append(("llama-server", lambda t: start_llama_server(
                    args.llama_server, dressed, args.threads, t, 1, 2048,
                    extra=("--jinja", "--chat-template-file", args.tools_template)),
                    llama_chat_rate))
            for name, start, rate in servers:
                proc, port = start(tmp)
                try:
                    rows = measure(rate, port, args.tokens, args.reps, cases)
                finally:
                    stop(proc)
                (free, free_n), (con, con_n) = rows["free"], rows["tools"]
                print(f"| {Path(model).name} | {name} | {free:.1f} | {con:.1f} | {con / free:.2f} "
                      f"| {free_n:.0f}, {con_n:.0f} |", flush=True)


if __name__ == "__main__":
    main()

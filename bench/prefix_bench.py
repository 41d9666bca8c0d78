#!/usr/bin/env python3
"""A chat's next turn, measured: time to first token when an app resends a ~1,500-token
conversation plus one new message, against a cold prefill of the same request, on egpud (gRPC
and HTTP) and on llama.cpp's llama-server (which keeps each slot's prompt cache), same model,
same machine, same run. The servers take turns (never both running).

    cargo build --release -p egpud -p egpuctl
    bench/build-llama-cpp.sh                      # llama-server from llama-cpp-python's llama.cpp
    PYTHONPATH=$(scripts/python-deps.sh) python3 bench/prefix_bench.py \\
        --llama-server target/llama-bench/build/bin/llama-server [--threads 2] [--reps 3]

Per repetition and per way in, three requests with the same shape:
- cold: the next-turn request of a conversation no server has seen (a unique tag in the system
  message), so all of it is prefilled;
- previous turn: the conversation without its last exchange, answered (`--answer` tokens, EOS
  ignored, greedy) — this is what leaves the conversation in a slot;
- next turn: that conversation, the answer as the assistant's message, and a new user message.
TTFT is the client's: from sending the request to the first streamed token. Prints a markdown
table for BENCHMARKS.md; speed is measured here, never asserted in tests.
"""

import argparse
import http.client
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from local_servers import start_egpud, start_llama_server, stop  # bench/ is the script's folder, on sys.path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "clients" / "python"))
import egpu_client  # noqa: E402  (generates and imports the stubs)

import grpc  # noqa: E402

pb, pb_grpc = egpu_client.load_stubs()

SLOTS = 2
CTX = 2048
TOPICS = [
    "the water cycle", "how bridges carry loads", "the history of paper", "why leaves change colour",
    "how a refrigerator works", "the life of honey bees", "how compilers optimise loops",
    "the tides and the moon", "how vaccines train the immune system", "the invention of the telescope",
]
_tags = itertools.count()





def conversation(exchanges):
    """A system message with a unique tag, then `exchanges` user/assistant pairs of ~120 words
    each, then a user question: deterministic text, different for every tag."""
    tag = next(_tags)
    messages = [{"role": "system", "content": f"Session {tag}. You are a patient teacher who answers clearly."}]
    for i in range(exchanges):
        topic = TOPICS[(tag + i) % len(TOPICS)]
        question = (f"Please explain {topic} to me. I am a curious adult without a science background, "
                    f"and I would like to understand the main ideas, a few numbers that give a sense of scale, "
                    f"and one common misunderstanding about {topic} that people often repeat.")
        answer = " ".join(
            f"Point {k + 1} about {topic}: it helps to picture the process step by step, to compare it with "
            f"something familiar at home, and to remember that small effects add up over time."
            for k in range(4)
        )
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": f"Thank you. Now summarise {TOPICS[tag % len(TOPICS)]} in two sentences."})
    return messages


def next_turn(messages, answer):
    return messages + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Good. Which of those ideas matters most, and why?"},
    ]


class Http:
    """Streamed OpenAI chat completions with a minimal client (no JSON parsing of content frames)."""

    def __init__(self, port, model):
        self.port, self.model = port, model

    def chat(self, messages, max_tokens):
        """(ttft s, text, prompt tokens, cached tokens or None)"""
        conn = http.client.HTTPConnection("127.0.0.1", self.port)
        body = json.dumps({
            "model": self.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "cache_prompt": True,
        })
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        ttft, text, usage = None, [], {}
        for line in resp:
            if line.startswith(b"data: [DONE]"):
                break
            if not line.startswith(b"data: "):
                continue
            frame = json.loads(line[6:])
            if frame.get("usage"):
                usage = frame["usage"]
            for choice in frame.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    ttft = ttft or time.perf_counter() - t0
                    text.append(content)
        conn.close()
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return ttft, "".join(text), usage.get("prompt_tokens"), cached


class Grpc:
    def __init__(self, stub, model):
        self.stub, self.model = stub, model

    def chat(self, messages, max_tokens):
        request = pb.GenerateRequest(
            model=self.model,
            messages=pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]),
            max_tokens=max_tokens, stop_at_eos=False,
        )
        t0 = time.perf_counter()
        ttft, text, done = None, [], None
        for event in self.stub.Generate(request):
            if event.HasField("chunk"):
                if event.chunk.token_ids and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(event.chunk.text)
            if event.HasField("done"):
                done = event.done
        return ttft, "".join(text), done.prompt_tokens, done.cached_prompt_tokens


def measure(client, exchanges, answer_tokens):
    """(cold ttft, next-turn ttft, next-turn prompt tokens, cached tokens)"""
    cold_messages = next_turn(conversation(exchanges), "A short answer. " * (answer_tokens // 4))
    cold, _, _, _ = client.chat(cold_messages, 4)
    previous = conversation(exchanges)
    _, answer, _, _ = client.chat(previous, answer_tokens)
    warm, _, prompt, cached = client.chat(next_turn(previous, answer), 4)
    return cold, warm, prompt, cached


class Egpud:
    def __init__(self, model, threads, tmp):
        self.proc, port, sock = start_egpud(model, threads, tmp, SLOTS, CTX)
        self.channel = grpc.insecure_channel(f"unix:{sock}", options=[("grpc.default_authority", "localhost")])
        self.http = Http(port, "m")
        self.grpc = Grpc(pb_grpc.EgpuStub(self.channel), "m")

    def stop(self):
        self.channel.close()
        stop(self.proc)


class LlamaServer:
    def __init__(self, binary, model, threads, tmp):
        self.proc, port = start_llama_server(binary, model, threads, tmp, SLOTS, CTX)
        self.http = Http(port, "m")

    def stop(self):
        stop(self.proc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--llama-server", help="llama-server binary (bench/build-llama-cpp.sh)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--exchanges", type=int, default=6, help="user/assistant pairs before the last question")
    ap.add_argument("--answer", type=int, default=48, help="tokens of the previous turn's answer")
    args = ap.parse_args()
    model = str(Path(args.model).resolve())
    rows = {}
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="egpu-prefix-bench-") as tmp:
            server = Egpud(model, args.threads, tmp)
            try:
                rows.setdefault("egpud, gRPC", []).append(measure(server.grpc, args.exchanges, args.answer))
                rows.setdefault("egpud, HTTP", []).append(measure(server.http, args.exchanges, args.answer))
            finally:
                server.stop()
            if args.llama_server:
                server = LlamaServer(args.llama_server, model, args.threads, tmp)
                try:
                    rows.setdefault("llama-server, HTTP", []).append(measure(server.http, args.exchanges, args.answer))
                finally:
                    server.stop()
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)

    med = statistics.median
    prompt = rows["egpud, gRPC"][0][2]
    print(f"{Path(model).name}, {args.threads} threads, {args.reps} reps (medians): next turn of a "
          f"{prompt}-token conversation (previous answer {args.answer} tokens, greedy)\n")
    print("| server | cold TTFT | next-turn TTFT | next turn / cold | prompt tokens reused |")
    print("|---|---|---|---|---|")
    for name, runs in rows.items():
        cold, warm = med(r[0] for r in runs), med(r[1] for r in runs)
        cached = runs[-1][3]
        reused = f"{cached} of {runs[-1][2]}" if cached is not None else "not reported"
        print(f"| {name} | {cold * 1e3:.0f} ms | {warm * 1e3:.1f} ms | {100 * warm / cold:.1f}% | {reused} |")
    if "llama-server, HTTP" in rows:
        ls = med(r[1] for r in rows["llama-server, HTTP"])
        for name in ("egpud, gRPC", "egpud, HTTP"):
            print(f"\n{name} next-turn TTFT vs llama-server's: {ls / med(r[1] for r in rows[name]):.2f}× faster", end="")
        print()


if __name__ == "__main__":
    main()

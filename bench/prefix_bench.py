#!/usr/bin/env python3
"""A chat's next turn, measured: time to first token when an app resends a ~1,500-token
conversation plus one new message, against a cold prefill of the same request, on egpud (gRPC
and HTTP) and on llama.cpp's llama-server (which keeps each slot's prompt cache), same model,
same machine, same run. The servers take turns (never both running).

    cargo build --release -p egpud -p egpuctl
    bench/build-llama-cpp.sh                      # llama-server from llama-cpp-python's llama.cpp
    PYTHONPATH=$(scripts/python-deps.sh) python3 bench/prefix_bench.py \\
        --llama-server target/llama-bench/build/bin/llama-server [--threads 2] [--reps 3]
        [--shared-system 800 --exchanges 2]     # two conversations with one long system prompt, in turns

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


def system_prompt(words):
    """A long system prompt (about 1.3 tokens a word), unique per call."""
    tag = next(_tags)
    rules = [f"Rule {k + 1} of session {tag}: when the user asks about {TOPICS[k % len(TOPICS)]}, start from "
             f"what they already know, use one concrete example, and end with a question they can try."
             for k in range(words // 30 + 1)]
    return " ".join(rules)


def shared_system(client, words, exchanges, answer_tokens):
    """Two conversations, X and Y, with the same long system prompt and their own exchanges, in
    turns X1, Y1, X2, Y2 (two slots), as two apps built on one assistant prompt: TTFT of Y1 (a
    new conversation whose system prompt another slot holds), X2 and Y2 (next turns after the
    other conversation's), and of a cold request of the same shape. (ttfts, cached per request)"""
    system = system_prompt(words)

    def first(tag_offset):
        messages = conversation(exchanges)
        messages[0] = {"role": "system", "content": f"{system} Conversation {tag_offset}."}
        return messages

    cold_system = system_prompt(words)
    cold_messages = first(0)
    cold_messages[0] = {"role": "system", "content": f"{cold_system} Conversation 0."}
    cold, _, _, _ = client.chat(cold_messages, 4)
    x1, y1 = first(1), first(2)
    _, x_answer, _, _ = client.chat(x1, answer_tokens)
    y1_ttft, y_answer, _, y1_cached = client.chat(y1, answer_tokens)
    x2_ttft, _, _, x2_cached = client.chat(next_turn(x1, x_answer), 4)
    y2_ttft, _, y2_prompt, y2_cached = client.chat(next_turn(y1, y_answer), 4)
    return (cold, y1_ttft, x2_ttft, y2_ttft), (y1_cached, x2_cached, y2_cached, y2_prompt)


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
    ap.add_argument("--shared-system", type=int, default=0, metavar="WORDS",
                    help="instead: two conversations with one system prompt of WORDS words, in turns (X1, Y1, X2, Y2)")
    args = ap.parse_args()
    model = str(Path(args.model).resolve())
    if args.shared_system:
        return shared_system_main(args, model)
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


def shared_system_main(args, model):
    runs = {}
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="egpu-prefix-bench-") as tmp:
            server = Egpud(model, args.threads, tmp)
            try:
                runs.setdefault("egpud, gRPC", []).append(
                    shared_system(server.grpc, args.shared_system, args.exchanges, args.answer))
            finally:
                server.stop()
            if args.llama_server:
                server = LlamaServer(args.llama_server, model, args.threads, tmp)
                try:
                    runs.setdefault("llama-server, HTTP", []).append(
                        shared_system(server.http, args.shared_system, args.exchanges, args.answer))
                finally:
                    server.stop()
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    med = statistics.median
    y2_prompt = runs["egpud, gRPC"][0][1][3]
    print(f"{Path(model).name}, {args.threads} threads, {args.reps} reps (medians), {SLOTS} slots: two conversations "
          f"with one system prompt of {args.shared_system} words, {args.exchanges} exchanges each, in turns X1, Y1, "
          f"X2, Y2 (Y2: {y2_prompt} prompt tokens)\n")
    print("| server | cold TTFT | Y1 (new, shared system prompt) | X2 (next turn after Y1) | Y2 | tokens reused Y1 / X2 / Y2 |")
    print("|---|---|---|---|---|---|")
    for name, rs in runs.items():
        ttft = [med(r[0][i] for r in rs) for i in range(4)]
        cached = rs[-1][1]
        cells = " | ".join(f"{t * 1e3:.0f} ms ({100 * t / ttft[0]:.0f}%)" for t in ttft[1:])
        reused = " / ".join("?" if c is None else str(c) for c in cached[:3])
        print(f"| {name} | {ttft[0] * 1e3:.0f} ms | {cells} | {reused} |")


if __name__ == "__main__":
    main()

"""Tool calling through egpud as apps do it, with the official `openai` and `ollama` packages:
a call forced by `tool_choice` (required, or a named function), streamed and not, whose
arguments must validate against the tool's schema (`jsonschema`); `auto` streamed and not, the
same answer both ways; the tool's result sent back
in a `tool` message and an answer; and the errors for bad tool requests. The models are random
as far as tools go (SmolLM2 wearing another family's template), so this checks the protocol,
not the model's judgement.

    python3 tools_check.py --base-url http://127.0.0.1:PORT/v1 --key KEY --hermes NAME --llama NAME --plain NAME
"""

import argparse
import json

import jsonschema
import ollama
import openai

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 30}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(name, arguments_text):
    """A call names one of the tools and its arguments validate against that tool's schema."""
    assert name in SCHEMAS, name
    arguments = json.loads(arguments_text)
    jsonschema.validate(arguments, SCHEMAS[name])
    return {"name": name, "arguments": arguments}


def stream_chat(client, **request):
    """A streamed chat completion read to its end: its content deltas, its calls assembled from
    their deltas (index -> name and arguments text) and its finish reasons."""
    deltas, calls, finishes = [], {}, []
    for chunk in client.chat.completions.create(stream=True, **request):
        for c in chunk.choices:
            if c.delta.content:
                deltas.append(c.delta.content)
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    return deltas, calls, finishes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--hermes", required=True)
    ap.add_argument("--llama", required=True)
    ap.add_argument("--plain", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.key, max_retries=0)
    out = {}

    for family, model in (("hermes", args.hermes), ("llama", args.llama)):
        # Required: one call, whole.
        chat = client.chat.completions.create(
            model=model, messages=QUESTION, tools=TOOLS, tool_choice="required",
            temperature=0, max_tokens=96,
        )
        choice = chat.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id, call
        out[f"{family}_required"] = check_call(call.function.name, call.function.arguments)

        # A named function, sampled: that function, valid arguments, whatever the seed.
        for seed in (1, 2, 3):
            chat = client.chat.completions.create(
                model=model, messages=QUESTION, tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "get_time"}},
                temperature=1.2, seed=seed, max_tokens=96,
            )
            [call] = chat.choices[0].message.tool_calls
            assert call.function.name == "get_time", call
            check_call(call.function.name, call.function.arguments)

        # Streamed: the call arrives as tool_calls deltas, then finish_reason tool_calls.
        _, calls, finishes = stream_chat(
            client, model=model, messages=QUESTION, tools=TOOLS, tool_choice="required",
            temperature=0, max_tokens=96,
        )
        assert finishes == ["tool_calls"], finishes
        assert list(calls) == [0], calls
        streamed = check_call(calls[0]["name"], calls[0]["arguments"])
        assert streamed == out[f"{family}_required"], (streamed, out)

        # The round trip: the call, the tool's result, and an answer in text.
        first = client.chat.completions.create(
            model=model, messages=QUESTION, tools=TOOLS, tool_choice="required",
            temperature=0, max_tokens=96,
        ).choices[0].message
        call = first.tool_calls[0]
        history = QUESTION + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})},
        ]
        answer = client.chat.completions.create(
            model=model, messages=history, tools=TOOLS, tool_choice="none",
            temperature=0, max_tokens=24,
        ).choices[0]
        assert answer.message.tool_calls is None, answer
        assert isinstance(answer.message.content, str) and answer.message.content, answer
        out[f"{family}_answer"] = answer.message.content
        # With auto the model may answer or call again; either way the reply is well formed.
        auto = client.chat.completions.create(
            model=model, messages=history, tools=TOOLS, temperature=0, max_tokens=48,
        ).choices[0]
        for c in auto.message.tool_calls or []:
            assert c.function.name in SCHEMAS, c
        out[f"{family}_auto"] = auto.finish_reason

        # Streamed with auto: text streams as it is written (several content deltas before the
        # end), a call arrives whole; either way the same answer as the whole response.
        for messages in (QUESTION, history):
            whole = client.chat.completions.create(
                model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=48,
            ).choices[0]
            deltas, calls, finishes = stream_chat(
                client, model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=48,
            )
            assert finishes == [whole.finish_reason], (finishes, whole)
            assert "".join(deltas).strip() == (whole.message.content or "").strip(), (deltas, whole)
            expected = [
                {"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                for c in whole.message.tool_calls or []
            ]
            got = [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls.values()]
            assert got == expected, (got, expected)
            kind = "calls" if expected else "text"
            out.setdefault("streamed_auto", []).append(
                {"family": family, "kind": kind, "content_deltas": len(deltas)}
            )

    # Ollama's tools on /api/chat: the same tools and a tool result in Ollama's shapes.
    host = args.base_url.removesuffix("/v1")
    o = ollama.Client(host=host, headers={"Authorization": f"Bearer {args.key}"})
    reply = o.chat(model=args.hermes, messages=QUESTION, tools=TOOLS,
                   options={"temperature": 0, "num_predict": 64})
    for c in reply.message.tool_calls or []:
        check_call(c.function.name, json.dumps(dict(c.function.arguments)))
    history = QUESTION + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "content": json.dumps({"temperature": 18}), "tool_name": "get_weather"},
    ]
    reply = o.chat(model=args.hermes, messages=history, tools=TOOLS,
                   options={"temperature": 0, "num_predict": 24})
    assert isinstance(reply.message.content, str), reply
    out["ollama"] = reply.done_reason

    # Streamed on /api/chat with tools: the same answer as unstreamed, text as it comes.
    for messages in (QUESTION, history):
        options = {"temperature": 0, "num_predict": 48}
        whole = o.chat(model=args.hermes, messages=messages, tools=TOOLS, options=options)
        parts, calls = [], []
        for part in o.chat(model=args.hermes, messages=messages, tools=TOOLS, options=options,
                           stream=True):
            if part.message.content:
                parts.append(part.message.content)
            calls += [(c.function.name, dict(c.function.arguments)) for c in part.message.tool_calls or []]
        assert "".join(parts).strip() == whole.message.content.strip(), (parts, whole)
        expected = [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls or []]
        assert calls == expected, (calls, expected)
        out.setdefault("ollama_streamed", []).append(
            {"kind": "calls" if expected else "text", "content_parts": len(parts)}
        )

    # Errors that name the problem.
    errors = {}
    for label, model, extra in (
        ("unknown_tool", args.hermes, {"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        ("no_tool_template", args.plain, {"tool_choice": "required"}),
        ("bad_choice", args.hermes, {"tool_choice": "sometimes"}),
    ):
        try:
            client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS, max_tokens=8, **extra)
            errors[label] = None
        except openai.BadRequestError as e:
            errors[label] = str(e)
    out["errors"] = errors
    print(json.dumps(out))


if __name__ == "__main__":
    main()

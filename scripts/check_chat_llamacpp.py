#!/usr/bin/env python3
"""Compare the chat-template fixtures (transformers' rendering) with llama.cpp's renderers.

For every case in engine/tests/fixtures/chat/*.json this renders the conversation two more ways,
through llama-cpp-python, and reports where they differ from transformers:

  jinja:   llama_cpp.llama_chat_format.Jinja2ChatFormatter, the Jinja2 path llama-cpp-python
           uses for a GGUF's template.
  builtin: llama.cpp's C `llama_chat_apply_template`, which does not run the template but
           recognises well-known formats from its text and formats them in C++.

What it found with llama-cpp-python 0.3.36 (transformers 5.24.0 fixtures):
  - jinja agrees on every SmolLM2 and Gemma 3 case. On features.json it differs only in
    `documents is none`: llama-cpp-python does not pass `documents`, so it is undefined there.
  - builtin ignores the template's own logic: for SmolLM2 it omits the default system prompt the
    template adds when there is none; for Gemma 3 it leaves `<bos>` to the tokenizer, trims the
    system prompt, drops an empty one, trims only ASCII whitespace, and never raises on
    non-alternating roles.

It is a diagnostic, not a test: differences are expected where llama.cpp deliberately departs
from transformers, and the script exits 0 whatever it finds. Run it in a venv that has
llama-cpp-python (which builds llama.cpp from source):

    python3 -m venv /tmp/venv-llama && /tmp/venv-llama/bin/pip install llama-cpp-python
    /tmp/venv-llama/bin/python scripts/check_chat_llamacpp.py
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

FIXTURES = Path(__file__).resolve().parent.parent / "engine" / "tests" / "fixtures" / "chat"


def render_jinja(fixture: dict, case: dict) -> str:
    formatter = Jinja2ChatFormatter(
        template=fixture["chat_template"],
        eos_token=fixture["eos_token"],
        bos_token=fixture["bos_token"],
        add_generation_prompt=case["add_generation_prompt"],
    )
    try:
        return formatter(messages=case["messages"]).prompt
    except ValueError as raised:  # its raise_exception raises ValueError
        return f"<raises {raised}>"


def render_builtin(fixture: dict, case: dict) -> str:
    messages = case["messages"]
    keep_alive = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=role, content=content) for role, content in keep_alive]
    )
    template = fixture["chat_template"].encode()
    size = 1 << 16
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(template, chat, len(messages), case["add_generation_prompt"], buf, size)
    if n < 0:
        return "<unsupported template>"
    return buf.raw[:n].decode("utf-8", errors="replace")


def expected_of(case: dict) -> str:
    return case["expected"] if "expected" in case else f"<raises {case['raises']}>"


def first_difference(expected: str, got: str, context: int = 40) -> str:
    """Where two renderings part, with a little text either side, for long outputs."""
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    start = max(0, at - context)
    return (
        f"at character {at}:\n"
        f"      transformers: {expected[start:at + context]!r}\n"
        f"      llama.cpp:    {got[start:at + context]!r}"
    )


def main() -> None:
    for path in sorted(FIXTURES.glob("*.json")):
        fixture = json.loads(path.read_text(encoding="utf-8"))
        print(f"== {path.name} ({len(fixture['cases'])} cases)")
        for renderer_name, renderer in (("jinja", render_jinja), ("builtin", render_builtin)):
            differing = []
            for case in fixture["cases"]:
                got = renderer(fixture, case)
                if got != expected_of(case):
                    differing.append((case["name"], expected_of(case), got))
            print(f"  {renderer_name}: {len(fixture['cases']) - len(differing)} agree, {len(differing)} differ")
            for name, expected, got in differing:
                print(f"    {name}: {first_difference(expected, got)}")


if __name__ == "__main__":
    main()

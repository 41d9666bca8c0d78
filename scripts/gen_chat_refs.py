#!/usr/bin/env python3
"""Generate the chat-template reference fixtures in engine/tests/fixtures/chat/.

Each fixture holds a chat template, the bos/eos token strings it is rendered with, and a list of
conversations together with what Hugging Face transformers renders for them (or the message of
the exception the template raises). `engine/tests/chat_template.rs` checks that egpu's renderer
produces the same bytes.

Rendering goes through `transformers.utils.chat_template_utils.render_jinja_template`, the
function `PreTrainedTokenizerBase.apply_chat_template` calls, with the same keyword arguments
it passes: the messages, `add_generation_prompt`, `tools=None`, `documents=None` and the
tokenizer's special tokens (here `bos_token` and `eos_token`).

Templates and token strings come from the GGUF files with gguf-py:
  - smollm2-135m-instruct.json: SmolLM2-135M-Instruct.Q4_1.gguf carries its template.
  - gemma-3-270m.json: gemma-3-270m-q4_k_m.gguf carries no `tokenizer.chat_template`, so the
    Gemma 3 instruct template is read from engine/src/chat/gemma3.jinja (the built-in egpu uses)
    (the template published with google/gemma-3-270m-it); bos/eos still come from the GGUF.
  - features.json: features.chat_template.jinja, a synthetic template that exercises tojson,
    Python string methods, namespace, loop controls and the other helpers transformers provides.

Run (transformers needs no torch for this; any venv with these packages will do):

    python3 -m venv /tmp/venv-chat
    /tmp/venv-chat/bin/pip install transformers jinja2 gguf
    scripts/fetch-models.sh
    /tmp/venv-chat/bin/python scripts/gen_chat_refs.py [--models DIR]

DIR defaults to $EGPU_MODELS, else ./models. The output is deterministic for a given
transformers/jinja2 version (the versions are recorded in each fixture), except that
features.json renders `strftime_now('%%Y')`, which is a literal "%Y" whatever the date.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import gguf
import jinja2
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "engine" / "tests" / "fixtures" / "chat"

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict:
    return {"role": "system", "content": content}


# Content that stresses escaping and whitespace handling. "\x1c".."\x1f" are whitespace to
# Python's str.strip() (and so to Jinja's `trim`) but not to Rust's char::is_whitespace.
UNICODE_TEXT = "Grüße, 世界! 👋🏽 Ünïcödé — “curly” ‘quotes’ and\u2028line separator"
QUOTES_TEXT = 'He said "hi" and \'bye\'; back\\slash, tab\there, </script> & <b>'
NEWLINES_TEXT = "line one\nline two\r\nline three\n\n\nafter blank lines"
PADDED_TEXT = "\x1f\t  padded with whitespace \u00a0\n \x1c"
TEMPLATE_LOOKALIKE = "{{ bos_token }} {% if true %}not a block{% endif %} {# nor a comment #}"

# Conversations shared by the two model templates: (name, messages, add_generation_prompt).
COMMON_CASES = [
    ("single_user_generation_prompt", [user("Hello!")], True),
    ("single_user_no_generation_prompt", [user("Hello!")], False),
    ("system_and_user", [system("You are terse."), user("What is 2+2?")], True),
    (
        "multi_turn",
        [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke.")],
        True,
    ),
    (
        "multi_turn_ending_with_assistant",
        [
            system("Answer in French."),
            user("Good morning"),
            assistant("Bonjour"),
            user("Thanks"),
            assistant("De rien"),
        ],
        False,
    ),
    ("unicode_and_emoji", [user(UNICODE_TEXT), assistant("🙂"), user("ok")], True),
    ("quotes_and_backslashes", [user(QUOTES_TEXT)], True),
    ("newlines", [system("sys\nprompt\n"), user(NEWLINES_TEXT)], True),
    ("surrounding_whitespace", [user(PADDED_TEXT), assistant("  spaced  "), user(" x ")], True),
    ("empty_content", [user("")], True),
    ("empty_system_and_assistant", [system(""), user("q"), assistant(""), user("")], False),
    ("template_syntax_in_content", [user(TEMPLATE_LOOKALIKE)], True),
    ("special_tokens_in_content", [user("<|im_start|>user <start_of_turn> <bos> <eos> <|im_end|>")], True),
    ("system_only", [system("Only a system message.")], True),
]

GEMMA_ONLY_CASES = [
    # Gemma's template insists on user/model alternation after the optional system message.
    ("raises_two_users_in_a_row", [user("one"), user("two")], True),
    ("raises_assistant_first", [assistant("I speak first"), user("hi")], True),
    ("raises_after_system", [system("s"), assistant("a")], False),
]

SMOLLM_ONLY_CASES = [
    # SmolLM's ChatML template writes any role name as given.
    ("other_roles", [user("call it"), {"role": "tool", "content": '{"ok": true}'}], True),
    ("two_users_in_a_row", [user("one"), user("two")], True),
]

FEATURE_CASES = [
    ("basic", [system("Be kind."), user("Hi, there!"), assistant("Hello!")], True),
    ("unicode_and_escapes", [user(UNICODE_TEXT), assistant(QUOTES_TEXT), user("control \x01\x7f end")], False),
    ("whitespace", [user(PADDED_TEXT), user(NEWLINES_TEXT), user("a,,b, c ,")], True),
    ("raises", [user("fine"), {"role": "boom", "content": "stop here"}], True),
]


def models_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("EGPU_MODELS"):
        return Path(os.environ["EGPU_MODELS"])
    return REPO / "models"


def read_gguf_chat_fields(path: Path) -> tuple[str | None, str, str]:
    """The GGUF's chat template (None when absent) and the text of its bos and eos tokens."""
    if not path.is_file():
        sys.exit(f"{path} is missing: run scripts/fetch-models.sh (or pass --models DIR)")
    reader = gguf.GGUFReader(path)

    def field_str(field) -> str:
        return bytes(field.parts[field.data[0]]).decode("utf-8")

    template_field = reader.fields.get("tokenizer.chat_template")
    template = field_str(template_field) if template_field is not None else None
    tokens = reader.fields["tokenizer.ggml.tokens"]

    def token_text(key: str) -> str:
        token_id = int(reader.fields[key].parts[reader.fields[key].data[0]][0])
        return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8")

    return template, token_text("tokenizer.ggml.bos_token_id"), token_text("tokenizer.ggml.eos_token_id")


def render_case(template: str, bos: str, eos: str, name: str, messages: list, add_generation_prompt: bool) -> dict:
    case = {"name": name, "messages": messages, "add_generation_prompt": add_generation_prompt}
    try:
        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
        )
        case["expected"] = rendered[0]
    except jinja2.exceptions.TemplateSyntaxError:
        raise  # a fixture template that does not compile is a bug in this script
    except jinja2.exceptions.TemplateError as raised:
        # raise_exception() raises a bare TemplateError carrying the template's message.
        case["raises"] = raised.message
    return case


def write_fixture(file_name: str, model: str, gguf_template: str | None, template: str, template_origin: str,
                  bos: str, eos: str, cases: list) -> None:
    fixture = {
        "generated_by": "scripts/gen_chat_refs.py",
        "transformers_version": transformers.__version__,
        "jinja2_version": jinja2.__version__,
        "model_file": model,
        "gguf_chat_template": gguf_template,
        "template_origin": template_origin,
        "chat_template": template,
        "bos_token": bos,
        "eos_token": eos,
        "cases": [render_case(template, bos, eos, *case) for case in cases],
    }
    out = FIXTURES / file_name
    out.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    raised = sum("raises" in c for c in fixture["cases"])
    print(f"wrote {out.relative_to(REPO)}: {len(cases)} cases ({raised} raise)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="folder holding the GGUF files (default $EGPU_MODELS or ./models)")
    args = parser.parse_args()
    models = models_dir(args.models)

    smollm_template, smollm_bos, smollm_eos = read_gguf_chat_fields(models / SMOLLM_FILE)
    if smollm_template is None:
        sys.exit(f"{SMOLLM_FILE} has no tokenizer.chat_template; is it the right file?")
    write_fixture("smollm2-135m-instruct.json", SMOLLM_FILE, smollm_template, smollm_template,
                  "gguf", smollm_bos, smollm_eos, COMMON_CASES + SMOLLM_ONLY_CASES)

    gemma_gguf_template, gemma_bos, gemma_eos = read_gguf_chat_fields(models / GEMMA_FILE)
    gemma_template = (REPO / "engine" / "src" / "chat" / "gemma3.jinja").read_text(encoding="utf-8")
    write_fixture("gemma-3-270m.json", GEMMA_FILE, gemma_gguf_template, gemma_gguf_template or gemma_template,
                  "gguf" if gemma_gguf_template else "gemma-3-it.chat_template.jinja", gemma_bos, gemma_eos,
                  COMMON_CASES + GEMMA_ONLY_CASES)

    features_template = (FIXTURES / "features.chat_template.jinja").read_text(encoding="utf-8")
    write_fixture("features.json", None, None, features_template, "features.chat_template.jinja",
                  "<s>", "</s>", FEATURE_CASES)


if __name__ == "__main__":
    main()

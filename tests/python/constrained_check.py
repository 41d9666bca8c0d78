"""Structured output through egpud as apps ask for it: the official `openai` package's
`response_format` (json_schema and json_object) and the `ollama` package's `format`, every
answer parsed and validated with the `jsonschema` package.

For each model, each schema below is asked for greedily and sampled (temperature 1, two seeds);
each answer must parse as JSON and validate against its schema. Prints one JSON object: how
many answers there were, how many were valid, the failures, the greedy answers (for the Rust
test to compare across backends) and the errors for bad schemas.

    python3 constrained_check.py --base-url http://127.0.0.1:PORT/v1 --key KEY --model NAME [--model NAME2]
"""

import argparse
import json

import jsonschema
import ollama
import openai

# What apps ask for: nested objects, arrays with bounds, enums, required and optional
# properties, numbers with ranges, strings with patterns and lengths, anyOf.
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 12},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                        "price": {"type": "number", "minimum": 0, "maximum": 1000},
                    },
                    "required": ["sku", "quantity", "price"],
                    "additionalProperties": False,
                },
            },
            "status": {"enum": ["new", "paid", "shipped"]},
        },
        "required": ["id", "items", "status"],
        "additionalProperties": False,
    },
    "shape": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "exclusiveMinimum": 0}},
                "required": ["kind", "radius"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "kind": {"const": "rect"},
                    "size": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 99},
                             "minItems": 2, "maxItems": 2},
                },
                "required": ["kind", "size"],
                "additionalProperties": False,
            },
        ]
    },
    "tags": {
        "type": "array",
        "items": {"type": "string", "enum": ["red", "green", "blue"]},
        "minItems": 2,
        "maxItems": 4,
    },
    "flags": {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "note": {"type": ["string", "null"], "maxLength": 20},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "required": ["ok", "note", "score"],
        "additionalProperties": False,
    },
}
# Free-form JSON has no bounds at all: tiny models asked for "a JSON object" tend to loop
# inside a string until the token limit, so the prompt asks for a small one.
JSON_PROMPT = 'Give a JSON object with one key, "answer", whose value is yes or no.'
PROMPTS = {
    "person": "Describe a made-up person as JSON.",
    "order": "Write an example shop order as JSON.",
    "shape": "Give me a shape as JSON.",
    "tags": "List some colours as a JSON array.",
    "flags": "Answer with a JSON object of flags.",
}
SAMPLED = [dict(temperature=0)] + [dict(temperature=1.0, seed=s) for s in (1, 2)]
MAX_TOKENS = 160


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", action="append", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.key, max_retries=0)
    host = args.base_url.removesuffix("/v1")
    ollama_client = ollama.Client(host=host, headers={"Authorization": f"Bearer {args.key}"})
    out = {"total": 0, "valid": 0, "failures": [], "greedy": {}, "finish": {}, "errors": {}}

    def check(label, text, schema, finish):
        out["total"] += 1
        out["finish"][finish] = out["finish"].get(finish, 0) + 1
        try:
            value = json.loads(text)
            jsonschema.validate(value, schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            out["failures"].append({"case": label, "text": text, "error": str(e)[:300]})
            return
        out["valid"] += 1

    for model in args.model:
        for name, schema in SCHEMAS.items():
            messages = [{"role": "user", "content": PROMPTS[name]}]
            fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
            for settings in SAMPLED:
                chat = client.chat.completions.create(
                    model=model, messages=messages, max_tokens=MAX_TOKENS, response_format=fmt, **settings
                )
                choice = chat.choices[0]
                label = f"{model}/{name}/{settings}"
                check(label, choice.message.content, schema, choice.finish_reason)
                if settings["temperature"] == 0:
                    out["greedy"][f"{model}/{name}"] = choice.message.content
            # Streamed: the deltas add up to an answer that validates too.
            text = ""
            for chunk in client.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS, response_format=fmt,
                temperature=0, stream=True,
            ):
                for c in chunk.choices:
                    text += c.delta.content or ""
            check(f"{model}/{name}/stream", text, schema, "stream")
            assert text == out["greedy"][f"{model}/{name}"], (text, out["greedy"])

        # json_object: any object.
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": JSON_PROMPT}],
            max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "json_object"},
        )
        check(f"{model}/json_object", chat.choices[0].message.content, {"type": "object"},
              chat.choices[0].finish_reason)

        # Ollama's `format`: a schema, and "json".
        reply = ollama_client.chat(model=model, messages=[{"role": "user", "content": PROMPTS["person"]}],
                                   format=SCHEMAS["person"], options={"temperature": 0, "num_predict": MAX_TOKENS})
        check(f"{model}/ollama-schema", reply.message.content, SCHEMAS["person"], reply.done_reason)
        reply = ollama_client.generate(model=model, prompt=JSON_PROMPT, format="json",
                                       options={"temperature": 0, "num_predict": MAX_TOKENS})
        check(f"{model}/ollama-json", reply.response, {"type": "object"}, reply.done_reason)

    # A schema that is not one, and a keyword the engine does not support: 400s that say so.
    model = args.model[0]
    for label, schema in (("bad_type", {"type": "strin"}), ("unsupported", {"type": "object", "not": {}})):
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            )
            out["errors"][label] = None
        except openai.BadRequestError as e:
            out["errors"][label] = str(e)
    try:
        ollama_client.generate(model=model, prompt="x", format={"type": "strin"})
        out["errors"]["ollama_bad_type"] = None
    except ollama.ResponseError as e:
        out["errors"]["ollama_bad_type"] = f"{e.status_code} {e.error}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Embeddings through egpud as apps ask for them: the official `openai` package (which asks
for base64 by default and decodes it) and the `ollama` package, compared with llama.cpp's
embeddings of the same texts (tests/fixtures/embeddings.ref.json). Prints one JSON object:
each model's cosines against llama.cpp, and what the checks of shapes and errors found.

    python3 embeddings_check.py --base-url http://127.0.0.1:PORT/v1 --key KEY --ref FILE --model NAME=FILE ...
"""

import argparse
import base64
import json
import math
import struct

import ollama
import openai


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=reference file name")
    args = ap.parse_args()
    ref = json.load(open(args.ref))
    texts = ref["texts"]
    client = openai.OpenAI(base_url=args.base_url, api_key=args.key, max_retries=0)
    o = ollama.Client(host=args.base_url.removesuffix("/v1"), headers={"Authorization": f"Bearer {args.key}"})
    out = {"cosines": {}, "checks": []}
    for pair in args.model:
        name, file = pair.split("=", 1)
        # The SDK's default (base64, decoded by the SDK) and plain floats agree exactly.
        batch = client.embeddings.create(model=name, input=texts)
        floats = client.embeddings.create(model=name, input=texts, encoding_format="float")
        assert [d.index for d in batch.data] == list(range(len(texts))), batch
        assert batch.usage.prompt_tokens > len(texts), batch.usage
        vectors = [d.embedding for d in batch.data]
        assert vectors == [d.embedding for d in floats.data]
        assert all(abs(norm(v) - 1) < 1e-5 for v in vectors)
        out["cosines"][name] = [cosine(v, r) for v, r in zip(vectors, ref["models"][file])]
        # Raw base64 is little-endian f32s.
        raw = client.with_raw_response.embeddings.create(model=name, input=texts[0], encoding_format="base64")
        encoded = json.loads(raw.text)["data"][0]["embedding"]
        decoded = list(struct.unpack(f"<{len(vectors[0])}f", base64.b64decode(encoded)))
        assert decoded == vectors[0]
        # One text alone gives its vector in the batch (each input runs alone).
        one = client.embeddings.create(model=name, input=texts[1], encoding_format="float").data[0].embedding
        assert one == vectors[1]
        # dimensions: the leading ones, unit length again.
        short = client.embeddings.create(model=name, input=texts[0], dimensions=64, encoding_format="float")
        v = short.data[0].embedding
        assert len(v) == 64 and abs(norm(v) - 1) < 1e-5
        # Ollama: /api/embed, and the older /api/embeddings (not unit length).
        e = o.embed(model=name, input=texts)
        assert len(e.embeddings) == len(texts)
        out["cosines"][name + " (ollama)"] = [cosine(v, r) for v, r in zip(e.embeddings, ref["models"][file])]
        legacy = o.embeddings(model=name, prompt=texts[0]).embedding
        out["checks"].append(f"{name}: legacy norm {norm(legacy):.2f}, cosine {cosine(legacy, vectors[0]):.6f}")
        assert abs(cosine(legacy, vectors[0]) - 1) < 1e-5
    errors = {}
    name = args.model[0].split("=")[0]
    for label, kwargs in (("tokens", {"input": [[1, 2, 3]]}), ("dimensions", {"input": "x", "dimensions": 100000})):
        try:
            client.embeddings.create(model=name, encoding_format="float", **kwargs)
            errors[label] = None
        except openai.BadRequestError as e:
            errors[label] = str(e)
    out["errors"] = errors
    print(json.dumps(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference embeddings from llama.cpp for tests/tests/embeddings.rs: llama.cpp's llama-server
(built from the llama.cpp that PyPI's llama-cpp-python sdist vendors, bench/build-llama-cpp.sh)
with --embeddings --pooling last, through its OpenAI-style /v1/embeddings (unit length), for
SmolLM2 and Gemma 3. Rounded to 7 significant digits; written to
tests/fixtures/embeddings.ref.json.

    bench/build-llama-cpp.sh && python3 scripts/gen_embedding_refs.py
"""

import json
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from local_servers import start_llama_server, stop  # noqa: E402

MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Embeddings map text to vectors; similar texts land close together.",
    "x",
]


def main():
    binary = REPO / "target/llama-bench/build/bin/llama-server"
    out = {"generator": "llama-server --embeddings --pooling last (llama.cpp from llama-cpp-python 0.3.36)",
           "texts": TEXTS, "models": {}}
    for model in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            proc, port = start_llama_server(str(binary), str(REPO / "models" / model), 2, tmp, 1, 512,
                                            extra=("--embeddings", "--pooling", "last"))
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/embeddings",
                    data=json.dumps({"input": TEXTS, "model": "m"}).encode(),
                    headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=300) as r:
                    data = json.load(r)["data"]
            finally:
                stop(proc)
        out["models"][model] = [[float(f"{x:.7g}") for x in d["embedding"]] for d in data]
    path = REPO / "tests/fixtures/embeddings.ref.json"
    path.write_text(json.dumps(out) + "\n")
    print(path)


if __name__ == "__main__":
    main()

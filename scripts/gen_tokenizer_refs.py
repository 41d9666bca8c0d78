"""Record llama.cpp's tokenization of the tokenizer corpus, so egpu's tokenizers are checked
against the implementation they must agree with.

For every vocab and every corpus entry (engine/tests/fixtures/tokenizer/corpus.jsonl) this writes
the ids of `llama_tokenize` with (add_special=False, parse_special=False) and with (True, True),
and llama.cpp's rendering of those ids (`token_to_piece`, special off / on) where it differs
from the input text. A header line per vocab records the special ids, the end-of-generation set,
and FNV-1a hashes of every token's attributes and pieces (in chunks of 8192 ids), so that
decoding is checked for the whole vocab without storing it.

llama.cpp is the copy vendored in PyPI llama-cpp-python 0.3.36 (llama.cpp 0c1e57098); models come
from scripts/fetch-models.sh, vocab-only files from scripts/fetch-vocabs.sh.

Run:
    python -m venv .venv && .venv/bin/pip install llama-cpp-python==0.3.36   # compiles llama.cpp
    scripts/fetch-models.sh && scripts/fetch-vocabs.sh
    .venv/bin/python scripts/gen_tokenizer_refs.py [--models DIR] [--out DIR] [VOCAB...]

VOCAB names are those in VOCABS below (default: all whose file is present).
"""
import argparse
import ctypes
import hashlib
import json
import sys
from pathlib import Path

import llama_cpp

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"
CHUNK = 8192

# name -> (file relative to the models folder, metadata overrides). No file ships with the
# `default` pre-tokenizer, so GPT-2's vocab is also loaded with its pre-tokenizer overridden.
VOCABS = {
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", {}),
    "gemma3": ("gemma-3-270m-q4_k_m.gguf", {}),
    "llama-bpe": ("vocab/ggml-vocab-llama-bpe.gguf", {}),
    "qwen2": ("vocab/ggml-vocab-qwen2.gguf", {}),
    "gpt-2": ("vocab/ggml-vocab-gpt-2.gguf", {}),
    "gpt-2-default-pre": ("vocab/ggml-vocab-gpt-2.gguf", {"tokenizer.ggml.pre": "default"}),
    "llama-spm": ("vocab/ggml-vocab-llama-spm.gguf", {}),
}


def fnv1a64(data: bytes, h: int = 0xCBF29CE484222325) -> int:
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def piece(vocab, token: int, special: bool) -> bytes:
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def text_field(data: bytes):
    """A rendering as JSON: a string when it is UTF-8, else {"hex": ...}."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": data.hex()}


def nullable(token: int):
    return None if token < 0 else token


def header(name: str, path: Path, overrides: dict, vocab) -> dict:
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    attr_hashes, piece_hashes, special_piece_hashes = [], [], []
    for start in range(0, n, CHUNK):
        ha = hp = hs = 0xCBF29CE484222325
        for t in range(start, min(n, start + CHUNK)):
            ha = fnv1a64(llama_cpp.llama_vocab_get_attr(vocab, t).to_bytes(4, "little"), ha)
            p = piece(vocab, t, False)
            hp = fnv1a64(len(p).to_bytes(4, "little") + p, hp)
            s = piece(vocab, t, True)
            hs = fnv1a64(len(s).to_bytes(4, "little") + s, hs)
        attr_hashes.append(f"{ha:016x}")
        piece_hashes.append(f"{hp:016x}")
        special_piece_hashes.append(f"{hs:016x}")
    return {
        "vocab": name,
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "overrides": overrides,
        "llama_cpp_python": LLAMA_CPP_PYTHON,
        "n_vocab": n,
        "bos": nullable(llama_cpp.llama_vocab_bos(vocab)),
        "eos": nullable(llama_cpp.llama_vocab_eos(vocab)),
        "eot": nullable(llama_cpp.llama_vocab_eot(vocab)),
        "sep": nullable(llama_cpp.llama_vocab_sep(vocab)),
        "pad": nullable(llama_cpp.llama_vocab_pad(vocab)),
        "fim": [
            nullable(f(vocab))
            for f in (
                llama_cpp.llama_vocab_fim_pre,
                llama_cpp.llama_vocab_fim_suf,
                llama_cpp.llama_vocab_fim_mid,
                llama_cpp.llama_vocab_fim_pad,
                llama_cpp.llama_vocab_fim_rep,
                llama_cpp.llama_vocab_fim_sep,
            )
        ],
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog": [t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)],
        "chunk": CHUNK,
        "attr_fnv": attr_hashes,
        "piece_fnv": piece_hashes,
        "piece_special_fnv": special_piece_hashes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--out", type=Path, default=REPO / "engine/tests/fixtures/tokenizer")
    ap.add_argument("vocabs", nargs="*", default=None)
    args = ap.parse_args()
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
        sys.exit(f"need llama-cpp-python {LLAMA_CPP_PYTHON}, have {llama_cpp.__version__}")

    corpus = [
        json.loads(line)
        for line in (args.out / "corpus.jsonl").read_text(encoding="utf-8").split("\n")
        if line.strip()
    ]
    names = args.vocabs or [n for n, (f, _) in VOCABS.items() if (args.models / f).is_file()]
    for name in names:
        file, overrides = VOCABS[name]
        path = args.models / file
        llm = llama_cpp.Llama(
            model_path=str(path), vocab_only=True, verbose=False, kv_overrides=overrides or None
        )
        vocab = llm._model.vocab
        lines = [json.dumps(header(name, path, overrides, vocab), ensure_ascii=False)]
        for entry in corpus:
            text = entry["text"]
            raw = text.encode("utf-8")
            plain = llm.tokenize(raw, add_bos=False, special=False)
            special = llm.tokenize(raw, add_bos=True, special=True)
            record = {"id": entry["id"], "plain": plain}
            if special != plain:
                record["special"] = special
            rendered = b"".join(piece(vocab, t, False) for t in plain)
            if rendered != raw:
                record["detok_plain"] = text_field(rendered)
            rendered = b"".join(piece(vocab, t, True) for t in special)
            if rendered != raw:
                record["detok_special"] = text_field(rendered)
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
        out = args.out / f"{name}.jsonl"
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{name}: {len(corpus)} entries -> {out} ({out.stat().st_size} bytes)")
        del llm


if __name__ == "__main__":
    main()

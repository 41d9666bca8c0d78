"""A GPT-2 (124M) Hugging Face model folder with random weights and GPT-2's real vocabulary, for speed
and memory runs of egpu's HF loading (the real weights cannot be fetched here; speed does not depend on them).

  /work/venv-ref/bin/python bench/make_hf_gpt2.py OUT_DIR [--config gpt2|gpt2-medium|gpt2-large|gpt2-xl]

Needs torch, transformers and gguf (PyPI). The vocabulary and merges come from
models/vocab/ggml-vocab-gpt-2.gguf (scripts/fetch-models.sh puts it there), written back out as the
vocab.json + merges.txt a GPT-2 repo carries.
"""
import argparse
import json
from pathlib import Path

import gguf
import torch
import transformers as tf

SIZES = {"gpt2": {}, "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
         "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20), "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25)}
VOCAB = Path(__file__).resolve().parents[1] / "models" / "vocab" / "ggml-vocab-gpt-2.gguf"


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("out")
  ap.add_argument("--config", default="gpt2", choices=list(SIZES))
  args = ap.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  fields = gguf.GGUFReader(VOCAB).fields
  strings = lambda name: [bytes(fields[name].parts[i]).decode("utf-8") for i in fields[name].data]  # noqa: E731
  tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
  torch.manual_seed(0)
  tf.GPT2LMHeadModel(tf.GPT2Config(**SIZES[args.config])).eval().save_pretrained(out, safe_serialization=True)
  (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
  (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  print(f"wrote {out}: {args.config}, {len(tokens)} tokens, {len(merges)} merges")


if __name__ == "__main__":
  main()

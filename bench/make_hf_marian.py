"""A MarianMT Hugging Face folder in opus-mt-en-de's shape with random weights, for speed and memory
runs of egpu's Marian engine (real opus-mt weights cannot be fetched here; speed does not depend on them).

  /work/venv-ref/bin/python bench/make_hf_marian.py OUT_DIR [--config base|tiny-big-vocab]

`base` is opus-mt-en-de's config.json: d_model 512, 6 + 6 layers, 8 heads, FFN 2048, 58101 tokens,
512 positions, swish, scaled embeddings (74 M parameters, 298 MB in F32). The tokenizer files are
the test fixture's (engine/tests/fixtures/hf/tiny-marian): real SentencePiece models, and a
vocab.json that covers their pieces; the rest of the 58101 ids exist only in the weights. </s> gets
a large negative final_logits_bias so that every sentence runs to the length limit: a timing then
measures a known number of decoder steps.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "engine" / "tests" / "fixtures" / "hf" / "tiny-marian"
SIZES = {"base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                      decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                      vocab_size=58101, max_position_embeddings=512)}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("out")
  ap.add_argument("--config", default="base", choices=list(SIZES))
  args = ap.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  size = SIZES[args.config]
  pad = size["vocab_size"] - 1
  vocab = json.loads((TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
  vocab = {p: (pad if p == "<pad>" else i) for p, i in vocab.items()}
  torch.manual_seed(0)
  cfg = tf.MarianConfig(**size, pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad,
                        forced_eos_token_id=0, activation_function="swish", scale_embedding=True,
                        share_encoder_decoder_embeddings=True)
  model = tf.MarianMTModel(cfg).eval()
  with torch.no_grad():
    model.final_logits_bias[0, 0] = -100.0
  model.generation_config = tf.GenerationConfig(
    bad_words_ids=[[pad]], bos_token_id=0, decoder_start_token_id=pad, eos_token_id=0,
    forced_eos_token_id=0, max_length=512, num_beams=4, pad_token_id=pad)
  model.save_pretrained(out, safe_serialization=True)
  for name in ("source.spm", "target.spm", "tokenizer_config.json"):
    shutil.copy(TOKENIZER / name, out / name)
  (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  params = sum(p.numel() for p in model.parameters())
  print(f"wrote {out}: marian {args.config}, {params / 1e6:.1f} M parameters")


if __name__ == "__main__":
  main()

"""Tiny random Hugging Face model folders and their transformers references, for egpu's HF loaders.

  /work/venv-ref/bin/python scripts/gen_tiny_hf.py      (a venv with torch, transformers, gguf, numpy)

Writes engine/tests/fixtures/hf/tiny-gpt2/ -- what `save_pretrained` writes for a GPT2LMHeadModel
(config.json, generation_config.json, model.safetensors in F32) plus the tokenizer files a GPT-2 repo
has (vocab.json, merges.txt) -- and engine/tests/fixtures/hf/tiny-gpt2.ref.json:
  token_ids        a fixed random 24-token sequence
  logits_f32       transformers' logits at every position, float32 (what the issue's 1e-4 is about)
  logits_f64       the same in float64 (the model cast to double)
  greedy           transformers' greedy continuation (12 tokens) of token_ids[:8]
  greedy_text      the same from a text prompt, and log P(token i | tokens before it) over that prompt
                   (for tests through egpud, which take text)
  tokenizer_check  GPT2TokenizerFast's ids for a few strings
The vocabulary is gen_tiny_models.py's byte-level BPE (256 bytes + merges learned from a fixed
paragraph + <|endoftext|>), so the tokenizer is a real GPT-2-style one at a small size.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from gen_tiny_models import build_vocab  # noqa: E402

OUT = ROOT / "engine" / "tests" / "fixtures" / "hf"
GREEDY_TEXT = " the quick brown fox"
STRINGS = ["Hello world", " the quick brown fox", "tokens, merges and bytes: 123!", "<|endoftext|>ab"]


def main() -> int:
  torch.manual_seed(2024)
  n_vocab = 320
  vocab = build_vocab(n_vocab, ["<|endoftext|>"])
  eot = vocab.special["<|endoftext|>"]
  cfg = tf.GPT2Config(vocab_size=n_vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=None,
                      activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True)
  model = tf.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # the default init has zero biases and unit LayerNorms: randomize them all
    for name, p in model.named_parameters():
      if name.endswith(".bias") or "ln_" in name:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                                             or name.endswith("ln_f.weight") else 0.0))
  folder = OUT / "tiny-gpt2"
  model.save_pretrained(folder, safe_serialization=True)
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab.tokens)}, ensure_ascii=False))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(vocab.merges) + "\n")
  tok = tf.AutoTokenizer.from_pretrained(folder)  # reads vocab.json + merges.txt as a user's folder would

  rng = np.random.default_rng(5)
  ids = [int(t) for t in rng.integers(0, n_vocab, 24)]
  x = torch.tensor([ids])
  with torch.no_grad():
    f32 = model(x, use_cache=False).logits[0].numpy()
    f64 = model.double()(x, use_cache=False).logits[0].numpy()
    model.float()
    greedy = model.generate(torch.tensor([ids[:8]]), max_new_tokens=12, do_sample=False, num_beams=1,
                            pad_token_id=eot, eos_token_id=None)[0, 8:].tolist()
    prompt_ids = tok.encode(GREEDY_TEXT)
    text_logits = model(torch.tensor([prompt_ids]), use_cache=False).logits[0]
    text_out = text_logits[-1]
    logprobs = torch.log_softmax(text_logits.double(), -1)
    score = [float(logprobs[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]
    continuation = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, num_beams=1,
                                  pad_token_id=eot, eos_token_id=None)[0, len(prompt_ids):].tolist()
    top2 = torch.topk(text_out, 2).values
  ref = {"token_ids": ids, "logits_f32": [[float(v) for v in r] for r in f32],
         "logits_f64": [[float(v) for v in r] for r in f64], "greedy_prompt": ids[:8], "greedy": greedy,
         "tokenizer_check": {s: tok.encode(s) for s in STRINGS},
         "greedy_text": {"prompt": GREEDY_TEXT, "prompt_ids": prompt_ids, "continuation": continuation,
                         "first_top2_gap": float(top2[0] - top2[1]), "score_logprobs": score},
         "transformers": tf.__version__, "torch": torch.__version__}
  (OUT / "tiny-gpt2.ref.json").write_text(json.dumps(ref) + "\n")
  print("wrote", folder, "and", OUT / "tiny-gpt2.ref.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())

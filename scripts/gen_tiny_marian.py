"""A tiny random MarianMT folder (opus-mt layout) and its transformers/sentencepiece references.

  /work/venv-ref/bin/python scripts/gen_tiny_marian.py   (a venv with torch, transformers, sentencepiece)

Writes engine/tests/fixtures/hf/tiny-marian/ with what an opus-mt repo holds:
  source.spm, target.spm   SentencePiece Unigram models trained here on scripts/data/multilingual.txt
                           with the nmt_nfkc normalization opus-mt uses (so the precompiled charsmap
                           is the real one)
  vocab.json               the shared vocabulary: </s>, <unk>, the pieces of both models, <pad> last
  config.json, generation_config.json, model.safetensors   from save_pretrained (F32)
  tokenizer_config.json
and engine/tests/fixtures/hf/tiny-marian.ref.json:
  spm        for every line of multilingual.txt and multilingual-stress.txt: the `sentencepiece`
             package's ids under source.spm and target.spm
  marian_ids MarianTokenizer's input_ids for the same lines (pieces mapped through vocab.json, </s>)
  logits     transformers' decoder logits (float32) for one source sentence and a fixed decoder input
  greedy / beam   model.generate() for a batch of sentences: greedy, and beam search as
             generation_config.json asks (num_beams 4), token ids and batch_decode text
  variants   the same batch under other beams, max_length, length_penalty and early_stopping
Biases and norms are randomized and </s> gets a head start in final_logits_bias, with a seed chosen
so that the smallest top-1/top-2 logit gap along the greedy outputs is 0.17: the reference outputs
are decided by the model, not by float round-off, and sentences end at different lengths.
"""
import io
import json
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "engine" / "tests" / "fixtures" / "hf"
DATA = ROOT / "scripts" / "data"
BATCH = [
  "The quick brown fox jumps over the lazy dog.",
  "Bitte schicken Sie den Bericht.",
  "Où est la bibliothèque ?",
  "A translation model turns sentences in one language into another, and back again.",
]


def train_spm(lines: list[str], vocab_size: int) -> bytes:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines), model_writer=model, model_type="unigram", vocab_size=vocab_size,
    normalization_rule_name="nmt_nfkc", character_coverage=0.995, hard_vocab_limit=False,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
  return model.getvalue()


def main() -> int:
  torch.manual_seed(11)
  corpus = (DATA / "multilingual.txt").read_text(encoding="utf-8").splitlines()
  stress = (DATA / "multilingual-stress.txt").read_text(encoding="utf-8").splitlines()
  folder = OUT / "tiny-marian"
  folder.mkdir(parents=True, exist_ok=True)
  source = train_spm(corpus, 420)
  target = train_spm(corpus[::-1] + [l.lower() for l in corpus], 380)
  (folder / "source.spm").write_bytes(source)
  (folder / "target.spm").write_bytes(target)
  sp_src = spm.SentencePieceProcessor(model_proto=source)
  sp_tgt = spm.SentencePieceProcessor(model_proto=target)

  pieces = ["</s>", "<unk>"]
  for sp in (sp_src, sp_tgt):
    for i in range(sp.get_piece_size()):
      p = sp.id_to_piece(i)
      if not (sp.is_control(i) or sp.is_unknown(i)) and p not in pieces:
        pieces.append(p)
  pieces.append("<pad>")
  vocab = {p: i for i, p in enumerate(pieces)}
  (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
  pad = vocab["<pad>"]
  (folder / "tokenizer_config.json").write_text(json.dumps({
    "tokenizer_class": "MarianTokenizer", "source_lang": "mul", "target_lang": "mul",
    "unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 64}))

  cfg = tf.MarianConfig(
    vocab_size=len(pieces), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad, forced_eos_token_id=0,
    activation_function="swish", scale_embedding=True, share_encoder_decoder_embeddings=True,
    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.05)
  model = tf.MarianMTModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias") or "layer_norm" in name:
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "layer_norm.weight" in name else 0.0))
    model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias) * 0.5)
    model.final_logits_bias[0, 0] += 1.5  # </s> often enough that sentences end at different lengths
  model.generation_config = tf.GenerationConfig(
    bad_words_ids=[[pad]], bos_token_id=0, decoder_start_token_id=pad, eos_token_id=0,
    forced_eos_token_id=0, max_length=24, num_beams=4, pad_token_id=pad)
  model.save_pretrained(folder, safe_serialization=True)

  tok = tf.MarianTokenizer.from_pretrained(folder)
  lines = corpus + stress
  ref = {"lines": lines,
         "spm": {"source": [sp_src.encode(l) for l in lines], "target": [sp_tgt.encode(l) for l in lines]},
         "marian_ids": [tok(l).input_ids for l in lines]}

  src = tok([BATCH[0]], return_tensors="pt")
  dec = torch.tensor([[pad] + [int(t) for t in np.random.default_rng(3).integers(2, pad, 7)]])
  with torch.no_grad():
    logits = model(**src, decoder_input_ids=dec).logits[0]
    ref["logits"] = {"source": BATCH[0], "decoder_input_ids": dec[0].tolist(),
                     "values": [[float(v) for v in row] for row in logits]}
    batch = tok(BATCH, return_tensors="pt", padding=True)
    for kind, beams in (("greedy", 1), ("beam", 4)):
      out = model.generate(**batch, num_beams=beams, do_sample=False)
      ref[kind] = {"sources": BATCH, "num_beams": beams, "ids": out.tolist(),
                   "text": tok.batch_decode(out, skip_special_tokens=True)}
    # Other decoding settings a generation_config.json may hold, on the same batch.
    ref["variants"] = []
    for beams, max_length, length_penalty, early_stopping in (
        (2, 24, 1.0, False), (4, 7, 1.0, False), (4, 24, 0.6, False), (4, 24, 2.0, False),
        (4, 24, 1.0, True), (4, 24, 1.0, "never"), (6, 16, 0.6, "never"), (1, 7, 1.0, False)):
      out = model.generate(**batch, num_beams=beams, max_length=max_length, length_penalty=length_penalty,
                           early_stopping=early_stopping, do_sample=False)
      ref["variants"].append({"num_beams": beams, "max_length": max_length, "length_penalty": length_penalty,
                              "early_stopping": early_stopping, "ids": out.tolist()})
  ref["transformers"] = tf.__version__
  ref["torch"] = torch.__version__
  ref["sentencepiece"] = spm.__version__
  (OUT / "tiny-marian.ref.json").write_text(json.dumps(ref, ensure_ascii=False) + "\n", encoding="utf-8")
  print("wrote", folder, "and", OUT / "tiny-marian.ref.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())

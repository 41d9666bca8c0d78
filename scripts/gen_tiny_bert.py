"""A tiny random BERT embedding model as GGUF, and its sentence-transformers references.

  /work/venv-ref/bin/python scripts/gen_tiny_bert.py --llama-server PATH

(a venv with torch, transformers, sentence-transformers and gguf from PyPI.)

Writes engine/tests/fixtures/models/:
  tiny-bert.gguf      arch `bert` in llama.cpp's layout (what convert_hf_to_gguf.py writes for a
                      BertModel): 2 layers, n_embd 64, 4 heads, n_ff 128, 128 positions, 2 token
                      types, mean pooling; 2-D weights F16 (token_types F32), vectors F32. The vocabulary is a
                      WordPiece vocab trained here (tokenizers' BertWordPieceTokenizer, uncased)
                      on scripts/data/multilingual.txt, stored in llama.cpp's phantom-space form
                      (`▁word`, `##ing` → `ing`), with the special tokens at ids other than the
                      classic 0/100-103 so that the file's own ids are what a reader must use.
  tiny-bert.ref.json  for each text in TEXTS:
      input_ids            BertTokenizerFast's ids ([CLS] … [SEP])
      mean, cls            sentence-transformers' embeddings (Transformer → Pooling → Normalize)
                           with mean and with CLS pooling, float64 run of the model whose
                           weights are exactly the GGUF's (F16 matrices widened)
      hidden_first_text    transformers' last_hidden_state of the first text, every token
    and `llama_cpp_mean`: llama.cpp's own embeddings of the same file (llama-server
    --embeddings --pooling mean), a check that the GGUF is laid out as llama.cpp reads it,
    with the measured max |difference| to sentence-transformers.
  tiny-nomic-bert.gguf  arch `nomic-bert` (nomic-embed-text's layout): the same vocabulary and
                      sizes, NeoX RoPE (base 1000) instead of learned positions, fused attn_qkv,
                      SwiGLU FFN, no biases but the norms'; random numpy weights (transformers
                      runs nomic-bert only as remote code, which cannot be fetched here).
  tiny-nomic-bert.ref.json  llama.cpp's token ids and mean-pooled embeddings of TEXTS: the only
                      outside reference there is for this architecture.

Weights are random (BERT's init, std 0.02, with LayerNorm weights and biases also randomized so
that every parameter matters); the model means nothing, the numbers are exact.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from gguf import GGUFWriter, PoolingType, TokenType
from sentence_transformers import SentenceTransformer, models
from tokenizers import BertWordPieceTokenizer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "engine" / "tests" / "fixtures" / "models"
DATA = ROOT / "scripts" / "data"

TEXTS = [
  "The quick brown fox jumps over the lazy dog.",
  "Café, naïve résumé: ACCENTS and CAPITALS are folded!",
  "Where is the library? Bitte schicken Sie den Bericht.",
  "Numbers 12345 and symbols $5 + 3 = 8 split; 中文 stays one char each.",
  "zzqxj unknownish wordpieces",
  "Embeddings turn sentences into vectors, and similar sentences into similar vectors, "
  "so that a search can rank documents by meaning rather than by shared words alone.",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
HIDDEN, LAYERS, HEADS, FF, POSITIONS, TYPES = 64, 2, 4, 128, 128, 2
EPS = 1e-12


def train_vocab(lines: list[str]) -> list[str]:
  tok = BertWordPieceTokenizer(lowercase=True, strip_accents=None)
  tok.train_from_iterator(lines, vocab_size=420, min_frequency=1, special_tokens=SPECIALS,
                          limit_alphabet=200, show_progress=False)
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  words = [w for w, _ in vocab if w not in SPECIALS]
  # Specials away from ids 0 and 100-103: [PAD] 7, [UNK] 3, [CLS] 11, [SEP] 12, [MASK] 5.
  order = words[:]
  for special, at in [("[UNK]", 3), ("[MASK]", 5), ("[PAD]", 7), ("[CLS]", 11), ("[SEP]", 12)]:
    order.insert(at, special)
  return order


def build_model(vocab: list[str], folder: Path) -> tf.BertModel:
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  # transformers 5 takes the vocabulary itself (a `vocab_file=` keyword is silently ignored).
  tokenizer = tf.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
  tokenizer.save_pretrained(folder)
  config = tf.BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, intermediate_size=FF,
                         max_position_embeddings=POSITIONS, type_vocab_size=TYPES,
                         hidden_act="gelu", layer_norm_eps=EPS, pad_token_id=vocab.index("[PAD]"))
  torch.manual_seed(7)
  model = tf.BertModel(config, add_pooling_layer=False)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("LayerNorm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.dim() == 1:
        p.copy_(0.05 * torch.randn_like(p))
      else:
        # Larger than BERT's 0.02 so that attention is far from uniform; then rounded to F16,
        # the precision the GGUF stores.
        p.copy_((0.12 * torch.randn_like(p)).half().float())
  model.save_pretrained(folder)
  return model


def add_vocab(w: GGUFWriter, vocab: list[str]) -> None:
  w.add_tokenizer_model("bert")
  w.add_tokenizer_pre("default")
  special = {t: vocab.index(t) for t in SPECIALS}
  tokens, types = [], []
  for t in vocab:
    if t in SPECIALS:
      tokens.append(t)
      types.append(TokenType.CONTROL)
    else:
      tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)
      types.append(TokenType.NORMAL)
  w.add_token_list(tokens)
  w.add_token_types(types)
  # What gguf-py's SpecialVocab writes for a BERT tokenizer.json ([CLS] $A [SEP]).
  w.add_bos_token_id(special["[CLS]"])
  w.add_eos_token_id(special["[SEP]"])
  w.add_unk_token_id(special["[UNK]"])
  w.add_sep_token_id(special["[SEP]"])
  w.add_pad_token_id(special["[PAD]"])
  w.add_uint32("tokenizer.ggml.cls_token_id", special["[CLS]"])
  w.add_mask_token_id(special["[MASK]"])
  w.add_add_bos_token(True)
  w.add_add_eos_token(True)


def encoder_writer(path: Path, arch: str) -> GGUFWriter:
  """A GGUF writer for a tiny `arch` encoder with the hyper-parameters both fixtures share."""
  w = GGUFWriter(str(path), arch)
  w.add_name(f"tiny-{arch} (random weights, egpu test fixture)")
  w.add_context_length(POSITIONS)
  w.add_embedding_length(HIDDEN)
  w.add_feed_forward_length(FF)
  w.add_block_count(LAYERS)
  w.add_head_count(HEADS)
  w.add_layer_norm_eps(EPS)
  w.add_causal_attention(False)
  w.add_pooling_type(PoolingType.MEAN)
  w.add_token_type_count(TYPES)
  return w


def write_gguf(path: Path, model: tf.BertModel, vocab: list[str]) -> None:
  w = encoder_writer(path, "bert")
  add_vocab(w, vocab)

  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

  def put(name: str, value: np.ndarray) -> None:
    # llama.cpp's converter keeps token_types in F32 (its graph adds the row as it is).
    half = value.ndim == 2 and name != "token_types.weight"
    w.add_tensor(name, value.astype(np.float16 if half else np.float32))

  put("token_embd.weight", sd["embeddings.word_embeddings.weight"])
  put("token_types.weight", sd["embeddings.token_type_embeddings.weight"])
  put("position_embd.weight", sd["embeddings.position_embeddings.weight"])
  put("token_embd_norm.weight", sd["embeddings.LayerNorm.weight"])
  put("token_embd_norm.bias", sd["embeddings.LayerNorm.bias"])
  for i in range(LAYERS):
    hf = f"encoder.layer.{i}."
    names = {
      "attn_q": "attention.self.query", "attn_k": "attention.self.key",
      "attn_v": "attention.self.value", "attn_output": "attention.output.dense",
      "attn_output_norm": "attention.output.LayerNorm", "ffn_up": "intermediate.dense",
      "ffn_down": "output.dense", "layer_output_norm": "output.LayerNorm",
    }
    for ours, theirs in names.items():
      put(f"blk.{i}.{ours}.weight", sd[hf + theirs + ".weight"])
      put(f"blk.{i}.{ours}.bias", sd[hf + theirs + ".bias"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def write_nomic_gguf(path: Path, vocab: list[str]) -> None:
  rng = np.random.default_rng(11)
  w = encoder_writer(path, "nomic-bert")
  w.add_rope_freq_base(1000.0)
  add_vocab(w, vocab)

  def matrix(rows: int, cols: int) -> np.ndarray:
    return (0.12 * rng.standard_normal((rows, cols))).astype(np.float16)

  def norm(name: str) -> None:
    w.add_tensor(name + ".weight", (1.0 + 0.2 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.add_tensor(name + ".bias", (0.05 * rng.standard_normal(HIDDEN)).astype(np.float32))

  w.add_tensor("token_embd.weight", matrix(len(vocab), HIDDEN))
  w.add_tensor("token_types.weight", (0.12 * rng.standard_normal((TYPES, HIDDEN))).astype(np.float32))
  norm("token_embd_norm")
  for i in range(LAYERS):
    w.add_tensor(f"blk.{i}.attn_qkv.weight", matrix(3 * HIDDEN, HIDDEN))
    w.add_tensor(f"blk.{i}.attn_output.weight", matrix(HIDDEN, HIDDEN))
    norm(f"blk.{i}.attn_output_norm")
    w.add_tensor(f"blk.{i}.ffn_up.weight", matrix(FF, HIDDEN))
    w.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(FF, HIDDEN))
    w.add_tensor(f"blk.{i}.ffn_down.weight", matrix(HIDDEN, FF))
    norm(f"blk.{i}.layer_output_norm")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def sentence_embeddings(folder: Path, pooling: str) -> list[list[float]]:
  transformer = models.Transformer(str(folder), max_seq_length=POSITIONS)
  transformer.auto_model.double()
  pool = models.Pooling(HIDDEN, pooling_mode=pooling)
  st = SentenceTransformer(modules=[transformer, pool, models.Normalize()], device="cpu")
  return st.encode(TEXTS, convert_to_numpy=True, batch_size=1,
                   precision="float32").astype(np.float64).tolist()


def llama_server_embeddings(server: str, gguf: Path) -> tuple[list[list[float]], list[list[int]]]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([server, "-m", str(gguf), "--embeddings", "--pooling", "mean",
                           "--port", str(port), "-c", str(POSITIONS), "-ub", str(POSITIONS),
                           "-b", str(POSITIONS), "-t", "2", "--host", "127.0.0.1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
      try:
        with urllib.request.urlopen(url + "/health") as r:
          if r.status == 200:
            break
      except OSError:
        time.sleep(0.1)
    out, ids = [], []
    for text in TEXTS:
      body = json.dumps({"input": text}).encode()
      req = urllib.request.Request(url + "/v1/embeddings", body,
                                   {"Content-Type": "application/json"})
      with urllib.request.urlopen(req) as r:
        out.append(json.load(r)["data"][0]["embedding"])
      body = json.dumps({"content": text, "add_special": True}).encode()
      req = urllib.request.Request(url + "/tokenize", body, {"Content-Type": "application/json"})
      with urllib.request.urlopen(req) as r:
        ids.append(json.load(r)["tokens"])
    return out, ids
  finally:
    proc.terminate()
    proc.wait()


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--llama-server", required=True, help="llama.cpp's llama-server")
  args = ap.parse_args()
  lines = (DATA / "multilingual.txt").read_text(encoding="utf-8").splitlines() + TEXTS[:3]
  vocab = train_vocab(lines)
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    model = build_model(vocab, folder)
    gguf_path = OUT / "tiny-bert.gguf"
    write_gguf(gguf_path, model, vocab)
    tokenizer = tf.BertTokenizerFast.from_pretrained(folder)
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    unknown = vocab.index("[UNK]")
    assert sum(i.count(unknown) for i in ids) < 12, f"tokenizer lost its vocabulary: {ids}"
    model = model.double().eval()
    with torch.no_grad():
      hidden = model(torch.tensor([ids[0]])).last_hidden_state[0].tolist()
    ref = {
      "texts": TEXTS,
      "input_ids": ids,
      "mean": sentence_embeddings(folder, "mean"),
      "cls": sentence_embeddings(folder, "cls"),
      "hidden_first_text": hidden,
      "versions": {"transformers": tf.__version__, "torch": torch.__version__},
    }
  theirs, their_ids = llama_server_embeddings(args.llama_server, gguf_path)
  assert their_ids == ids, (their_ids, ids)
  ref["llama_cpp_mean"] = theirs
  diff = float(np.abs(np.array(theirs) - np.array(ref["mean"])).max())
  ref["max_abs_diff_llama_cpp_vs_sentence_transformers"] = diff
  print("llama.cpp vs sentence-transformers, max |diff|:", diff)
  (OUT / "tiny-bert.ref.json").write_text(json.dumps(ref) + "\n", encoding="utf-8")
  nomic_path = OUT / "tiny-nomic-bert.gguf"
  write_nomic_gguf(nomic_path, vocab)
  nomic, nomic_ids = llama_server_embeddings(args.llama_server, nomic_path)
  assert nomic_ids == ids, "one vocabulary, one tokenization"
  (OUT / "tiny-nomic-bert.ref.json").write_text(json.dumps(
    {"texts": TEXTS, "input_ids": nomic_ids, "llama_cpp_mean": nomic}) + "\n", encoding="utf-8")
  print(f"wrote {gguf_path} ({gguf_path.stat().st_size} bytes), vocab {len(vocab)}")
  for t, i in zip(TEXTS, ids):
    print(len(i), t[:40])
  return 0


if __name__ == "__main__":
  sys.exit(main())

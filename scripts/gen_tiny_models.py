"""Build tiny synthetic GGUF models for architectures whose real weights egpu can't fetch, and
record outside reference logits for them.

Run from anywhere with the reference venv (gguf-py, numpy, regex, llama-cpp-python, torch CPU,
transformers):

    /work/venv-ref/bin/python scripts/gen_tiny_models.py            # write models + references
    /work/venv-ref/bin/python scripts/gen_tiny_models.py --check    # rebuild in memory, compare

Outputs, in engine/tests/fixtures/models/:

  tiny-gpt2.gguf        gpt2:  learned positions, LayerNorm (+bias), GELU MLP, fused attn_qkv with
                        bias, every linear biased, tied output (no output.weight), F16
  tiny-qwen2.gguf       qwen2: RMSNorm, SwiGLU, NeoX rope, q/k/v biases, GQA 4/2, own output, F16
  tiny-qwen3.gguf       qwen3: per-head RMS QK-norm, no biases, head_dim 32 != n_embd/n_head,
                        GQA 4/2, tied output, F16
  tiny-llama31.gguf     llama: LLaMA-3.1 rope scaling via a rope_freqs tensor, GQA 4/2,
                        normal (GPT-J style) rope with q/k permuted the way convert_hf_to_gguf
                        permutes them, own output, everything F32
  tiny-llama31-q8_0.gguf  the same weights with every 2-D matrix quantized to Q8_0 by
                        gguf.quants.quantize (gguf-py has no Q4_K quantizer; Q4_K is covered by
                        the real Gemma 3 file)
  <name>.ref.json       reference logits for a fixed random 24-token sequence (schema below)

Every model has a real byte-level GPT-2-style BPE vocabulary (256 byte tokens + merges learned
from a fixed paragraph + a few control tokens), so llama.cpp loads it and tokenizes text with it.

Which reference, and why. Both are recorded, for every model:

  "transformers": Hugging Face transformers 5 (GPT2LMHeadModel, Qwen2ForCausalLM,
      Qwen3ForCausalLM, LlamaForCausalLM with rope_type "llama3"), torch CPU, eager attention,
      run in float64 on exactly the weights stored in the GGUF (F16 and Q8_0 weights are
      dequantized first; llama q/k are un-permuted back to the HF layout). This is the
      independent implementation the issue asked for. torch CPU came from PyPI (plus its CUDA
      dependency wheels, ~5 GB installed, installed in under 4 minutes), so option (a) was
      feasible; it is used for all four architectures, not only gpt2/qwen2.
  "llama.cpp": llama-cpp-python 0.3.36 (llama.cpp 0c1e57098), CPU, `Llama(path, n_ctx=64,
      n_batch=64, logits_all=True, n_threads=2, n_threads_batch=2, seed=0)`, one
      `eval(token_ids)`, logits from `.scores`; type_k=type_v=F32 (an F32 KV cache, not
      llama.cpp's default F16, so the F32 model can be compared tightly). llama.cpp rounds
      activations to F16 before F16
      matmuls, to Q8_0 before Q8_0 matmuls, and computes GELU through an F16 table, so it agrees
      with transformers only to ~1e-3 (F16/Q8_0 models); for the all-F32 model it agrees to
      ~1e-5. The measured max |difference| is stored in the file.

The script fails if llama.cpp rejects a file, returns non-finite logits, or disagrees with
transformers by more than a loose bound (which would mean a tensor is laid out wrongly).

Schema of <name>.ref.json:
  {
    "model": "tiny-qwen2.gguf", "model_sha256": "...", "arch": "qwen2",
    "hparams": {...},                  # what was written into the GGUF
    "tensor_types": {"token_embd.weight": "F16", ...},
    "token_ids": [24 ints],            # fixed random sequence, no BOS added
    "logits": {                        # [position][vocab id], 6 significant digits
      "transformers": [[...], ...],
      "llama.cpp":    [[...], ...]
    },
    "argmax": {"transformers": [...], "llama.cpp": [...]},
    "max_abs_diff_transformers_vs_llamacpp": float,
    "llamacpp_incremental_vs_batch_max_abs_diff": float,   # token-by-token eval vs one batch
    "llamacpp_threads_1_vs_2_max_abs_diff": float,         # one batch, n_threads 1 vs 2
    "tokenizer_check": [{"text": str, "parse_special": bool, "llama_cpp_ids": [...],
                         "llama_cpp_detok": str}],   # llama.cpp's tokenizer on this vocab
    "reference_info": {...}            # versions, API calls, settings
  }

Measured (this machine): transformers vs llama.cpp max |logit diff| 1e-6 for the F32 llama,
0.002-0.01 for the F16 models, 0.064 for Q8_0 (logit std ~1; argmax agrees at 24/24 positions,
23/24 for Q8_0); llama.cpp n_threads 1 vs 2: bitwise identical; llama.cpp one-token-at-a-time vs
one batch: up to 0.006 (F16), 1e-6 (F32).

Deterministic: numpy Generator seeds are fixed per model; re-running rewrites identical GGUF
files and identical JSON (checked with --check, which rebuilds in a temp dir and compares).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import regex

import gguf
from gguf.constants import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

OUT_DIR = Path(__file__).resolve().parent.parent / "engine" / "tests" / "fixtures" / "models"
SEQ_LEN = 24
LLAMA_CPP_COMMIT = "0c1e57098"

# ---------------------------------------------------------------------------------------------
# Tokenizer: a byte-level BPE trained on a fixed paragraph.

CORPUS = """\
The small model reads a line of text, one token at a time, and guesses what comes next.
It has seen very little: a paragraph about weather, rivers and the people who measure them.
When the river rises in spring, the town sets out boats; when it falls in autumn, they count
the fish that were left behind. Nobody in the town remembers who started counting, but the
numbers are written in a book that is kept at the station, next to the old clock.
There are 365 days in a year, 24 hours in a day and 60 minutes in an hour; the station has
measured the river at 6 o'clock every morning since 1921. "Is it higher than yesterday?"
asks the child. "A little," says the keeper, "but not as high as the year the bridge washed
away." def count(fish): return sum(fish) if fish else 0  # the keeper's nephew wrote this
"""

# GPT-2 pre-tokenizer split pattern.
PRETOKENIZE = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def byte_symbols() -> list[str]:
    """The printable character GPT-2 byte-level BPE uses for each byte value 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def train_bpe(n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges on CORPUS (ties broken by the pair's text, so it is deterministic)."""
    sym = byte_symbols()
    counts: dict[tuple[str, ...], int] = {}
    for piece in PRETOKENIZE.findall(CORPUS):
        word = tuple(sym[b] for b in piece.encode("utf-8"))
        counts[word] = counts.get(word, 0) + 1
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for word, c in counts.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            raise RuntimeError("corpus too small for the requested number of merges")
        best = max(pairs.items(), key=lambda kv: (kv[1], [-ord(ch) for ch in kv[0][0] + " " + kv[0][1]]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        new_counts: dict[tuple[str, ...], int] = {}
        for word, c in counts.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_counts[tuple(out)] = new_counts.get(tuple(out), 0) + c
        counts = new_counts
    return merges


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]


def build_vocab(n_vocab: int, specials: list[str]) -> Vocab:
    n_merges = n_vocab - 256 - len(specials)
    merges = train_bpe(n_merges)
    tokens = byte_symbols() + [a + b for a, b in merges]
    if len(set(tokens)) != len(tokens):
        raise RuntimeError("duplicate merged token")
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    special = {}
    for s in specials:
        special[s] = len(tokens)
        tokens.append(s)
        types.append(int(gguf.TokenType.CONTROL))
    assert len(tokens) == n_vocab
    return Vocab(tokens, types, [f"{a} {b}" for a, b in merges], special)


# ---------------------------------------------------------------------------------------------
# Model specs.


@dataclass
class Spec:
    name: str
    arch: str
    seed: int
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    head_dim: int
    specials: list[str]
    bos: str
    eos: str
    add_bos: bool
    pre: str
    matrix_type: QT  # storage type of 2-D matrices; 1-D tensors are always F32
    tied_output: bool
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_llama3: dict | None = None
    weights_from: str | None = None  # reuse another spec's weights (quantized variant)
    extra: dict = field(default_factory=dict)


LLAMA3_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small on purpose, so that at positions < 24 the scaled frequencies visibly matter.
    "original_max_position_embeddings": 128,
}

SPECS = [
    Spec("tiny-gpt2", "gpt2", 1001, n_vocab=320, n_embd=64, n_layer=2, n_head=4, n_head_kv=4,
         n_ff=256, n_ctx_train=64, head_dim=16, specials=["<|endoftext|>"],
         bos="<|endoftext|>", eos="<|endoftext|>", add_bos=False, pre="gpt-2",
         matrix_type=QT.F16, tied_output=True, norm_eps=1e-5),
    Spec("tiny-qwen2", "qwen2", 1002, n_vocab=352, n_embd=64, n_layer=2, n_head=4, n_head_kv=2,
         n_ff=128, n_ctx_train=256, head_dim=16,
         specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
         bos="<|endoftext|>", eos="<|im_end|>", add_bos=False, pre="qwen2",
         matrix_type=QT.F16, tied_output=False, norm_eps=1e-6, rope_theta=1000000.0),
    Spec("tiny-qwen3", "qwen3", 1003, n_vocab=384, n_embd=64, n_layer=3, n_head=4, n_head_kv=2,
         n_ff=128, n_ctx_train=256, head_dim=32,
         specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
         bos="<|endoftext|>", eos="<|im_end|>", add_bos=False, pre="qwen2",
         matrix_type=QT.F16, tied_output=True, norm_eps=1e-6, rope_theta=1000000.0),
    Spec("tiny-llama31", "llama", 1004, n_vocab=288, n_embd=64, n_layer=2, n_head=4, n_head_kv=2,
         n_ff=96, n_ctx_train=1024, head_dim=16,
         specials=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
         bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True, pre="llama-bpe",
         matrix_type=QT.F32, tied_output=False, norm_eps=1e-5, rope_theta=10000.0,
         rope_llama3=LLAMA3_ROPE),
    Spec("tiny-llama31-q8_0", "llama", 1004, n_vocab=288, n_embd=64, n_layer=2, n_head=4,
         n_head_kv=2, n_ff=96, n_ctx_train=1024, head_dim=16,
         specials=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
         bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True, pre="llama-bpe",
         matrix_type=QT.Q8_0, tied_output=False, norm_eps=1e-5, rope_theta=10000.0,
         rope_llama3=LLAMA3_ROPE, weights_from="tiny-llama31"),
]


def llama3_rope_factors(spec: Spec) -> np.ndarray:
    """Per-frequency divisors for LLaMA-3.1 rope scaling, as llama.cpp's rope_freqs expects:
    rope angle for pair i at position p is p * theta^(-2i/d) / factor[i]."""
    r = spec.rope_llama3
    assert r is not None
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    old_ctx = r["original_max_position_embeddings"]
    low_wavelen = old_ctx / r["low_freq_factor"]
    high_wavelen = old_ctx / r["high_freq_factor"]
    out = []
    for f in inv_freq:
        wavelen = 2 * math.pi / float(f)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(r["factor"])
        else:
            smooth = (old_ctx / wavelen - r["low_freq_factor"]) / (r["high_freq_factor"] - r["low_freq_factor"])
            out.append(1.0 / ((1.0 - smooth) / r["factor"] + smooth))
    return np.array(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Weights, kept in the GGUF (numpy) layout: a matrix is (out_features, in_features), which is
# ggml ne = {in, out}, the same as torch.nn.Linear.weight.


def random_weights(spec: Spec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    E, F, L = spec.n_embd, spec.n_ff, spec.n_layer
    q_dim = spec.n_head * spec.head_dim
    kv_dim = spec.n_head_kv * spec.head_dim

    def mat(out_f: int, in_f: int) -> np.ndarray:
        return (rng.standard_normal((out_f, in_f)) / math.sqrt(in_f)).astype(np.float32)

    def norm_w(n: int) -> np.ndarray:
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    def bias(n: int, scale: float = 0.1) -> np.ndarray:
        return (scale * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    emb_std = 0.35 if spec.tied_output else 1.0
    w["token_embd.weight"] = (emb_std * rng.standard_normal((spec.n_vocab, E))).astype(np.float32)
    if spec.arch == "gpt2":
        w["position_embd.weight"] = (0.5 * rng.standard_normal((spec.n_ctx_train, E))).astype(np.float32)
    if spec.rope_llama3 is not None:
        w["rope_freqs.weight"] = llama3_rope_factors(spec)
    for i in range(L):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm_w(E)
        if spec.arch == "gpt2":
            w[p + "attn_norm.bias"] = bias(E)
            w[p + "attn_qkv.weight"] = mat(3 * E, E)
            w[p + "attn_qkv.bias"] = bias(3 * E)
            w[p + "attn_output.weight"] = mat(E, E)
            w[p + "attn_output.bias"] = bias(E)
            w[p + "ffn_norm.weight"] = norm_w(E)
            w[p + "ffn_norm.bias"] = bias(E)
            w[p + "ffn_up.weight"] = mat(F, E)
            w[p + "ffn_up.bias"] = bias(F)
            w[p + "ffn_down.weight"] = mat(E, F)
            w[p + "ffn_down.bias"] = bias(E)
            continue
        w[p + "attn_q.weight"] = mat(q_dim, E)
        w[p + "attn_k.weight"] = mat(kv_dim, E)
        w[p + "attn_v.weight"] = mat(kv_dim, E)
        if spec.arch == "qwen2":
            w[p + "attn_q.bias"] = bias(q_dim, 0.5)
            w[p + "attn_k.bias"] = bias(kv_dim, 0.5)
            w[p + "attn_v.bias"] = bias(kv_dim, 0.5)
        if spec.arch == "qwen3":
            w[p + "attn_q_norm.weight"] = norm_w(spec.head_dim)
            w[p + "attn_k_norm.weight"] = norm_w(spec.head_dim)
        w[p + "attn_output.weight"] = mat(E, q_dim)
        w[p + "ffn_norm.weight"] = norm_w(E)
        w[p + "ffn_gate.weight"] = mat(F, E)
        w[p + "ffn_up.weight"] = mat(F, E)
        w[p + "ffn_down.weight"] = mat(E, F)
    w["output_norm.weight"] = norm_w(E)
    if spec.arch == "gpt2":
        w["output_norm.bias"] = bias(E)
    if not spec.tied_output:
        w["output.weight"] = mat(spec.n_vocab, E)
    return w


def store(spec: Spec, w: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, QT]]:
    """Returns (raw arrays to write, the exact f32 values they decode to, ggml types)."""
    raw, exact, types = {}, {}, {}
    for name, a in w.items():
        if a.ndim == 1 or spec.matrix_type == QT.F32:
            raw[name], exact[name], types[name] = a, a, QT.F32
        elif spec.matrix_type == QT.F16:
            h = a.astype(np.float16)
            raw[name], exact[name], types[name] = h, h.astype(np.float32), QT.F16
        else:
            q = quantize(a, spec.matrix_type)
            raw[name], exact[name], types[name] = q, dequantize(q, spec.matrix_type).reshape(a.shape), spec.matrix_type
    return raw, exact, types


FILE_TYPE = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
             QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


def write_gguf(spec: Spec, path: Path, raw: dict[str, np.ndarray], types: dict[str, QT], vocab: Vocab) -> None:
    wr = gguf.GGUFWriter(str(path), spec.arch)
    wr.add_type(gguf.GGUFType.MODEL)
    wr.add_name(spec.name)
    wr.add_description(
        f"egpu synthetic test model: random weights (numpy seed {spec.seed}), not a trained model; "
        "built by scripts/gen_tiny_models.py")
    wr.add_file_type(FILE_TYPE[spec.matrix_type])
    wr.add_vocab_size(spec.n_vocab)
    wr.add_context_length(spec.n_ctx_train)
    wr.add_embedding_length(spec.n_embd)
    wr.add_block_count(spec.n_layer)
    wr.add_feed_forward_length(spec.n_ff)
    wr.add_head_count(spec.n_head)
    wr.add_head_count_kv(spec.n_head_kv)
    if spec.arch == "gpt2":
        wr.add_layer_norm_eps(spec.norm_eps)
    else:
        wr.add_layer_norm_rms_eps(spec.norm_eps)
        wr.add_rope_freq_base(spec.rope_theta)
        wr.add_rope_dimension_count(spec.head_dim)
        if spec.head_dim * spec.n_head != spec.n_embd:
            wr.add_key_length(spec.head_dim)
            wr.add_value_length(spec.head_dim)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre(spec.pre)
    wr.add_token_list(vocab.tokens)
    wr.add_token_types(vocab.types)
    wr.add_token_merges(vocab.merges)
    wr.add_bos_token_id(vocab.special[spec.bos])
    wr.add_eos_token_id(vocab.special[spec.eos])
    wr.add_add_bos_token(spec.add_bos)
    if spec.arch in ("qwen2", "qwen3"):
        wr.add_pad_token_id(vocab.special["<|endoftext|>"])
    if spec.arch == "llama":
        wr.add_eot_token_id(vocab.special["<|eot_id|>"])
    for name, a in raw.items():
        if types[name] in (QT.F32, QT.F16):
            wr.add_tensor(name, a)
        else:
            wr.add_tensor(name, a, raw_dtype=types[name])
    wr.add_quantization_version(gguf.GGML_QUANT_VERSION)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# ---------------------------------------------------------------------------------------------
# transformers reference.


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's q/k row permutation for llama (HF rotate_half -> GPT-J pairs).

    In the GGUF, the rows of head h are ordered (k, j) where HF orders them (j, k), with
    j in {0, 1} the rotate_half half and k < head_dim/2 the frequency index."""
    out_f, in_f = w.shape
    hd = out_f // n_head
    return w.reshape(n_head, hd // 2, 2, in_f).swapaxes(1, 2).reshape(out_f, in_f)


def hf_state_dict(spec: Spec, w: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
    sd: dict[str, np.ndarray] = {}
    L = spec.n_layer
    if spec.arch == "gpt2":
        sd["transformer.wte.weight"] = w["token_embd.weight"]
        sd["transformer.wpe.weight"] = w["position_embd.weight"]
        for i in range(L):
            p, h = f"blk.{i}.", f"transformer.h.{i}."
            sd[h + "ln_1.weight"] = w[p + "attn_norm.weight"]
            sd[h + "ln_1.bias"] = w[p + "attn_norm.bias"]
            # GPT-2's Conv1D stores (in, out): transpose of the GGUF/Linear layout.
            sd[h + "attn.c_attn.weight"] = w[p + "attn_qkv.weight"].T
            sd[h + "attn.c_attn.bias"] = w[p + "attn_qkv.bias"]
            sd[h + "attn.c_proj.weight"] = w[p + "attn_output.weight"].T
            sd[h + "attn.c_proj.bias"] = w[p + "attn_output.bias"]
            sd[h + "ln_2.weight"] = w[p + "ffn_norm.weight"]
            sd[h + "ln_2.bias"] = w[p + "ffn_norm.bias"]
            sd[h + "mlp.c_fc.weight"] = w[p + "ffn_up.weight"].T
            sd[h + "mlp.c_fc.bias"] = w[p + "ffn_up.bias"]
            sd[h + "mlp.c_proj.weight"] = w[p + "ffn_down.weight"].T
            sd[h + "mlp.c_proj.bias"] = w[p + "ffn_down.bias"]
        sd["transformer.ln_f.weight"] = w["output_norm.weight"]
        sd["transformer.ln_f.bias"] = w["output_norm.bias"]
        sd["lm_head.weight"] = w["token_embd.weight"]
        return "transformer", sd
    sd["model.embed_tokens.weight"] = w["token_embd.weight"]
    for i in range(L):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = w[p + "attn_norm.weight"]
        q, k = w[p + "attn_q.weight"], w[p + "attn_k.weight"]
        if spec.arch == "llama":
            q, k = unpermute_rope_rows(q, spec.n_head), unpermute_rope_rows(k, spec.n_head_kv)
        sd[h + "self_attn.q_proj.weight"] = q
        sd[h + "self_attn.k_proj.weight"] = k
        sd[h + "self_attn.v_proj.weight"] = w[p + "attn_v.weight"]
        if spec.arch == "qwen2":
            sd[h + "self_attn.q_proj.bias"] = w[p + "attn_q.bias"]
            sd[h + "self_attn.k_proj.bias"] = w[p + "attn_k.bias"]
            sd[h + "self_attn.v_proj.bias"] = w[p + "attn_v.bias"]
        if spec.arch == "qwen3":
            sd[h + "self_attn.q_norm.weight"] = w[p + "attn_q_norm.weight"]
            sd[h + "self_attn.k_norm.weight"] = w[p + "attn_k_norm.weight"]
        sd[h + "self_attn.o_proj.weight"] = w[p + "attn_output.weight"]
        sd[h + "post_attention_layernorm.weight"] = w[p + "ffn_norm.weight"]
        sd[h + "mlp.gate_proj.weight"] = w[p + "ffn_gate.weight"]
        sd[h + "mlp.up_proj.weight"] = w[p + "ffn_up.weight"]
        sd[h + "mlp.down_proj.weight"] = w[p + "ffn_down.weight"]
    sd["model.norm.weight"] = w["output_norm.weight"]
    sd["lm_head.weight"] = w["token_embd.weight"] if spec.tied_output else w["output.weight"]
    return "model", sd


def transformers_logits(spec: Spec, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=spec.n_vocab, tie_word_embeddings=spec.tied_output,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if spec.arch == "gpt2":
        cfg = tf.GPT2Config(n_positions=spec.n_ctx_train, n_embd=spec.n_embd, n_layer=spec.n_layer,
                            n_head=spec.n_head, n_inner=spec.n_ff, activation_function="gelu_new",
                            layer_norm_epsilon=spec.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **common)
        cls = tf.GPT2LMHeadModel
    else:
        rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
        if spec.rope_llama3 is not None:
            rope = {"rope_type": "llama3", "rope_theta": spec.rope_theta, **spec.rope_llama3}
        kw = dict(hidden_size=spec.n_embd, intermediate_size=spec.n_ff,
                  num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head,
                  num_key_value_heads=spec.n_head_kv, max_position_embeddings=spec.n_ctx_train,
                  rms_norm_eps=spec.norm_eps, rope_parameters=rope, hidden_act="silu",
                  attention_dropout=0.0, **common)
        if spec.arch == "qwen2":
            cfg, cls = tf.Qwen2Config(use_sliding_window=False, **kw), tf.Qwen2ForCausalLM
        elif spec.arch == "qwen3":
            cfg, cls = tf.Qwen3Config(head_dim=spec.head_dim, attention_bias=False,
                                      use_sliding_window=False, **kw), tf.Qwen3ForCausalLM
        else:
            cfg, cls = tf.LlamaConfig(head_dim=spec.head_dim, attention_bias=False, mlp_bias=False,
                                      **kw), tf.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    _, sd = hf_state_dict(spec, w)
    expected = set(model.state_dict().keys())
    if set(sd) != expected:
        raise RuntimeError(f"{spec.name}: state dict mismatch: missing {sorted(expected - set(sd))}, "
                           f"unexpected {sorted(set(sd) - expected)}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    model = model.double()
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long), use_cache=False).logits[0]
    return out.numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# llama.cpp reference.

LLAMA_KW = dict(n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, n_threads=2,
                n_threads_batch=2, seed=0, verbose=False,
                type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache (default would be F16)


def llamacpp_run(spec: Spec, path: Path, ids: list[int], vocab: Vocab) -> dict:
    from llama_cpp import Llama

    m = Llama(str(path), **LLAMA_KW)
    m.reset()
    m.eval(ids)
    batch = np.array(m.scores[: len(ids)], dtype=np.float64)
    m.reset()
    for t in ids:
        m.eval([t])
    incremental = np.array(m.scores[: len(ids)], dtype=np.float64)
    checks = []
    specials = spec.specials
    for text, special in [("Hello world", False),
                          ("the river rises in spring,\n 1921 o'clock", False),
                          (f"{specials[-1]}count the fish{specials[0]}", True)]:
        tids = m.tokenize(text.encode(), add_bos=False, special=special)
        checks.append({"text": text, "parse_special": special, "llama_cpp_ids": tids,
                       "llama_cpp_detok": m.detokenize(tids, special=True).decode("utf-8", "replace")})
    m.close()
    m1 = Llama(str(path), **{**LLAMA_KW, "n_threads": 1, "n_threads_batch": 1})
    m1.reset()
    m1.eval(ids)
    one_thread = np.array(m1.scores[: len(ids)], dtype=np.float64)
    m1.close()
    return {"batch": batch, "incremental": incremental, "one_thread": one_thread, "checks": checks}


# ---------------------------------------------------------------------------------------------


def sig6(a: np.ndarray) -> list:
    return [[float(f"{x:.6g}") for x in row] for row in a]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(spec: Spec, out_dir: Path, weights_cache: dict) -> dict:
    vocab = build_vocab(spec.n_vocab, spec.specials)
    base = spec.weights_from or spec.name
    if base not in weights_cache:
        weights_cache[base] = random_weights(spec)
    w = weights_cache[base]
    raw, exact, types = store(spec, w)
    path = out_dir / f"{spec.name}.gguf"
    write_gguf(spec, path, raw, types, vocab)

    # The fixed random sequence: no control tokens, so every id is ordinary text.
    rng = np.random.default_rng(spec.seed + 7)
    n_text = spec.n_vocab - len(spec.specials)
    ids = [int(x) for x in rng.integers(0, n_text, SEQ_LEN)]

    tf_logits = transformers_logits(spec, exact, ids)
    lc = llamacpp_run(spec, path, ids, vocab)
    lc_logits, lc_incr, tok_checks = lc["batch"], lc["incremental"], lc["checks"]
    for label, arr in (("transformers", tf_logits), ("llama.cpp", lc_logits)):
        if arr.shape != (SEQ_LEN, spec.n_vocab) or not np.all(np.isfinite(arr)):
            raise RuntimeError(f"{spec.name}: {label} logits bad: shape {arr.shape}")
    diff = float(np.max(np.abs(tf_logits - lc_logits)))
    spread = float(np.std(tf_logits))
    # Loose bounds: llama.cpp rounds activations to F16 / Q8_0 for F16 / Q8_0 matmuls, while a
    # mislaid tensor gives differences of the order of the logits themselves.
    bound = {QT.F32: 1e-4, QT.F16: 0.05, QT.Q8_0: 0.15}[spec.matrix_type] * max(spread, 1.0)
    if diff > bound:
        raise RuntimeError(f"{spec.name}: transformers and llama.cpp disagree (max diff {diff:.4g}, "
                           f"logit std {spread:.3g}): a tensor is probably laid out wrongly")

    hparams = {k: getattr(spec, k) for k in (
        "n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx_train", "head_dim",
        "norm_eps", "tied_output", "add_bos")}
    if spec.arch != "gpt2":
        hparams["rope_theta"] = spec.rope_theta
        hparams["rope_type"] = "neox" if spec.arch in ("qwen2", "qwen3") else "norm"
    if spec.rope_llama3 is not None:
        hparams["rope_llama3"] = spec.rope_llama3
        hparams["rope_freqs"] = [float(x) for x in w["rope_freqs.weight"]]
    hparams["special_tokens"] = vocab.special
    hparams["bos_token_id"] = vocab.special[spec.bos]
    hparams["eos_token_id"] = vocab.special[spec.eos]

    ref = {
        "model": path.name,
        "model_sha256": sha256(path),
        "model_bytes": path.stat().st_size,
        "arch": spec.arch,
        "hparams": hparams,
        "tensor_types": {k: v.name for k, v in types.items()},
        "token_ids": ids,
        "logits": {"transformers": sig6(tf_logits), "llama.cpp": sig6(lc_logits)},
        "argmax": {"transformers": [int(x) for x in tf_logits.argmax(-1)],
                   "llama.cpp": [int(x) for x in lc_logits.argmax(-1)]},
        "max_abs_diff_transformers_vs_llamacpp": float(f"{diff:.4g}"),
        "llamacpp_incremental_vs_batch_max_abs_diff": float(f"{float(np.max(np.abs(lc_incr - lc_logits))):.4g}"),
        "llamacpp_threads_1_vs_2_max_abs_diff": float(f"{float(np.max(np.abs(lc['one_thread'] - lc_logits))):.4g}"),
        "tokenizer_check": tok_checks,
        "reference_info": {
            "transformers": {
                "version": version("transformers"), "torch": version("torch"),
                "class": {"gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM",
                          "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[spec.arch],
                "dtype": "float64 (weights = exact values of the GGUF tensors)",
                "attn_implementation": "eager",
                "call": "model(torch.tensor([token_ids]), use_cache=False).logits[0]",
            },
            "llama.cpp": {
                "llama_cpp_python": version("llama_cpp_python"), "llama_cpp_commit": LLAMA_CPP_COMMIT,
                "backend": "CPU",
                "call": f"Llama(model_path, **{LLAMA_KW}); reset(); eval(token_ids); scores[:{SEQ_LEN}]",
                "flash_attn": False,
            },
            "generator": "scripts/gen_tiny_models.py",
            "logits_rounding": "6 significant digits",
        },
    }
    return ref


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="build into a temp dir and compare with the committed fixtures")
    ap.add_argument("--only", nargs="*", help="model names to build (default: all)")
    args = ap.parse_args()

    import tempfile
    tmp = tempfile.TemporaryDirectory(prefix="egpu-tiny-") if args.check else None
    out_dir = Path(tmp.name) if tmp else OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    ok = True
    for spec in SPECS:
        if args.only and spec.name not in args.only:
            continue
        ref = build(spec, out_dir, cache)
        text = json.dumps(ref, separators=(",", ":"), ensure_ascii=False) + "\n"
        ref_path = out_dir / f"{spec.name}.ref.json"
        ref_path.write_text(text, encoding="utf-8")
        print(f"{spec.name}: {ref['model_bytes']} B gguf, {len(text)} B ref, "
              f"tf-vs-llama.cpp max diff {ref['max_abs_diff_transformers_vs_llamacpp']}, "
              f"incr-vs-batch {ref['llamacpp_incremental_vs_batch_max_abs_diff']}, "
              f"threads 1-vs-2 {ref['llamacpp_threads_1_vs_2_max_abs_diff']}, "
              f"argmax agree {sum(a == b for a, b in zip(*ref['argmax'].values()))}/{SEQ_LEN}")
        if args.check:
            committed = OUT_DIR / f"{spec.name}.gguf"
            same_gguf = committed.exists() and committed.read_bytes() == (out_dir / f"{spec.name}.gguf").read_bytes()
            old = json.loads((OUT_DIR / ref_path.name).read_text()) if (OUT_DIR / ref_path.name).exists() else None
            same_ref = old == json.loads(text)
            print(f"  check: gguf identical={same_gguf}, ref json identical={same_ref}")
            if old and not same_ref:
                for key in ("transformers", "llama.cpp"):
                    d = np.max(np.abs(np.array(old["logits"][key]) - np.array(ref["logits"][key])))
                    print(f"    {key}: max |logit diff| vs committed {d:.3g}")
            ok &= same_gguf
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

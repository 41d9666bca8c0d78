"""Record llama.cpp's outputs on the real test models, as an outside reference for egpu's numerics.

Run (the reference venv has llama-cpp-python 0.3.36 = llama.cpp 0c1e57098, gguf-py, numpy,
jinja2, and for the exact-f32 section torch CPU + transformers + accelerate; models from
scripts/fetch-models.sh):

    /work/venv-ref/bin/python scripts/gen_llamacpp_refs.py [MODELS_DIR] [OUT_DIR]
        [--no-f32]     skip the transformers exact-f32 section (no torch needed)
        [--f32-only]   keep the llama.cpp part of the existing JSON, redo only exact_f32

MODELS_DIR defaults to ./models (falls back to /work/main/models), OUT_DIR to
engine/tests/fixtures/llamacpp. Takes ~11 minutes for llama.cpp on 2 busy cores (every model is
run three times: n_threads=2 twice, n_threads=1 once, to check reproducibility) plus ~6 minutes
for the exact-f32 pass.

For each model (SmolLM2-135M-Instruct.Q4_1, gemma-3-270m-q4_k_m) it writes <model-stem>.json.
Per prompt:

1. Greedy continuation, the way llama.cpp's `llama-simple` makes it: eval the prompt ids in one
   batch, then 32 times: argmax of the last position's logits (first index on exact ties), eval
   that one token. Does not stop at EOS. The top1-top2 logit gap seen at each of these 32
   decode steps is stored too ("generated_gap").
2. Teacher forcing: a fresh KV cache, the whole sequence (prompt + continuation) evaluated in
   ONE batch with logits for every position. For every position p (0-based over the full
   sequence) the file stores: the actual next token seq[p+1] (null at the last position) and its
   log-softmax, the top-10 [id, logprob], the top1-top2 logit gap, logsumexp of the logits (so
   any logprob converts back to a raw logit: logit = logprob + logsumexp), and the raw logits at
   the model's 64 fixed "logit_ids".

   Batch (teacher-forced) and one-token-at-a-time (generation) logits differ a little in
   llama.cpp (different matmul kernels/activation blocking), so at a near-tie the teacher-forced
   argmax can differ from the generated token; "teacher_forced_argmax_matches_generated" flags it.

3. Exact f32 (second, independent reference; skip with --no-f32): the same teacher-forced
   sequences through transformers (LlamaForCausalLM / Gemma3ForCausalLM) in float32, weights
   dequantized from the same GGUF by transformers' GGUF loader. No activation quantization, so
   this is what an exact-f32 engine should match most closely; "vs_llamacpp" says how far
   llama.cpp is from it (measured: mean |d logprob_next| 0.02-0.08, max 0.4 (SmolLM2) / 0.75
   (Gemma chat); raw logits move by up to ~1-3.5 with most of it a common shift, logsumexp).

The prompts: for SmolLM2 the three from shared/reference/smollm2-llamacpp.txt (same ids,
checked), a ChatML chat prompt rendered with the GGUF's own chat template, and a ~100-token
text. SmolLM2's GGUF says add_bos_token=false: ids are the full model input. For Gemma 3 the
same texts raw with BOS (its GGUF says add_bos_token=true), and a chat prompt in Gemma's turn
format (the GGUF has no chat template).

JSON schema (values rounded to 4 decimals):
  {
    "schema": "egpu-llamacpp-ref-v1",
    "model": {"file", "sha256", "bytes", "arch", "n_vocab", "add_bos_token"},
    "llama_cpp": {"commit", "llama_cpp_python", "system_info", "n_threads", "n_threads_batch",
                  "n_ctx", "n_batch", "kv_cache_type", "flash_attn", "seed", "api"},
    "reproducibility": {...},           # reruns and thread-count comparison, see below
    "logit_ids": [64 ints],             # fixed per model: 10 frequent top-1 ids + 54 random ids
    "n_generate": 32,
    "prompts": [{
        "name", "kind" ("raw"|"chat"), "text", "add_bos",
        "prompt_ids": [...], "continuation_ids": [32 ints], "token_ids": prompt+continuation,
        "continuation_text",
        "generated_gap": [32 floats],                # top1-top2 at each decode step
        "teacher_forced_argmax_matches_generated": [32 bools],
        "positions": {                               # arrays of length len(token_ids)
            "next_token": [int | null], "logprob_next": [float | null],
            "top10": [[[id, logprob] x10]], "top1_minus_top2": [float],
            "logsumexp": [float], "logits_at_ids": [[64 floats]] },
        "exact_f32": {                               # transformers float32, same token_ids
            "logprob_next": [float | null], "argmax": [int], "top1_minus_top2": [float],
            "logsumexp": [float],
            "vs_llamacpp": {"max_abs_logprob_next_diff", "mean_abs_logprob_next_diff",
                            "max_abs_logit_at_ids_diff", "max_abs_logsumexp_diff",
                            "argmax_differs_at_positions": [int]} },
        "matches_shared_reference_continuation": bool   # SmolLM2's 3 shared prompts only
    }],
    "exact_f32_reference": {"what", "transformers", "torch", "class", "api"}
  }

"reproducibility" records the max |logit difference| of the teacher-forced logits between two
runs with n_threads=2 (expected 0: same threads -> bitwise identical) and between n_threads=1
and n_threads=2, and whether the greedy continuations are the same in all runs. Measured on
this machine (AVX2 CPU, llama.cpp built with OpenMP): 0.0 for both, for both models -- llama.cpp's
CPU results here are bitwise identical across reruns and across n_threads 1 and 2, and two
separate runs of this whole script wrote identical numbers. The SmolLM2 continuations equal the
ones in shared/reference/smollm2-llamacpp.txt (llama-simple, default 4 threads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from importlib.metadata import version
from pathlib import Path

import jinja2
import numpy as np

import gguf

ROOT = Path(__file__).resolve().parent.parent
N_GEN = 32
N_TOP = 10
N_LOGIT_IDS = 64
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
N_CTX = 256
THREADS = 2

LONG_TEXT = (
    "The lighthouse keeper kept a careful log of every ship that passed the point. Each entry "
    "listed the hour, the direction of the wind, the height of the waves and the name painted on "
    "the bow, if he could read it through the spray. In the winter of the great storm he wrote "
    "nothing for three days, and when the weather finally cleared he found that the old oak "
    "tree behind the cottage had fallen across the path to the village. He spent the"
)
CHAT_QUESTION = "What is the capital of France? Answer in one sentence."

# (name, text, expected SmolLM2 ids from shared/reference/smollm2-llamacpp.txt or None)
RAW_PROMPTS = [
    ("capital", "The capital of France is", [504, 3575, 282, 4649, 314]),
    ("robot", "Once upon a time, there was a little robot who",
     [6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8085, 617]),
    ("fibonacci", "def fibonacci(n):\n", [1604, 3987, 46477, 24, 94, 727, 198]),
    ("long", LONG_TEXT, None),
]
# Continuations in the shared reference (llama-simple): checked, not assumed.
SMOLLM2_SHARED_CONTINUATIONS = {
    "capital": [7042, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33, 33,
                2215, 701, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33],
    "robot": [761, 253, 1767, 2470, 288, 919, 1495, 12396, 30, 909, 436, 1217, 476, 504, 3389,
              1207, 517, 18, 411, 650, 2428, 30, 198, 198, 2705, 1194, 28, 253, 1528, 282, 2428,
              4041],
    "fibonacci": [198, 1604, 3987, 46477, 24, 94, 727, 472, 585, 304, 10204, 216, 33, 42, 448,
                  1003, 304, 472, 1745, 42, 448, 1003, 3987, 46477, 24, 94, 731, 216, 33, 25, 1232,
                  3987],
}

MODELS = [
    {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "chat": "gguf-template", "seed": 135},
    {"file": "gemma-3-270m-q4_k_m.gguf", "chat": "gemma", "seed": 270},
]


def r4(x: float) -> float:
    return round(float(x), 4)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_meta(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))

    def get(key, default=None):
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    arch = get("general.architecture")
    return {"arch": arch, "add_bos": bool(get("tokenizer.ggml.add_bos_token", False)),
            "chat_template": get("tokenizer.chat_template")}


def chat_prompt(model: dict, meta: dict) -> str:
    messages = [{"role": "user", "content": CHAT_QUESTION}]
    if model["chat"] == "gguf-template":
        tmpl = jinja2.Environment().from_string(meta["chat_template"])
        return tmpl.render(messages=messages, add_generation_prompt=True)
    # Gemma's turn format (BOS is added by tokenization, as for the raw prompts).
    return f"<start_of_turn>user\n{CHAT_QUESTION}<end_of_turn>\n<start_of_turn>model\n"


def load(path: Path, n_threads: int):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, logits_all=True,
                 n_threads=n_threads, n_threads_batch=n_threads, seed=0, verbose=False)


def top2_gap(row: np.ndarray) -> float:
    a, b = np.partition(row, -2)[-2:]
    return float(max(a, b) - min(a, b))


def run_prompt(m, ids: list[int]) -> tuple[list[int], list[float], np.ndarray]:
    """Greedy continuation (decode one token at a time), then teacher-forced logits (one batch)."""
    m.reset()
    m.eval(ids)
    cont, gaps = [], []
    for _ in range(N_GEN):
        row = np.array(m.scores[m.n_tokens - 1], dtype=np.float32)
        nxt = int(np.argmax(row))
        cont.append(nxt)
        gaps.append(top2_gap(row))
        m.eval([nxt])
    seq = ids + cont
    m.reset()
    m.eval(seq)
    logits = np.array(m.scores[: len(seq)], dtype=np.float32)
    return cont, gaps, logits


def run_model(path: Path, prompts: list[dict], n_threads: int) -> list[dict]:
    m = load(path, n_threads)
    out = []
    for p in prompts:
        cont, gaps, logits = run_prompt(m, p["prompt_ids"])
        if not np.all(np.isfinite(logits)):
            raise RuntimeError(f"{path.name} {p['name']}: non-finite logits")
        out.append({"continuation_ids": cont, "generated_gap": gaps, "logits": logits,
                    "continuation_text": m.detokenize(cont, special=True).decode("utf-8", "replace")})
        print(f"  {p['name']}: {len(p['prompt_ids'])}+{N_GEN} tokens (threads={n_threads})", flush=True)
    m.close()
    return out


def logsumexp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    mx = x.max(axis=-1, keepdims=True)
    return (mx + np.log(np.exp(x - mx).sum(axis=-1, keepdims=True)))[..., 0]


def choose_logit_ids(runs: list[dict], n_vocab: int, seed: int) -> list[int]:
    counts: dict[int, int] = {}
    for r in runs:
        for t in np.argmax(r["logits"], axis=-1):
            counts[int(t)] = counts.get(int(t), 0) + 1
    frequent = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:10]
    rng = np.random.default_rng(seed)
    rest = [int(t) for t in rng.permutation(n_vocab) if int(t) not in frequent]
    return sorted(frequent + rest[: N_LOGIT_IDS - len(frequent)])


def positions_block(seq: list[int], logits: np.ndarray, logit_ids: list[int]) -> dict:
    lse = logsumexp(logits)
    logp = logits.astype(np.float64) - lse[:, None]
    n = len(seq)
    next_tok, lp_next, top10, gap, at_ids = [], [], [], [], []
    for p in range(n):
        row = logp[p]
        if p + 1 < n:
            next_tok.append(seq[p + 1])
            lp_next.append(r4(row[seq[p + 1]]))
        else:
            next_tok.append(None)
            lp_next.append(None)
        top = np.argpartition(-row, N_TOP)[:N_TOP]
        top = top[np.lexsort((top, -row[top]))]  # by logprob desc, then id
        top10.append([[int(t), r4(row[t])] for t in top])
        gap.append(r4(top2_gap(logits[p])))
        at_ids.append([r4(logits[p, t]) for t in logit_ids])
    return {"next_token": next_tok, "logprob_next": lp_next, "top10": top10,
            "top1_minus_top2": gap, "logsumexp": [r4(x) for x in lse], "logits_at_ids": at_ids}


def exact_f32_section(models_dir: Path, doc: dict) -> dict:
    """Teacher-forced logits of an exact float32 forward pass on the same dequantized weights
    (transformers' own implementation, weights dequantized by its GGUF loader via gguf-py),
    on llama.cpp's token sequences; with how far llama.cpp is from it."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(
        str(models_dir), gguf_file=doc["model"]["file"], dtype=torch.float32,
        attn_implementation="eager").eval()
    ids_sel = doc["logit_ids"]
    for p in doc["prompts"]:
        seq = p["token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([seq]), use_cache=False).logits[0].double().numpy()
        if logits.shape[-1] < doc["model"]["n_vocab"]:
            raise RuntimeError("transformers vocab smaller than llama.cpp's")
        logits = logits[:, : doc["model"]["n_vocab"]]
        lse = logsumexp(logits)
        n = len(seq)
        lp = [float(logits[i, seq[i + 1]] - lse[i]) for i in range(n - 1)]
        pos = p["positions"]
        ref_lp = np.array(pos["logprob_next"][:-1], dtype=np.float64)
        d_lp = np.abs(np.array(lp) - ref_lp)
        d_at = np.abs(logits[:, ids_sel] - np.array(pos["logits_at_ids"]))
        d_lse = np.abs(lse - np.array(pos["logsumexp"]))
        argmax = [int(t) for t in logits.argmax(-1)]
        p["exact_f32"] = {
            "logprob_next": [r4(x) for x in lp] + [None],
            "argmax": argmax,
            "top1_minus_top2": [r4(top2_gap(row)) for row in logits],
            "logsumexp": [r4(x) for x in lse],
            "vs_llamacpp": {
                "max_abs_logprob_next_diff": r4(d_lp.max()),
                "mean_abs_logprob_next_diff": r4(d_lp.mean()),
                "max_abs_logit_at_ids_diff": r4(d_at.max()),
                "max_abs_logsumexp_diff": r4(d_lse.max()),
                "argmax_differs_at_positions": [i for i in range(n) if argmax[i] != pos["top10"][i][0][0]],
            },
        }
        print(f"  exact f32 {p['name']}: {json.dumps(p['exact_f32']['vs_llamacpp'])}", flush=True)
    doc["exact_f32_reference"] = {
        "what": "prompts[].exact_f32: the same teacher-forced sequences through an exact float32 "
                "forward pass (no activation quantization) on the dequantized GGUF weights",
        "transformers": version("transformers"), "torch": version("torch"),
        "class": type(model).__name__,
        "api": f"AutoModelForCausalLM.from_pretrained(models_dir, gguf_file={doc['model']['file']!r}, "
               "dtype=torch.float32, attn_implementation='eager'); model(torch.tensor([token_ids]), "
               "use_cache=False).logits[0]",
    }
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models_dir", nargs="?", default=str(ROOT / "models"))
    ap.add_argument("out_dir", nargs="?", default=str(ROOT / "engine" / "tests" / "fixtures" / "llamacpp"))
    ap.add_argument("--no-f32", action="store_true", help="skip the transformers exact-f32 section")
    ap.add_argument("--f32-only", action="store_true",
                    help="keep the llama.cpp part of existing JSON files, (re)compute only exact_f32")
    args = ap.parse_args()
    models_dir = Path(args.models_dir)
    if not models_dir.exists():
        models_dir = Path("/work/main/models")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.f32_only:
        for model in MODELS:
            dest = out_dir / (Path(model["file"]).stem + ".json")
            doc = json.loads(dest.read_text(encoding="utf-8"))
            print(f"{model['file']}: exact f32 only", flush=True)
            write_doc(dest, exact_f32_section(models_dir, doc))
        return 0

    import llama_cpp

    for model in MODELS:
        path = models_dir / model["file"]
        meta = gguf_meta(path)
        add_bos = meta["add_bos"]
        print(f"{path.name}: arch {meta['arch']}, add_bos {add_bos}", flush=True)

        tok = load(path, THREADS)
        n_vocab = tok.n_vocab()
        prompts = []
        for name, text, expected in RAW_PROMPTS:
            ids = tok.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
            if expected is not None and model["file"].startswith("SmolLM2") and ids != expected:
                raise RuntimeError(f"{name}: ids {ids} differ from the shared reference {expected}")
            prompts.append({"name": name, "kind": "raw", "text": text, "add_bos": add_bos, "prompt_ids": ids})
        chat = chat_prompt(model, meta)
        ids = tok.tokenize(chat.encode("utf-8"), add_bos=add_bos, special=True)
        prompts.insert(3, {"name": "chat", "kind": "chat", "text": chat, "add_bos": add_bos, "prompt_ids": ids})
        tok.close()

        run_a = run_model(path, prompts, THREADS)
        run_b = run_model(path, prompts, THREADS)
        run_1 = run_model(path, prompts, 1)

        def max_diff(x: list[dict], y: list[dict]) -> float | None:
            if any(a["continuation_ids"] != b["continuation_ids"] for a, b in zip(x, y)):
                return None  # different sequences: logits not comparable position by position
            return float(max(np.max(np.abs(a["logits"] - b["logits"])) for a, b in zip(x, y)))

        repro = {
            "rerun_same_threads_max_abs_logit_diff": max_diff(run_a, run_b),
            "rerun_same_threads_same_continuations": all(
                a["continuation_ids"] == b["continuation_ids"] for a, b in zip(run_a, run_b)),
            "threads_1_vs_2_max_abs_logit_diff": max_diff(run_a, run_1),
            "threads_1_vs_2_same_continuations": all(
                a["continuation_ids"] == b["continuation_ids"] for a, b in zip(run_a, run_1)),
            "threads_1_vs_2_per_prompt_max_abs_logit_diff": {
                p["name"]: (float(np.max(np.abs(a["logits"] - b["logits"])))
                            if a["continuation_ids"] == b["continuation_ids"] else None)
                for p, a, b in zip(prompts, run_a, run_1)},
            "note": "diffs are over the teacher-forced logits of every position, raw (unrounded) float32",
        }
        print(f"  reproducibility: {json.dumps(repro)}", flush=True)

        logit_ids = choose_logit_ids(run_a, n_vocab, model["seed"])
        out_prompts = []
        for p, r in zip(prompts, run_a):
            seq = p["prompt_ids"] + r["continuation_ids"]
            n_p = len(p["prompt_ids"])
            tf_argmax = np.argmax(r["logits"], axis=-1)
            entry = dict(p)
            entry.update({
                "continuation_ids": r["continuation_ids"],
                "token_ids": seq,
                "continuation_text": r["continuation_text"],
                "generated_gap": [r4(g) for g in r["generated_gap"]],
                "teacher_forced_argmax_matches_generated": [
                    bool(int(tf_argmax[n_p - 1 + i]) == r["continuation_ids"][i]) for i in range(N_GEN)],
                "positions": positions_block(seq, r["logits"], logit_ids),
            })
            if model["file"].startswith("SmolLM2") and p["name"] in SMOLLM2_SHARED_CONTINUATIONS:
                entry["matches_shared_reference_continuation"] = (
                    r["continuation_ids"] == SMOLLM2_SHARED_CONTINUATIONS[p["name"]])
            out_prompts.append(entry)

        doc = {
            "schema": "egpu-llamacpp-ref-v1",
            "generator": "scripts/gen_llamacpp_refs.py",
            "model": {"file": path.name, "sha256": sha256(path), "bytes": path.stat().st_size,
                      "arch": meta["arch"], "n_vocab": n_vocab, "add_bos_token": add_bos},
            "llama_cpp": {
                "commit": LLAMA_CPP_COMMIT,
                "llama_cpp_python": version("llama_cpp_python"),
                "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                "backend": "CPU",
                "n_threads": THREADS, "n_threads_batch": THREADS,
                "n_ctx": N_CTX, "n_batch": N_CTX, "n_ubatch": N_CTX,
                "kv_cache_type": "f16 (default)", "flash_attn": False, "seed": 0,
                "swa_full": "llama.cpp default (full-size SWA cache); all sequences here are shorter "
                            "than Gemma 3's 512-token sliding window",
                "continuation_text": "llm.detokenize(continuation_ids, special=True)",
                "api": [
                    f"llama_cpp.Llama(model_path, n_ctx={N_CTX}, n_batch={N_CTX}, n_ubatch={N_CTX}, "
                    f"logits_all=True, n_threads={THREADS}, n_threads_batch={THREADS}, seed=0, verbose=False)",
                    "prompt_ids = llm.tokenize(text.encode(), add_bos=<GGUF add_bos_token>, special=<True for chat prompts>)",
                    "generation: llm.reset(); llm.eval(prompt_ids); 32x { t = argmax(llm.scores[llm.n_tokens-1]); llm.eval([t]) }",
                    "teacher forcing: llm.reset(); llm.eval(prompt_ids + continuation_ids); logits = llm.scores[:len(seq)]",
                ],
            },
            "reproducibility": repro,
            "logit_ids": logit_ids,
            "n_generate": N_GEN,
            "rounding": "4 decimals",
            "prompts": out_prompts,
        }
        if not args.no_f32:
            doc = exact_f32_section(models_dir, doc)
        write_doc(out_dir / (Path(model["file"]).stem + ".json"), doc)
    return 0


def write_doc(dest: Path, doc: dict) -> None:
    dest.write_text(json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"  wrote {dest} ({dest.stat().st_size} bytes)", flush=True)


if __name__ == "__main__":
    sys.exit(main())

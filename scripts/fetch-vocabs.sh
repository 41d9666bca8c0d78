#!/usr/bin/env bash
# Fetch llama.cpp's vocab-only GGUF files that the tokenizer tests compare against, from the
# llama-cpp-python 0.3.36 source distribution on PyPI (it vendors llama.cpp 0c1e57098, models/
# included). Idempotent: files whose sha256 already matches are left alone.
#
#   scripts/fetch-vocabs.sh [DIR]      (default: ./models, or $EGPU_MODELS; files go to DIR/vocab)
#
# Vocabs (7.8 MB, 5.9 MB, 1.8 MB, 0.7 MB):
#   ggml-vocab-llama-bpe.gguf   LLaMA 3 byte-level BPE, pre-tokenizer llama-bpe
#   ggml-vocab-qwen2.gguf       Qwen 2 byte-level BPE, pre-tokenizer qwen2
#   ggml-vocab-gpt-2.gguf       GPT-2 byte-level BPE, pre-tokenizer gpt-2
#   ggml-vocab-llama-spm.gguf   LLaMA 2 SentencePiece
set -euo pipefail

dir="${1:-${EGPU_MODELS:-$(cd "$(dirname "$0")/.." && pwd)/models}}/vocab"
mkdir -p "$dir"

sdist=llama_cpp_python-0.3.36.tar.gz
sdist_sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
declare -A want=(
  [ggml-vocab-llama-bpe.gguf]=97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e
  [ggml-vocab-qwen2.gguf]=44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c
  [ggml-vocab-gpt-2.gguf]=cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac
  [ggml-vocab-llama-spm.gguf]=16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69
)

have() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

missing=()
for f in "${!want[@]}"; do
  have "$dir/$f" "${want[$f]}" || missing+=("$f")
done

if [ ${#missing[@]} -gt 0 ]; then
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  echo "fetching ${missing[*]} (PyPI llama-cpp-python 0.3.36 sdist, 77 MB)" >&2
  # Only this package as source; its build requirements (needed to read its metadata) may be wheels.
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$dl" \
    llama-cpp-python==0.3.36
  have "$dl/$sdist" "$sdist_sha" || { echo "sha256 mismatch for $sdist" >&2; exit 1; }
  for f in "${missing[@]}"; do
    tar -xzf "$dl/$sdist" -O "llama_cpp_python-0.3.36/vendor/llama.cpp/models/$f" > "$dir/$f.tmp"
    mv "$dir/$f.tmp" "$dir/$f"
    have "$dir/$f" "${want[$f]}" || { echo "sha256 mismatch for $f" >&2; exit 1; }
  done
fi
echo "$dir"

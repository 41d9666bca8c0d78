#!/usr/bin/env bash
# The README's first command: fetch the real SmolLM2-135M model, build egpu, and run it on the
# CPU backend. Works from a clean clone with Rust, Python 3 and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
models=$(scripts/fetch-models.sh)
model="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
cargo build --release --locked --quiet -p egpuctl
./target/release/egpuctl inspect "$model" | sed -n '1,12p'

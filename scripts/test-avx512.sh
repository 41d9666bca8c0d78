#!/usr/bin/env bash
# Runs the engine's tests on an emulated AVX-512 CPU: the AVX-512 kernel path
# (engine/src/kernels/avx512.rs) checked on machines that have no AVX-512, like this project's
# development and CI VMs (their hypervisor hides it, and qemu's TCG cannot execute it).
#
# The tests are built as static binaries and run inside Bochs (scripts/run-under-bochs.sh),
# whose `tigerlake` CPU model has AVX-512 F/BW/VL/VNNI. There `KernelPath::best()` is the
# AVX-512 path, so every test runs on it:
#   - the engine's unit tests, among them `x86_paths_give_their_scalar_twins_bits` (every
#     AVX-512 quantized kernel against its scalar twin bit for bit, every quantized type, token
#     count and both weight layouts) and the agreement of every path with the exact reference;
#   - `tests/kernels.rs`: real SmolLM2 and Gemma 3 tensors through every path;
#   - `tests/agreement_tiny.rs`: tiny GPT-2, Qwen2/3 and LLaMA 3.1 models against transformers.
# A second, short boot on a Haswell model (AVX2, no AVX-512) checks that run-time detection
# then refuses the AVX-512 path.
#
# Not part of CI: emulation is slow (about 15 minutes here). Run it by hand after kernel
# changes. Timings under emulation mean nothing; only results do.
#
#   scripts/test-avx512.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
target=x86_64-unknown-linux-gnu
# A separate target folder: static linking changes every artifact's flags.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}/static-avx512"
scripts/fetch-models.sh >/dev/null

# Static test binaries (an explicit --target keeps RUSTFLAGS off build scripts and proc
# macros, which run on the host). Prints the executables' paths, one per line.
build_tests() {
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo test -p egpu-engine --release --locked --no-run --target "$target" \
        --message-format=json "$@" |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m.get("profile", {}).get("test"):
        print(m["executable"])
'
}
mapfile -t binaries < <(build_tests --lib --test kernels --test agreement_tiny)
[ "${#binaries[@]}" -eq 3 ] || { echo "test-avx512: expected 3 test binaries" >&2; exit 1; }
stripped=()
for b in "${binaries[@]}"; do
    strip -o "$b.stripped" "$b"
    stripped+=("$b.stripped")
done

# One boot runs all three: a guest script (busybox sh) that stops at the first failure.
guest_script="$CARGO_TARGET_DIR/avx512-guest-tests.sh"
{
    echo '#!/bin/busybox sh'
    echo 'set -e'
    for b in "${stripped[@]}"; do
        echo "echo '== $(basename "$b" .stripped)'"
        echo "'$b' --test-threads 1"
    done
} >"$guest_script"
chmod 755 "$guest_script"
guest_files="${stripped[*]} $repo/engine/tests/fixtures $repo/models/SmolLM2-135M-Instruct.Q4_1.gguf"
guest_files+=" $repo/models/gemma-3-270m-q4_k_m.gguf"

log="$CARGO_TARGET_DIR/avx512-tigerlake.log"
echo "== engine tests on an emulated AVX-512 CPU (Bochs, tigerlake); log: $log"
BOCHS_GUEST_FILES="$guest_files" scripts/run-under-bochs.sh --cpu tigerlake --megs 2048 \
    "$guest_script" | tee "$log"
# A test that found no AVX-512 would pass without checking anything: make sure none did.
if grep -q 'skipped: this CPU has no AVX-512' "$log"; then
    echo "test-avx512: the guest did not expose AVX-512; nothing was checked" >&2
    exit 1
fi

echo "== the AVX-512 path is refused on a CPU without it (Bochs, Haswell)"
lib_tests=$(printf '%s\n' "${stripped[@]}" | grep '/egpu_engine-[0-9a-f]*\.stripped$')
log="$CARGO_TARGET_DIR/avx512-haswell.log"
scripts/run-under-bochs.sh --cpu corei7_haswell_4770 "$lib_tests" --test-threads 1 \
    --nocapture kernels::tests::unavailable_paths_are_refused \
    kernels::tests::x86_paths_give_their_scalar_twins_bits | tee "$log"
grep -q 'skipped: this CPU has no AVX-512' "$log" || {
    echo "test-avx512: the Haswell guest should have no AVX-512 path" >&2
    exit 1
}
echo "test-avx512: all passed"

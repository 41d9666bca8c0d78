#!/usr/bin/env bash
# Cycle estimates from llvm-mca for the quantized tile's inner loop on an Apple M1 core (issue
# 19: the Mac's own CPU runs the cpu backend beside the eGPU, and this project has no arm64
# machine): the NEON path's `sdot` tile against the portable tile as the compiler vectorizes it.
#
#   bench/mca-arm64.sh > mca-arm64.md   # markdown for BENCHMARKS.md on stdout, progress on stderr
#
# 1. Builds the engine library for aarch64-unknown-linux-gnu with `-C target-cpu=apple-m1`,
#    which is what rustc's aarch64-apple-darwin target assumes by default (so the portable
#    loops are vectorized as they would be for the Mac), `--emit asm` and v0 mangling (names
#    that spell out const generics). The build goes to $CARGO_TARGET_DIR, by default
#    target/mca-arm64. Needs the aarch64 standard library (`rustup target add`, done here).
# 2. Finds each kernel's function by its demangled name and, in it, the innermost loop with the
#    most multiply work: an innermost loop is a backward branch's range of instructions that
#    holds no other backward branch's range (LLVM lays loop bodies out contiguously here).
#    A kernel without exactly one such loop stops the script: the kernel changed.
# 3. Runs llvm-mca (LLVM 22's, from PyPI, as bench/mca.sh) with -mcpu=apple-m1 on each loop,
#    100 iterations, and prints a table of estimates.
#
# "MACs" counts int8 multiply-adds: 16 per `sdot` on 16 bytes, one per destination element of
# the widening multiplies (`smull`, `smlal`, ... on 8 or 16 lanes) and of `mul`/`mla`. What the
# numbers are not: speeds (no memory, no clock, nothing outside the loop, and the errors of
# LLVM's M1 model). Compare rows with each other only.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/mca-arm64}"
target=aarch64-unknown-linux-gnu
out="$CARGO_TARGET_DIR/mca"
mkdir -p "$out/loops" "$out/reports"

source "$(dirname "$0")/llvm-tools.sh"

rustup target list --installed | grep -qx "$target" || rustup target add "$target" >&2
deps="$CARGO_TARGET_DIR/$target/release/deps"
cargo clean --release --target "$target" -p egpu-engine >&2
rm -f "$deps"/egpu_engine-*.s
cargo rustc --release --target "$target" -p egpu-engine --lib -- \
    --emit asm -C debuginfo=0 -C symbol-mangling-version=v0 -C target-cpu=apple-m1 >&2
asm=("$deps"/egpu_engine-*.s)
[ -f "${asm[0]}" ] || { echo "mca-arm64.sh: rustc wrote no assembly to $deps" >&2; exit 1; }

header="llvm-mca $("$llvm_bin/llvm-mca" --version | sed -n 's/.*LLVM version //p'), \
$(rustc --version | cut -d' ' -f1-2), commit $(git rev-parse --short HEAD), $(date -u '+%Y-%m-%d %H:%M UTC'): \`bench/mca-arm64.sh\`"

python3 - "$llvm_bin" "$out" "$header" "${asm[@]}" <<'PY'
import re
import subprocess
import sys
from pathlib import Path

llvm_bin, out_dir, header, *asm_files = sys.argv[1:]
llvm_bin, out_dir = Path(llvm_bin), Path(out_dir)

# kernel, path, demangled name (regex), which of its innermost loops, rows × tokens of one
# chunk's work. The portable tile holds both kinds of weights in one function: its unsigned
# loop widens the weights (`ushll`), its signed loop is vectorized to `sdot` by the compiler.
ALL = lambda loop: True
UNSIGNED = lambda loop: any(ins.startswith("ushll") for ins in loop)
SIGNED = lambda loop: any(ins.startswith("sdot") for ins in loop)
KERNELS = [
    ("tile 4×2, unsigned (Q4_0/1, Q5, K-quants)", "NEON sdot",
     r"::neon::tile::<4, 2>$", ALL, (4, 2)),
    ("tile 4×2, unsigned (Q4_0/1, Q5, K-quants)", "portable (vectorized)",
     r"::portable::tile_portable::<4, 2>$", UNSIGNED, (1, 1)),
    ("tile 4×2, signed (Q8_0, IQ4)", "NEON sdot",
     r"::neon::tile::<4, 2>$", ALL, (4, 2)),
    ("tile 4×2, signed (Q8_0, IQ4)", "portable (vectorized)",
     r"::portable::tile_portable::<4, 2>$", SIGNED, (1, 1)),
]
BRANCH = re.compile(r"^(b|b\.\w+|cbn?z|tbn?z)\s")
MUL = re.compile(r"^(sdot|udot|[su]mull2?|[su]mlal2?|mul|mla)\s+v\d+\.(\d+)([bhsd])")


def products(ins):
    """int8 (or widened) multiply-adds done by one instruction."""
    m = MUL.match(ins)
    if not m:
        return 0
    lanes = int(m[2])
    return lanes * 4 if m[1] in ("sdot", "udot") else lanes


def functions(paths):
    """{symbol: [instruction or label lines]} for every function of the assembly files."""
    found = {}
    for path in paths:
        current = None
        for raw in Path(path).read_text().splitlines():
            line = raw.split("//", 1)[0].strip()
            if m := re.match(r"\.type\s+([^,\s]+),@function", line):
                current = m[1]
                found[current] = []
            elif current is not None:
                if line.startswith(".Lfunc_end"):
                    current = None
                elif line and (line.endswith(":") or not line.startswith(".")):
                    found[current].append(line)
    return found


def innermost_loops(body):
    """Instruction lists of the innermost loops: ranges from a label to a later branch back
    to it that hold no other such range."""
    where = {line[:-1]: i for i, line in enumerate(body) if line.endswith(":")}
    ranges = []
    for j, line in enumerate(body):
        if BRANCH.match(line):
            target = line.split()[-1].split(",")[-1].strip()
            if target in where and where[target] < j:
                ranges.append((where[target], j))
    inner = [r for r in ranges
             if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    # The same loop instantiated twice (say, for both values of a flag it does not read) is
    # one loop: copies differ only in the label they branch back to.
    loops = {}
    for a, b in inner:
        loop = [l for l in body[a:b + 1] if not l.endswith(":")]
        loops.setdefault(tuple(loop[:-1]), loop)
    return list(loops.values())


def run_mca(snippet, report):
    text = subprocess.run([llvm_bin / "llvm-mca", "-mtriple=aarch64-unknown-linux-gnu",
                           "-mcpu=apple-m1", "-iterations=100", snippet],
                          capture_output=True, text=True, check=True).stdout
    report.write_text(text)
    field = lambda name: float(re.search(rf"^{name}:\s+([\d.]+)", text, re.M)[1])
    return field("Total Cycles") / field("Iterations"), field("Block RThroughput")


def main():
    funcs = functions(asm_files)
    symbols = sorted(funcs)
    demangled = subprocess.run([llvm_bin / "llvm-cxxfilt"], input="\n".join(symbols),
                               text=True, capture_output=True, check=True).stdout.splitlines()
    names = dict(zip(symbols, demangled))
    rows = []
    for kernel, path, pattern, pick, (n_rows, n_tokens) in KERNELS:
        matching = sorted((s for s in funcs if re.search(pattern, names[s])),
                          key=lambda s: len(names[s]))
        if not matching:
            sys.exit(f"mca-arm64.sh: no function matches {pattern!r}: the kernel changed")
        loops = [l for l in innermost_loops(funcs[matching[0]]) if pick(l)]
        most = max((sum(map(products, l)) for l in loops), default=0)
        chosen = [l for l in loops if most and sum(map(products, l)) == most]
        if len(chosen) != 1:
            sys.exit(f"mca-arm64.sh: {len(chosen)} loops with {most} MACs in {names[matching[0]]}")
        body = chosen[0]
        slug = re.sub(r"[^a-z0-9]+", "-", f"{pattern} {kernel}".lower()).strip("-")
        snippet = out_dir / "loops" / f"{slug}.s"
        snippet.write_text("\n".join(body) + "\n")
        cycles, rthroughput = run_mca(snippet, out_dir / "reports" / f"{slug}.txt")
        macs = sum(map(products, body))
        chunks = macs / (32 * n_rows * n_tokens)
        dots = sum(1 for ins in body if ins.startswith("sdot"))
        rows.append(f"| {kernel} | {path} | {len(body)} | {dots} | {macs} "
                    f"| {chunks:g} chunk(s) × {n_rows} row(s) × {n_tokens} token(s) "
                    f"| {cycles:.1f} | **{macs / cycles:.1f}** | {rthroughput:.1f} |")
    print(f"{header}. llvm-mca -mcpu=apple-m1, estimates per iteration of each kernel's inner "
          "loop, not measurements:\n")
    print("| kernel | path | instructions | sdot | MACs | one iteration | cycles "
          "| MACs / cycle | Block RThroughput |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


main()
PY
echo "mca-arm64.sh: loop bodies in $out/loops, llvm-mca's reports in $out/reports" >&2

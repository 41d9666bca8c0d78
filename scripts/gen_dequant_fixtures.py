"""Generate the reference fixtures for egpu's GGML dequantization tests.

Run from anywhere, with the interpreter that has gguf-py (the `gguf` package) and numpy:

    /work/venv-ref/bin/python scripts/gen_dequant_fixtures.py

For every tensor type egpu dequantizes, this writes into engine/tests/fixtures/dequant/:

  <TYPE>.raw   random blocks in the GGML on-disk layout
  <TYPE>.f32   gguf-py's `gguf.quants.dequantize` of those blocks, little-endian f32

and a manifest.json naming, per type, its ggml id, block count, element count and the sha256 of
both files, plus gguf-py's GGML_QUANT_SIZES for every type it knows (the Rust tests check
`GgmlType`'s table against it). The output is deterministic for a given gguf-py and numpy: the
random generator is seeded, and re-running without changes rewrites identical files.

Quant blocks are random bytes except for their f16 scale fields, which are overwritten with
finite values (a log-uniform spread of everyday magnitudes, plus a few blocks carrying zero,
negative zero, the largest finite f16 and f16 subnormals) so every reference value is finite.
Plain F32/F16/BF16 tensors get random finite bit patterns, ordinary numbers and edge values.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize

SEED = 0x6567_7075  # "egpu"
OUT_DIR = Path(__file__).resolve().parent.parent / "engine" / "tests" / "fixtures" / "dequant"

# Blocks per fixture. Sized so all fixtures together stay around 400 KB while every scale and
# quant field still sees hundreds of random values.
BLOCKS_PER_256_ELEMENT_TYPE = 32
BLOCKS_PER_32_ELEMENT_TYPE = 128
ELEMENTS_PER_PLAIN_TYPE = 2048

# Byte offsets of each block's f16 scale fields (`ggml_half` members of the block structs in
# ggml-common.h). Everything else in a block is quant bits, for which any byte is valid.
F16_SCALE_OFFSETS: dict[QT, tuple[int, ...]] = {
    QT.Q4_0: (0,),  # d
    QT.Q4_1: (0, 2),  # d, m
    QT.Q5_0: (0,),  # d
    QT.Q5_1: (0, 2),  # d, m
    QT.Q8_0: (0,),  # d
    QT.Q2_K: (80, 82),  # d, dmin after scales[16] and qs[64]
    QT.Q3_K: (108,),  # d after hmask[32], qs[64], scales[12]
    QT.Q4_K: (0, 2),  # d, dmin
    QT.Q5_K: (0, 2),  # d, dmin
    QT.Q6_K: (208,),  # d after ql[128], qh[64], scales[16]
    QT.IQ4_NL: (0,),  # d
    QT.IQ4_XS: (0,),  # d
}
PLAIN_TYPES = (QT.F32, QT.F16, QT.BF16)
TYPES = PLAIN_TYPES + tuple(F16_SCALE_OFFSETS)

# Scales that probe the edges of f16: zeros of both signs, the largest finite value, the
# smallest subnormal, the largest subnormal and the smallest normal.
EDGE_SCALES = np.array(
    [0.0, -0.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-24), 1023 * 2.0**-24, 2.0**-14],
    dtype=np.float16,
)


def everyday_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random f16 scales with either sign and magnitudes between 1e-4 and 1."""
    magnitude = 10.0 ** rng.uniform(-4.0, 0.0, size=n)
    sign = rng.choice([-1.0, 1.0], size=n)
    return (sign * magnitude).astype(np.float16)


def quant_blocks(rng: np.random.Generator, qtype: QT) -> np.ndarray:
    """Random blocks of `qtype` whose f16 scale fields are finite; the first blocks get edge scales."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = BLOCKS_PER_256_ELEMENT_TYPE if block_size == 256 else BLOCKS_PER_32_ELEMENT_TYPE
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for field, offset in enumerate(F16_SCALE_OFFSETS[qtype]):
        scales = everyday_scales(rng, n_blocks)
        # The second field of two-scale types walks the edge values in another order, so edge
        # d and edge m/dmin values meet in different combinations.
        edges = np.roll(EDGE_SCALES, 3 * field)
        scales[: len(edges)] = edges
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def finite_bit_patterns(rng: np.random.Generator, n: int, bits: int, exp_mask: int) -> np.ndarray:
    """Uniformly random bit patterns of a `bits`-wide float, with infinities and NaNs made finite
    by clearing the top exponent bit."""
    dtype = np.uint32 if bits == 32 else np.uint16
    raw = rng.integers(0, 1 << bits, size=n, dtype=np.uint64).astype(dtype)
    top_exp_bit = dtype(1 << (bits - 2))
    non_finite = (raw & dtype(exp_mask)) == dtype(exp_mask)
    raw[non_finite] &= ~top_exp_bit
    return raw


def plain_values(rng: np.random.Generator, qtype: QT) -> np.ndarray:
    """Random finite F32/F16/BF16 data: edge values, then random bit patterns, then ordinary numbers."""
    n = ELEMENTS_PER_PLAIN_TYPE
    n_bits = n // 2
    ordinary = (rng.standard_normal(n - n_bits) * 10.0 ** rng.uniform(-3, 3, n - n_bits)).astype(np.float32)
    if qtype == QT.F32:
        patterns = finite_bit_patterns(rng, n_bits, 32, 0x7F80_0000).view(np.float32)
        info = np.finfo(np.float32)
        edges = np.array(
            [0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.smallest_normal, info.max, -info.max, 1.0],
            dtype=np.float32,
        )
        values = np.concatenate([patterns, ordinary])
        values[: len(edges)] = edges
        return values.view(np.uint8)
    if qtype == QT.F16:
        patterns = finite_bit_patterns(rng, n_bits, 16, 0x7C00).view(np.float16)
        edges = np.array([0.0, -0.0, 2.0**-24, 1023 * 2.0**-24, 2.0**-14, 65504.0, -65504.0, 1.0], dtype=np.float16)
        values = np.concatenate([patterns, ordinary.astype(np.float16)])
        values[: len(edges)] = edges
        return values.view(np.uint8)
    if qtype == QT.BF16:
        patterns = finite_bit_patterns(rng, n_bits, 16, 0x7F80)
        # Truncating f32 to its top 16 bits is a valid bf16 encoding of a nearby value.
        truncated = (ordinary.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
        edges = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x0080, 0x7F7F, 0xFF7F, 0x3F80], dtype=np.uint16)
        values = np.concatenate([patterns, truncated])
        values[: len(edges)] = edges
        return values.view(np.uint8)
    raise ValueError(f"{qtype.name} is not a plain float type")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    rng = np.random.default_rng(SEED)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    fixtures = []
    for qtype in TYPES:
        raw = plain_values(rng, qtype) if qtype in PLAIN_TYPES else quant_blocks(rng, qtype)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        assert raw.dtype == np.uint8 and raw.size % type_size == 0
        n_blocks = raw.size // type_size
        reference = np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(-1)
        assert reference.size == n_blocks * block_size
        assert np.all(np.isfinite(reference)), f"{qtype.name}: non-finite reference value"

        raw_path = OUT_DIR / f"{qtype.name}.raw"
        ref_path = OUT_DIR / f"{qtype.name}.f32"
        raw_path.write_bytes(raw.tobytes())
        ref_path.write_bytes(reference.astype("<f4").tobytes())
        fixtures.append(
            {
                "type": qtype.name,
                "ggml_id": int(qtype.value),
                "n_blocks": int(n_blocks),
                "n_elements": int(reference.size),
                "raw_file": raw_path.name,
                "raw_sha256": sha256(raw_path),
                "f32_file": ref_path.name,
                "f32_sha256": sha256(ref_path),
            }
        )

    manifest = {
        "generator": "scripts/gen_dequant_fixtures.py",
        "gguf_version": version("gguf"),
        "numpy_version": np.__version__,
        "seed": SEED,
        "fixtures": fixtures,
        "ggml_quant_sizes": [
            {
                "type": qtype.name,
                "ggml_id": int(qtype.value),
                "block_size": int(GGML_QUANT_SIZES[qtype][0]),
                "type_size": int(GGML_QUANT_SIZES[qtype][1]),
            }
            for qtype in QT
            if qtype in GGML_QUANT_SIZES
        ],
    }
    (OUT_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    total = sum(p.stat().st_size for p in OUT_DIR.iterdir())
    print(f"wrote {len(fixtures)} fixtures to {OUT_DIR} ({total} bytes in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Record gguf-py's view of the real model files, so the Rust GGUF reader is checked against an
outside reader: every tensor's name, dims, type and absolute data offset, and every metadata
key with its type and value (arrays as length plus first and last elements).

Run (needs PyPI `gguf`; models from scripts/fetch-models.sh):
    python -m venv .venv && .venv/bin/pip install gguf numpy
    .venv/bin/python scripts/gen_gguf_refs.py models engine/tests/fixtures/gguf
"""
import json
import sys
from pathlib import Path

import gguf
import numpy as np

MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]


def plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def field_value(field: gguf.ReaderField):
    types = field.types
    if types[0] == gguf.GGUFValueType.ARRAY:
        items = [plain(field.contents(i)) for i in range(len(field.data))]
        return {"len": len(items), "element_type": types[1].name, "head": items[:3], "tail": items[-2:]}
    return plain(field.contents())


def dequant_samples(reader: gguf.GGUFReader) -> list:
    samples, seen = [], set()
    for t in reader.tensors:
        if t.tensor_type in seen:
            continue
        seen.add(t.tensor_type)
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        samples.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "first_bits": [int(b) for b in values[:512].view(np.uint32)],
            "sum": float(values.astype(np.float64).sum()),
        })
    return samples


def main() -> None:
    models, out = Path(sys.argv[1]), Path(sys.argv[2])
    for name in MODELS:
        reader = gguf.GGUFReader(models / name)
        record = {
            "file": name,
            "metadata": [
                {"key": k, "type": f.types[0].name, "value": field_value(f)}
                for k, f in reader.fields.items()
                if not k.startswith("GGUF.")
            ],
            "tensors": [
                {
                    "name": t.name,
                    "dims": [int(d) for d in t.shape],
                    "type": t.tensor_type.name,
                    "n_bytes": int(t.n_bytes),
                    "file_offset": int(t.data_offset),
                }
                for t in reader.tensors
            ],
            "dequantized": dequant_samples(reader),
        }
        (out / (Path(name).stem + ".json")).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

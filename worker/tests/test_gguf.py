"""The GGUF reader on small files written here byte by byte (format: ggml docs/gguf.md)."""
import struct

import numpy as np
import pytest

from egpu_worker.gguf import GGUFError, GGUFFile


def gguf_bytes(tensors, metadata, align=32, corrupt_offset=False) -> bytes:
  def s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b
  out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
  for k, (vtype, v) in metadata.items():
    out += s(k) + struct.pack("<I", vtype)
    if vtype == 8: out += s(v)
    elif vtype == 9: out += struct.pack("<IQ", 6, len(v)) + struct.pack(f"<{len(v)}f", *v)
    elif vtype == 4: out += struct.pack("<I", v)
    elif vtype == 6: out += struct.pack("<f", v)
  data, offsets = b"", []
  for name, shape, ggml_type, payload in tensors:
    offsets.append(len(data))
    data += payload + b"\0" * (-len(payload) % align)
  for (name, shape, ggml_type, _), off in zip(tensors, offsets):
    out += s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
    out += struct.pack("<IQ", ggml_type, off + (align if corrupt_offset else 0))
  out += b"\0" * (-len(out) % align)
  return out + data


def test_reads_metadata_and_tensor_bytes(tmp_path):
  w = np.arange(12, dtype=np.float32)
  q = bytes(range(34)) * 2  # two Q8_0 blocks: a (64,) row
  p = tmp_path / "t.gguf"
  p.write_bytes(gguf_bytes([("a", (4, 3), 0, w.tobytes()), ("b", (64,), 8, q)],
                           {"general.architecture": (8, "llama"), "llama.block_count": (4, 7),
                            "llama.rope.freq_base": (6, 1e5), "scores": (9, [0.5, -1.0])}))
  f = GGUFFile(str(p))
  assert f.arch == "llama" and f.arch_key("block_count") == 7 and f.arch_key("rope.freq_base") == 1e5
  assert f.metadata["scores"] == [0.5, -1.0]
  a, b = f.tensors["a"], f.tensors["b"]
  assert (a.shape, a.type_name, a.nbytes, b.type_name, b.nbytes) == ((4, 3), "F32", 48, "Q8_0", 68)
  np.testing.assert_array_equal(f.tensor_bytes("a").view(np.float32), w)
  assert bytes(f.tensor_bytes("b")) == q


def test_rejects_bad_files(tmp_path):
  p = tmp_path / "bad.gguf"
  p.write_bytes(b"GGML" + b"\0" * 60)
  with pytest.raises(GGUFError, match="not a GGUF"):
    GGUFFile(str(p))
  p.write_bytes(gguf_bytes([("a", (8,), 0, bytes(32))], {}, corrupt_offset=True))
  with pytest.raises(GGUFError, match="outside the data region"):
    GGUFFile(str(p))
  p.write_bytes(gguf_bytes([("a", (8,), 99, bytes(32))], {}))
  with pytest.raises(GGUFError, match="ggml type 99"):
    GGUFFile(str(p))

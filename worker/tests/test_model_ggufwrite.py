"""A small GGUF writer for the model tests (tiny random models built from numpy arrays), and a check that the
worker's reader reads back what it writes.

write_gguf(path, metadata, tensors): metadata values are typed by their Python type (str, bool, int -> uint32,
float -> float32, list of int -> int32 array, list of float -> float32 array, list of str); tensors are numpy
arrays in numpy order (last axis contiguous), f32 or f16; GGUF stores the shape reversed.
"""
import struct

import numpy as np

_ALIGN = 32


def _s(x: str) -> bytes:
  b = x.encode()
  return struct.pack("<Q", len(b)) + b


def _value(v) -> tuple[int, bytes]:
  if isinstance(v, str): return 8, _s(v)
  if isinstance(v, bool): return 7, struct.pack("<?", v)
  if isinstance(v, int): return 4, struct.pack("<I", v)
  if isinstance(v, float): return 6, struct.pack("<f", v)
  if isinstance(v, list):
    if all(isinstance(x, str) for x in v): return 9, struct.pack("<IQ", 8, len(v)) + b"".join(_s(x) for x in v)
    if all(isinstance(x, (int, bool)) for x in v): return 9, struct.pack("<IQ", 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    return 9, struct.pack("<IQ", 6, len(v)) + struct.pack(f"<{len(v)}f", *v)
  raise TypeError(f"metadata value {v!r}")


def write_gguf(path, metadata: dict, tensors: dict[str, np.ndarray]) -> None:
  out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
  for k, v in metadata.items():
    vtype, payload = _value(v)
    out += _s(k) + struct.pack("<I", vtype) + payload
  data = b""
  for name, a in tensors.items():
    ggml_type = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}[a.dtype]
    shape = tuple(reversed(a.shape))
    out += _s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
    out += struct.pack("<IQ", ggml_type, len(data))
    data += np.ascontiguousarray(a).tobytes()
    data += b"\0" * (-len(data) % _ALIGN)
  out += b"\0" * (-len(out) % _ALIGN)
  with open(path, "wb") as f: f.write(out + data)


def test_writer_round_trip(tmp_path):
  from egpu_worker.gguf import GGUFFile
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.ones(5, np.float16)
  write_gguf(tmp_path / "t.gguf", {"general.architecture": "llama", "llama.block_count": 2, "llama.x": 0.5,
                                   "l": [1, 2], "f": [0.5], "s": ["a", "b"], "flag": True}, {"a": a, "b": b})
  f = GGUFFile(str(tmp_path / "t.gguf"))
  assert f.arch == "llama" and f.arch_key("block_count") == 2 and f.arch_key("x") == 0.5
  assert f.metadata["l"] == [1, 2] and f.metadata["s"] == ["a", "b"] and f.metadata["flag"] is True
  assert f.tensors["a"].shape == (3, 2) and f.tensors["b"].type_name == "F16"
  np.testing.assert_array_equal(f.tensor_bytes("a").view(np.float32).reshape(2, 3), a)

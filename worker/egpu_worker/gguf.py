"""A minimal GGUF (v2/v3) reader: metadata, the tensor table, and the raw tensor data.

The data region is memory-mapped with numpy and uploaded to the device once as a single uint8
tensor; each model tensor is a lazy byte slice of it, so weights stay quantized on the device.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

# ggml tensor types this worker knows the block layout of: type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
  0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
  6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
  12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
  20: ("IQ4_NL", 32, 18), 23: ("IQ4_XS", 256, 136), 30: ("BF16", 1, 2),
}

# GGUF metadata value types -> struct format (scalars only; 8 = string, 9 = array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class GGUFError(ValueError):
  pass


@dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (innermost) dimension
  ggml_type: int
  offset: int  # from the start of the data region
  nbytes: int

  @property
  def type_name(self) -> str:
    return GGML_TYPES.get(self.ggml_type, (f"type{self.ggml_type}",))[0]

  @property
  def n_elements(self) -> int:
    n = 1
    for d in self.shape: n *= d
    return n


class _Reader:
  def __init__(self, buf: memoryview):
    self.buf, self.pos = buf, 0

  def unpack(self, fmt: str) -> Any:
    v = struct.unpack_from("<" + fmt, self.buf, self.pos)
    self.pos += struct.calcsize("<" + fmt)
    return v[0]

  def string(self) -> str:
    n = self.unpack("Q")
    s = bytes(self.buf[self.pos:self.pos + n])
    if len(s) != n: raise GGUFError("truncated string")
    self.pos += n
    return s.decode("utf-8", errors="replace")

  def value(self, vtype: int) -> Any:
    if vtype in _SCALAR: return self.unpack(_SCALAR[vtype])
    if vtype == 8: return self.string()
    if vtype == 9:
      etype, n = self.unpack("I"), self.unpack("Q")
      if etype in _SCALAR:  # read numeric arrays in one go (token scores, types: ~50k entries)
        fmt = _SCALAR[etype]
        size = struct.calcsize(fmt)
        arr = list(struct.unpack_from(f"<{n}{fmt}", self.buf, self.pos))
        self.pos += n * size
        return arr
      return [self.value(etype) for _ in range(n)]
    raise GGUFError(f"unknown metadata value type {vtype}")


class GGUFFile:
  """Parsed header of a GGUF file plus a read-only memory map of it."""

  def __init__(self, path: str):
    self.path = path
    self.mm = np.memmap(path, dtype=np.uint8, mode="r")
    r = _Reader(memoryview(self.mm))
    if bytes(self.mm[:4]) != b"GGUF": raise GGUFError(f"{path}: not a GGUF file")
    r.pos = 4
    self.version = r.unpack("I")
    if self.version not in (2, 3): raise GGUFError(f"{path}: GGUF version {self.version} not supported")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    self.metadata: dict[str, Any] = {}
    for _ in range(n_kv):
      key = r.string()
      self.metadata[key] = r.value(r.unpack("I"))
    self.tensors: dict[str, TensorInfo] = {}
    for _ in range(n_tensors):
      name = r.string()
      n_dims = r.unpack("I")
      shape = tuple(r.unpack("Q") for _ in range(n_dims))
      ggml_type, offset = r.unpack("I"), r.unpack("Q")
      if ggml_type not in GGML_TYPES: raise GGUFError(f"tensor {name}: ggml type {ggml_type} is unknown to this worker")
      _, block_elems, block_bytes = GGML_TYPES[ggml_type]
      n = 1
      for d in shape: n *= d
      if shape[0] % block_elems: raise GGUFError(f"tensor {name}: row of {shape[0]} is not a whole number of blocks")
      self.tensors[name] = TensorInfo(name, shape, ggml_type, offset, n // block_elems * block_bytes)
    align = int(self.metadata.get("general.alignment", 32))
    self.data_offset = (r.pos + align - 1) // align * align
    data_len = len(self.mm) - self.data_offset
    for t in self.tensors.values():
      if t.offset % align or t.offset + t.nbytes > data_len:
        raise GGUFError(f"tensor {t.name}: bytes {t.offset}..{t.offset + t.nbytes} lie outside the data region ({data_len} bytes)")

  @property
  def arch(self) -> str:
    return self.metadata["general.architecture"]

  def arch_key(self, key: str, default: Any = None) -> Any:
    return self.metadata.get(f"{self.arch}.{key}", default)

  def data(self) -> np.ndarray:
    """The whole tensor data region as a (memory-mapped) uint8 array."""
    return self.mm[self.data_offset:]

  def tensor_bytes(self, name: str) -> np.ndarray:
    t = self.tensors[name]
    return self.data()[t.offset:t.offset + t.nbytes]

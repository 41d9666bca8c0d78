"""Python modules for proto/worker.proto, generated on first use.

The schema lives once, in the repository's proto/ folder (egpud compiles the same file). Its
generated modules are not committed: they depend on the installed protobuf/grpcio versions.
They are written to egpu_worker/_generated/ (gitignored) when missing or older than the
schema, through a temporary folder and a rename, so concurrent workers never see half a file.
"""
from __future__ import annotations

import importlib
import os
import shutil
import pathlib
import sys
import tempfile

from .env import WORKER_DIR

PROTO_DIR = pathlib.Path(os.environ.get("EGPU_PROTO_DIR", WORKER_DIR.parent / "proto"))
PROTO = PROTO_DIR / "worker.proto"
OUT = pathlib.Path(__file__).resolve().parent / "_generated"


def _stale() -> bool:
  made = OUT / "worker_pb2.py"
  return not made.exists() or made.stat().st_mtime < PROTO.stat().st_mtime


def _generate() -> None:
  from grpc_tools import protoc
  import grpc_tools
  include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
  OUT.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="_generated.", dir=OUT.parent))
  code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}",
                      f"--grpc_python_out={tmp}", str(PROTO)])
  if code != 0: raise RuntimeError(f"protoc failed ({code}) on {PROTO}")
  (tmp / "__init__.py").write_text("")
  try:
    os.replace(tmp, OUT)  # atomic when OUT does not exist yet
  except OSError:
    # another process won the race, or an old copy is there: swap it for ours
    old = pathlib.Path(tempfile.mkdtemp(prefix="_old.", dir=OUT.parent))
    os.replace(OUT, old / "g")
    os.replace(tmp, OUT)
    shutil.rmtree(old, ignore_errors=True)


def load():
  """Returns (worker_pb2, worker_pb2_grpc)."""
  if not PROTO.exists(): raise FileNotFoundError(f"{PROTO} not found; set EGPU_PROTO_DIR to egpu's proto/ folder")
  if _stale(): _generate()
  # The generated grpc module imports `worker_pb2` as a top-level module.
  if str(OUT) not in sys.path: sys.path.insert(0, str(OUT))
  return importlib.import_module("worker_pb2"), importlib.import_module("worker_pb2_grpc")

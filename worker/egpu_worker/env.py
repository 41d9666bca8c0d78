"""Keep tinygrad's compile cache inside the worker folder unless the caller chose a place.

Must run before tinygrad is imported (it reads CACHEDB / XDG_CACHE_HOME at import time)."""
import os
import pathlib

WORKER_DIR = pathlib.Path(__file__).resolve().parent.parent


def default_cache_env() -> None:
  cache = WORKER_DIR / ".cache"
  os.environ.setdefault("XDG_CACHE_HOME", str(cache))
  os.environ.setdefault("CACHEDB", str(cache / "tinygrad" / "cache.db"))
  pathlib.Path(os.environ["CACHEDB"]).parent.mkdir(parents=True, exist_ok=True)

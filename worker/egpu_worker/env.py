"""Keep tinygrad's compile cache inside the worker folder unless the caller chose a place.

Must run before tinygrad is imported (it reads CACHEDB at import time). Only the compile cache
moves: tinygrad's downloads (the TinyGPU app's zip and AMD firmware on a Mac) stay in its own
cache folder ($XDG_CACHE_HOME/tinygrad, else ~/Library/Caches/tinygrad or ~/.cache/tinygrad),
where tinygrad's own setup script puts them, so a machine set up once opens the eGPU offline."""
import os
import pathlib

WORKER_DIR = pathlib.Path(__file__).resolve().parent.parent


def default_cache_env() -> None:
  os.environ.setdefault("CACHEDB", str(WORKER_DIR / ".cache" / "tinygrad" / "cache.db"))
  pathlib.Path(os.environ["CACHEDB"]).parent.mkdir(parents=True, exist_ok=True)

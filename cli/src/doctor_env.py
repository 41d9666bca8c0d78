# Run by `egpuctl doctor` as `<worker python> -c <this file>`: prints one line of JSON about this
# interpreter (version, tinygrad, grpcio, the egpu_worker package), the compiler libraries tinygrad
# 0.14 would load (found by importing tinygrad's own loaders, so the search paths are tinygrad's),
# and, on macOS, the TinyGPU app and tinygrad's download cache. It opens no device.
import contextlib, glob, importlib, importlib.util, inspect, json, os, platform, re, shutil, sys

out = {"python_version": platform.python_version(), "python_ok": sys.version_info >= (3, 11), "executable": sys.executable}


def attempt(key, fn):
  try:
    out[key] = fn()
  except BaseException as e:  # report, never crash: doctor parses this output
    out[key] = None
    out[key + "_error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"


def worker():
  import egpu_worker
  # The worker (serve.py) moves tinygrad's compile cache to worker/.cache unless told
  # otherwise: apply the same defaults, so the paths below are the worker's.
  from egpu_worker.env import default_cache_env
  default_cache_env()
  return {"path": os.path.dirname(egpu_worker.__file__), "probe": importlib.util.find_spec("egpu_worker.probe") is not None}


def tinygrad_version():
  from importlib.metadata import version
  import tinygrad  # noqa: F401  (importable, not only installed)
  return version("tinygrad")


def grpc_version():
  import grpc
  return grpc.__version__


attempt("egpu_worker", worker)
attempt("tinygrad", tinygrad_version)
attempt("grpcio", grpc_version)

# Compiler libraries: tinygrad.runtime.autogen.<name> builds a c.DLL from its own list of paths
# (runtime/support/c.py DLL.findlib; <NAME>_PATH overrides). A DLL that loaded has a _name.
libraries = {}
if out["tinygrad"]:
  for name in ("comgr", "llvm", "nvrtc", "nvjitlink", "cuda"):
    try:
      with contextlib.redirect_stdout(sys.stderr):
        dll = importlib.import_module(f"tinygrad.runtime.autogen.{name}").dll
      path = dll.__dict__.get("_name")
      libraries[name] = {"path": path, "error": None if path else dll.__dict__.get("emsg")}
    except Exception as e:
      libraries[name] = {"path": None, "error": f"{type(e).__name__}: {e}"}
out["libraries"] = libraries
cc = os.environ.get("CC") or "clang"
out["programs"] = {"cc": cc, "cc_path": shutil.which(cc), "hipcc_path": shutil.which("hipcc")}


def tinygrad_cache():
  from tinygrad import helpers
  downloads = os.path.join(helpers.cache_dir, "downloads")
  fw = os.path.join(downloads, "fw")
  info = {"cache_dir": helpers.cache_dir, "downloads_dir": downloads, "firmware_dir": fw,
          "firmware_files": len(os.listdir(fw)) if os.path.isdir(fw) else 0}
  if sys.platform == "darwin":
    from tinygrad.runtime.support.system import APLRemotePCIDevice as apl
    # ensure_app() keeps the pinned TinyGPU release commit in a local variable; read it from the source.
    m = re.search(r'commit\s*=\s*"([0-9a-f]{40})"', inspect.getsource(apl.ensure_app))
    zip_path = os.path.join(downloads, f"TinyGPU_{m.group(1)}.zip") if m else None
    info["tinygpu"] = {"app": apl.APP_PATH, "app_exists": os.path.exists(apl.APP_PATH), "commit": m.group(1) if m else None,
                       "zip": zip_path, "zip_exists": bool(zip_path and os.path.isfile(zip_path)),
                       "other_zips": sorted(glob.glob(os.path.join(downloads, "TinyGPU_*.zip")))}
  return info


if out["tinygrad"]:
  attempt("cache", tinygrad_cache)
print(json.dumps(out))

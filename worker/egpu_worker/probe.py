"""What tinygrad device the worker would get, and whether a kernel runs on it.

  python -m egpu_worker.probe [--dev DEV] [--no-kernel]

prints ONE line of JSON on stdout and exits 0 when the device opened and the kernel ran (or
was skipped), 1 otherwise, with the reason in "error". egpud and `egpuctl doctor` parse it; the
JSON is printed whatever happens, and anything tinygrad itself prints goes to stderr.

Fields: dev (the DEV asked for; null = tinygrad picks), dev_source, device (tinygrad's canonical
name, e.g. "AMD"), arch ("gfx1100", "sm_90", "x86_64"), interface ("KFD" / "PCI" / "USB" for AMD,
"NVK" / "PCI" for NV, "" for devices without one), renderer and compiler (class names in use),
name (a human-readable name where cheaply known, e.g. "NVIDIA H200", else null), memory_total_bytes /
memory_free_bytes (null when unknown) and memory_source (where they were read), tinygrad_version,
python_version, platform, kernel ({"ok", "result", "expected", "seconds"} or {"ok": false,
"error"}; null with --no-kernel or when the device did not open), ok, error.

Which DEV: --dev, else $DEV, else "PCI+AMD" on macOS (the eGPU over Thunderbolt), else tinygrad's
own choice (the first of METAL, AMD, NV, CUDA, ..., CPU that opens). `--dev auto` asks for
tinygrad's choice explicitly. Like the worker (serve.py), the command keeps tinygrad's caches in
worker/.cache unless XDG_CACHE_HOME / CACHEDB are set (egpu_worker/env.py); that includes
tinygrad's downloads (the TinyGPU app's zip, AMD firmware), see docs/mac-egpu.md.

In a process that serves the device (serve.py): `info = device_info(dev)` once, then
`memory_free(info)` whenever the free memory is wanted again.

Memory, per device (tinygrad 0.14 has no API for it):
- AMD through tinygrad's own driver (PCI / USB interface, the macOS eGPU): the AM driver reads the
  VRAM size from register RCC_CONFIG_MEMSIZE when it boots the GPU (runtime/support/am/amdev.py,
  AMDev._run_discovery) and keeps it as `Device["AMD"].iface.dev_impl.vram_size`. Free = the free
  blocks of `dev_impl.mm.pa_allocator` (runtime/support/memory.py TLSFAllocator), i.e. what
  tinygrad can still allocate; buffers in tinygrad's LRU cache count as used.
- AMD through amdgpu (KFD, Linux): sysfs mem_info_vram_total / mem_info_vram_used of the GPU's
  render node (`iface.dev_sysfs_path`), else the first /sys/class/drm/card*/device that has them.
- NV through tinygrad's driver (PCI): `iface.dev_impl.vram_size` and `mm.pa_allocator` as for AMD
  (runtime/support/nv/nvdev.py). NV through the kernel driver (NVK): NVML (libnvidia-ml), else
  `nvidia-smi`, GPU index = the tinygrad device index (NVML orders by PCI bus; usually the same).
- CUDA: cuMemGetInfo_v2 in the device's context (runtime/autogen/cuda.py).
- CPU and METAL (unified memory): the machine's memory: /proc/meminfo MemTotal / MemAvailable on
  Linux, `sysctl hw.memsize` and `vm_stat` (free + inactive + speculative pages) on macOS.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time

from .env import default_cache_env

MACOS_DEFAULT_DEV = "PCI+AMD"
KERNEL_EXPECTED = 136  # sum(i + 1 for i in range(16))


def resolve_dev(dev: str | None = None) -> tuple[str | None, str]:
  """The DEV to open (None: tinygrad picks) and where it came from."""
  if dev is not None:
    return (None if dev.strip().lower() in ("", "auto") else dev.strip()), "argument"
  if env := os.environ.get("DEV", "").strip():
    return env, "environment"
  if sys.platform == "darwin": return MACOS_DEFAULT_DEV, "macOS default"
  return None, "tinygrad default"


def describe_error(e: BaseException) -> str:
  """One line: the exception's type and message, with every sub-exception of a group (tinygrad
  raises an ExceptionGroup when no interface or renderer of a device could be opened)."""
  if isinstance(e, BaseExceptionGroup):
    # tinygrad 0.14 says "No interface for AMD:0 is available is available" (device.py adds it twice).
    message = e.message.replace(" is available is available", " is available")
    return f"{message}: " + "; ".join(describe_error(x) for x in e.exceptions)
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---- memory ----

def _linux_meminfo(path: str = "/proc/meminfo") -> tuple[int, int]:
  fields = {}
  with open(path) as f:
    for line in f:
      name, _, rest = line.partition(":")
      if parts := rest.split(): fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
  return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))


def _run(argv: list[str], timeout: float = 10) -> str:
  return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True).stdout


def parse_vm_stat(text: str) -> int:
  """Free bytes from `vm_stat`: (free + inactive + speculative pages) * page size."""
  page = int(m.group(1)) if (m := re.search(r"page size of (\d+) bytes", text)) else 4096
  pages = {k.strip().lower(): int(v.rstrip(".")) for k, v in re.findall(r'^"?([^:"]+)"?:\s+(\d+)\.?\s*$', text, re.M)}
  return page * sum(pages.get(f"pages {k}", 0) for k in ("free", "inactive", "speculative"))


def system_memory() -> tuple[int | None, int | None, str]:
  if sys.platform == "darwin":
    total = int(_run(["sysctl", "-n", "hw.memsize"]).strip())
    return total, parse_vm_stat(_run(["vm_stat"])), "sysctl hw.memsize + vm_stat"
  if os.path.exists("/proc/meminfo"):
    total, free = _linux_meminfo()
    return total, free, "/proc/meminfo MemTotal/MemAvailable"
  return None, None, "unknown on this OS"


def _sysfs_vram(dev_dir: str) -> tuple[int, int] | None:
  try:
    with open(f"{dev_dir}/mem_info_vram_total") as f: total = int(f.read())
    with open(f"{dev_dir}/mem_info_vram_used") as f: used = int(f.read())
  except (OSError, ValueError): return None
  return total, total - used


def _tinygrad_driver_memory(d) -> tuple[int | None, int | None, str] | None:
  """VRAM as tinygrad's own driver (AM for AMD, NV's PCI driver) knows it."""
  impl = getattr(getattr(d, "iface", None), "dev_impl", None)
  if (total := getattr(impl, "vram_size", None)) is None: return None
  free = None
  if (alloc := getattr(getattr(impl, "mm", None), "pa_allocator", None)) is not None:
    free = sum(size for size, _nxt, _prev, is_free in alloc.blocks.values() if is_free)
  return int(total), free, "tinygrad driver: iface.dev_impl.vram_size, iface.dev_impl.mm.pa_allocator free blocks"


def _amd_kfd_memory(d) -> tuple[int | None, int | None, str] | None:
  if (path := getattr(getattr(d, "iface", None), "dev_sysfs_path", None)) and (mem := _sysfs_vram(path)):
    return mem[0], mem[1], f"sysfs {path}/mem_info_vram_total, mem_info_vram_used"
  for dev_dir in sorted(glob.glob("/sys/class/drm/card*/device")):
    if mem := _sysfs_vram(dev_dir): return mem[0], mem[1], f"sysfs {dev_dir}/mem_info_vram_total, mem_info_vram_used (first card with them)"
  return None


class _NvmlMemory(ctypes.Structure):
  _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_memory(index: int) -> tuple[int, int] | None:
  name = "libnvidia-ml.so.1" if sys.platform != "darwin" else ctypes.util.find_library("nvidia-ml")
  try: nvml = ctypes.CDLL(name or "libnvidia-ml.so.1")
  except OSError: return None
  if nvml.nvmlInit_v2() != 0: return None
  try:
    handle, mem = ctypes.c_void_p(), _NvmlMemory()
    if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0: return None
    if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0: return None
    return mem.total, mem.free
  finally: nvml.nvmlShutdown()


def _nv_memory(d) -> tuple[int | None, int | None, str] | None:
  if mem := _tinygrad_driver_memory(d): return mem
  index = getattr(d, "device_id", 0)
  if mem := _nvml_memory(index): return mem[0], mem[1], f"NVML nvmlDeviceGetMemoryInfo (GPU index {index})"
  with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError, IndexError):
    out = _run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.total,memory.free", "--format=csv,noheader,nounits"])
    total, free = (int(x) << 20 for x in out.strip().splitlines()[0].split(","))
    return total, free, f"nvidia-smi --query-gpu=memory.total,memory.free (GPU index {index})"
  return None


def _cuda_memory(d) -> tuple[int | None, int | None, str] | None:
  from tinygrad.runtime.autogen import cuda
  if cuda.cuCtxSetCurrent(d.context) != 0: return None
  free, total = ctypes.c_uint64(), ctypes.c_uint64()
  if cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) != 0: return None
  return total.value, free.value, "cuMemGetInfo_v2"


def device_memory(d, base: str) -> tuple[int | None, int | None, str]:
  """(total, free, where it was read) for an opened tinygrad device; never raises."""
  try:
    found = {"AMD": lambda: _tinygrad_driver_memory(d) or _amd_kfd_memory(d), "NV": lambda: _nv_memory(d),
             "CUDA": lambda: _cuda_memory(d)}.get(base, lambda: None)()
    if found is not None: return found
    if base in ("CPU", "METAL", "PYTHON"): return system_memory()
    return None, None, f"not known for {base}"
  except Exception as e:  # the probe reports, it does not fail, on a memory read
    return None, None, f"error: {describe_error(e)}"


# ---- names ----

def _name(d, base: str) -> str | None:
  with contextlib.suppress(Exception):
    if base in ("CPU", "PYTHON"):
      if sys.platform == "darwin": return _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip() or None
      with open("/proc/cpuinfo") as f:
        for line in f:
          if line.lower().startswith(("model name", "hardware")): return line.split(":", 1)[1].strip()
    if base == "CUDA":
      from tinygrad.runtime.autogen import cuda
      buf = ctypes.create_string_buffer(256)
      if cuda.cuDeviceGetName(buf, 256, d.cu_device) == 0: return buf.value.decode()
    if base == "METAL": return str(d.sysdevice.name())
  return None


def _interface(d) -> str:
  if (iface := getattr(d, "iface", None)) is None: return ""
  return type(iface).__name__.removesuffix("Iface")


def _versions() -> dict:
  from importlib.metadata import PackageNotFoundError, version
  try: tinygrad_version = version("tinygrad")
  except PackageNotFoundError: tinygrad_version = None
  return {"tinygrad_version": tinygrad_version, "python_version": platform.python_version(),
          "platform": f"{sys.platform}-{platform.machine()}"}


# ---- the probe ----

def _run_kernel(device: str) -> dict:
  from tinygrad import Tensor, dtypes
  start = time.perf_counter()
  try:
    # Host -> device copy, one kernel, device -> host copy.
    result = (Tensor(list(range(16)), device=device, dtype=dtypes.int32) + 1).sum().item()
  except Exception as e:
    return {"ok": False, "error": describe_error(e), "seconds": round(time.perf_counter() - start, 3)}
  out = {"ok": result == KERNEL_EXPECTED, "result": result, "expected": KERNEL_EXPECTED, "seconds": round(time.perf_counter() - start, 3)}
  if not out["ok"]: out["error"] = f"the kernel returned {result}, expected {KERNEL_EXPECTED}"
  return out


def device_info(dev: str | None = None, run_kernel: bool = True) -> dict:
  """Opens the device DEV (see the module docstring for the default) and describes it. Never
  raises: failures are in "error", and "ok" says whether the device opened and the kernel ran."""
  requested, source = resolve_dev(dev)
  info: dict = {"dev": requested, "dev_source": source, "device": None, "arch": None, "interface": None,
                "renderer": None, "compiler": None, "name": None, "memory_total_bytes": None, "memory_free_bytes": None,
                "memory_source": None, **_versions(), "kernel": None, "ok": False, "error": None}
  step = "importing tinygrad"
  saved_env = os.environ.get("DEV")
  try:
    # tinygrad reads DEV when it is imported; set it for that, and on the live setting too in case
    # tinygrad was imported already (the tests). Spawned children see it in the environment.
    if requested is None: os.environ.pop("DEV", None)
    else: os.environ["DEV"] = requested
    from tinygrad import Device
    from tinygrad.helpers import DEV
    saved_value, DEV.value = DEV.value, requested or ""
    try:
      step = "choosing the device"
      name = Device.canonicalize(None)
      step = f"opening {name}"
      d = Device[name]
      base = name.split(":")[0]
      info.update(device=name, arch=(d.arch or "").split(",")[0] or None, interface=_interface(d), name=_name(d, base))
      # Memory before the renderer: a missing compiler still leaves the device's size known.
      total, free, where = device_memory(d, base)
      info.update(memory_total_bytes=total, memory_free_bytes=free, memory_source=where)
      step = f"choosing a renderer for {name}"
      renderer = d.renderer
      info.update(renderer=type(renderer).__name__,
                  compiler=type(renderer.compiler).__name__ if getattr(renderer, "compiler", None) is not None else None)
      if run_kernel:
        info["kernel"] = _run_kernel(name)
        if not info["kernel"]["ok"]:
          info["error"] = f"running a kernel on {name}: {info['kernel']['error']}"
          return info
      info["ok"] = True
    finally:
      DEV.value = saved_value
  except Exception as e:
    info["error"] = f"{step}: {describe_error(e)}"
  finally:
    if saved_env is None: os.environ.pop("DEV", None)
    else: os.environ["DEV"] = saved_env
  return info


def memory_free(info: dict) -> int | None:
  """Free bytes now on the device `info` describes (a device_info() result whose device opened)."""
  if not info.get("device"): return None
  from tinygrad import Device
  return device_memory(Device[info["device"]], info["device"].split(":")[0])[1]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m egpu_worker.probe", description=__doc__.split("\n\n")[0])
  parser.add_argument("--dev", help='tinygrad device (DEV syntax: "PCI+AMD", "AMD", "CUDA", "NV", "CPU"; "auto" = tinygrad picks)')
  parser.add_argument("--no-kernel", action="store_true", help="only open the device; do not run the test kernel")
  args = parser.parse_args(argv)
  default_cache_env()
  real_stdout = sys.stdout
  try:
    # tinygrad prints (downloads, DEBUG output) on stdout: keep stdout for the JSON alone.
    with contextlib.redirect_stdout(sys.stderr):
      info = device_info(args.dev, run_kernel=not args.no_kernel)
  except BaseException as e:  # KeyboardInterrupt, SystemExit from inside tinygrad: still answer
    info = {"dev": args.dev, "ok": False, "error": describe_error(e), **_versions()}
  real_stdout.write(json.dumps(info) + "\n")
  real_stdout.flush()
  return 0 if info.get("ok") else 1


if __name__ == "__main__":
  sys.exit(main())

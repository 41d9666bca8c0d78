"""egpu_worker.probe on DEV=CPU (needs clang), its failure answers, and the parsers it uses."""
import json
import os
import platform
import subprocess
import sys

import pytest

from egpu_worker import probe

WORKER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_probe(*args: str, **env: str) -> tuple[int, list[str], str]:
  """Runs `python -m egpu_worker.probe` with this worker folder first on the path."""
  full_env = {**os.environ, "PYTHONPATH": WORKER_DIR, **env}
  out = subprocess.run([sys.executable, "-m", "egpu_worker.probe", *args], capture_output=True, text=True, env=full_env, timeout=300)
  return out.returncode, out.stdout.splitlines(), out.stderr


def test_cpu_device_info():
  info = probe.device_info("CPU")
  assert info["ok"] is True and info["error"] is None, info
  assert (info["dev"], info["dev_source"], info["device"]) == ("CPU", "argument", "CPU")
  assert info["arch"] == {"amd64": "x86_64", "aarch64": "arm64"}.get(m := platform.machine().lower(), m)
  assert info["interface"] == ""
  assert info["renderer"] and info["compiler"]
  assert info["memory_total_bytes"] > 0 and 0 <= info["memory_free_bytes"] <= info["memory_total_bytes"], info
  assert info["memory_source"]
  assert info["kernel"]["ok"] is True and info["kernel"]["result"] == 136 == info["kernel"]["expected"]
  assert info["tinygrad_version"] == "0.14.0"
  assert info["python_version"] == platform.python_version()
  json.dumps(info)  # all of it is JSON
  free = probe.memory_free(info)
  assert free is not None and 0 <= free <= info["memory_total_bytes"]
  assert probe.memory_free({"device": None}) is None


def test_command_line_prints_one_json_line_and_keeps_tinygrad_output_off_stdout():
  # DEBUG=2 makes tinygrad print every kernel on stdout: the probe must move that to stderr.
  code, lines, stderr = run_probe("--dev", "CPU", DEBUG="2")
  assert code == 0, stderr
  assert len(lines) == 1, lines
  info = json.loads(lines[0])
  assert info["ok"] is True and info["device"] == "CPU" and info["kernel"]["result"] == 136
  assert "CPU" in stderr  # tinygrad's DEBUG lines went somewhere


def test_dev_from_the_environment_and_no_kernel():
  code, lines, stderr = run_probe("--no-kernel", DEV="CPU")
  assert code == 0, stderr
  info = json.loads(lines[-1])
  assert (info["dev"], info["dev_source"], info["device"], info["kernel"]) == ("CPU", "environment", "CPU", None)


def test_a_device_that_cannot_open_still_answers_with_exit_1():
  code, lines, _ = run_probe("--dev", "NOSUCHDEVICE")
  assert code == 1
  info = json.loads(lines[-1])
  assert info["ok"] is False and info["device"] is None
  assert info["error"].startswith("opening NOSUCHDEVICE: "), info["error"]


def test_a_kernel_that_fails_is_an_error():
  # NULL opens but runs nothing and refuses to read data back.
  info = probe.device_info("NULL")
  assert info["ok"] is False and info["device"] == "NULL"
  assert info["kernel"]["ok"] is False
  assert info["error"].startswith("running a kernel on NULL: "), info["error"]


def test_resolve_dev_order(monkeypatch):
  monkeypatch.setenv("DEV", "CUDA")
  assert probe.resolve_dev("PCI+AMD:LLVM") == ("PCI+AMD:LLVM", "argument")
  assert probe.resolve_dev("auto") == (None, "argument")
  assert probe.resolve_dev(None) == ("CUDA", "environment")
  monkeypatch.delenv("DEV")
  monkeypatch.setattr(sys, "platform", "darwin")
  assert probe.resolve_dev(None) == ("PCI+AMD", "macOS default")
  monkeypatch.setattr(sys, "platform", "linux")
  assert probe.resolve_dev(None) == (None, "tinygrad default")


def test_device_info_leaves_dev_as_it_was():
  before = os.environ.get("DEV")
  probe.device_info("CPU", run_kernel=False)
  assert os.environ.get("DEV") == before
  from tinygrad.helpers import DEV
  assert repr(DEV) == (before or "")


def test_error_groups_are_one_line():
  group = ExceptionGroup("No interface for AMD:0 is available is available",
                         [FileNotFoundError(2, "No such file or directory"), RuntimeError("AMD:0 does not exist\n(0 devices)")])
  assert probe.describe_error(group) == ("No interface for AMD:0 is available: FileNotFoundError: [Errno 2] No such file or directory; "
                                         "RuntimeError: AMD:0 does not exist (0 devices)")


def test_vm_stat_parser():
  text = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                                5000.
Pages active:                            200000.
Pages inactive:                          100000.
Pages speculative:                          700.
Pages wired down:                         90000.
"Translation faults":                 123456789.
"""
  assert probe.parse_vm_stat(text) == 16384 * (5000 + 100000 + 700)


def test_meminfo_parser(tmp_path):
  f = tmp_path / "meminfo"
  f.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\nHugePages_Total:       0\n")
  assert probe._linux_meminfo(str(f)) == (16000000 * 1024, 8000000 * 1024)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_system_memory_on_linux():
  total, free, source = probe.system_memory()
  assert total > 0 and 0 <= free <= total and "meminfo" in source

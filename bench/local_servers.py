"""What the HTTP bench scripts share to start servers on this machine: the release binaries'
paths, a free loopback port, waiting for a server to answer, and egpud and llama-server started
the same way for every script."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def release(name):
    """A release binary of this checkout (honours $CARGO_TARGET_DIR)."""
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / name


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, what, timeout=120):
    """Until `url` answers 200; exits the script if `proc` dies or the wait runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    sys.exit(f"{what} did not answer {url}")


def start_egpud(model, threads, tmp, slots, ctx):
    """A release egpud on a private socket and a loopback HTTP port (no key), with `model`
    loaded as "m" in `slots` slots of `ctx` tokens: (process, HTTP port, socket path)."""
    port, sock = free_port(), Path(tmp) / "egpud.sock"
    proc = subprocess.Popen(
        [str(release("egpud")), "--socket", str(sock), "--state-dir", str(Path(tmp) / "state"),
         "--threads", str(threads), "--http", f"127.0.0.1:{port}", "--http-auth", "none"],
        stderr=open(Path(tmp) / "egpud.log", "w"), env={**os.environ, "EGPU_LOG": "warn"},
    )
    wait_http(f"http://127.0.0.1:{port}/api/version", proc, "egpud")
    subprocess.run([str(release("egpuctl")), "--socket", str(sock), "load", model, "--name", "m",
                    "--slots", str(slots), "--ctx", str(ctx)], check=True, capture_output=True)
    return proc, port, sock


def start_llama_server(binary, model, threads, tmp, slots, ctx, extra=()):
    """llama.cpp's llama-server with `slots` parallel slots of `ctx` tokens each, and `extra`
    arguments (e.g. --embeddings): (process, port)."""
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-np", str(slots),
         "-c", str(slots * ctx), "--host", "127.0.0.1", "--port", str(port), *extra],
        stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "llama-server.log", "w"),
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc, "llama-server")
    return proc, port


def stop(proc):
    proc.terminate()
    proc.wait(timeout=30)

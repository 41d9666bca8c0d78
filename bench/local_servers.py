"""What the HTTP bench scripts share to start servers on this machine: the release binaries'
paths, a free loopback port, and waiting for a server to answer."""

import os
import socket
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

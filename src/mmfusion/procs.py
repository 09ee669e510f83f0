"""Server processes on 127.0.0.1: a free port, start-and-wait-until-ready, stop the whole group.

Used for the Prefect server (flows/server.py), `bentoml serve` in tests/service and bench/serve.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_until_ready(cmd: list[str], ready_url: str, log_path: Path | None, timeout: float, **popen) -> subprocess.Popen:
    """Start `cmd` in its own process group; return once `ready_url` answers 200.

    Raises RuntimeError (with the log's tail) if the process exits or is not ready in `timeout` s;
    a server whose start fails is stopped, never left running.
    """
    log = log_path.open("ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)

    def tail() -> str:
        return log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd[:4])} exited with code {proc.returncode}:\n{tail()}")
        if http_ok(ready_url, timeout=1.0):
            return proc
        time.sleep(0.5)
    stop_process_group(proc)
    raise RuntimeError(f"{' '.join(cmd[:4])} was not ready at {ready_url} after {timeout:.0f}s:\n{tail()}")


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group (server and its workers), SIGKILL after `timeout` s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass

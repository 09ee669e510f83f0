"""Run a command with a Prefect server on 127.0.0.1 (started here unless one already answers).

`python -m flows.server -- dvc repro` costs one server start (~13 s) for the whole
pipeline, instead of one temporary server per stage process, and records every stage
flow run in the project's Prefect database, so `make ui` shows them later.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when a Prefect API answers /health at `api_url`."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, timeout: float = 90.0, log_path: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start` on 127.0.0.1:`port`; return (process, api_url) once healthy."""
    api_url = f"http://127.0.0.1:{port}/api"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}; see {log_path or 'its output'}")
        if api_healthy(api_url, timeout=1.0):
            return proc, api_url
        time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"prefect server did not answer on {api_url} within {timeout:.0f}s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (it runs in its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.server", description=__doc__.splitlines()[0],
        usage="python -m flows.server [--port N] -- COMMAND [ARGS...]",
    )
    parser.add_argument("--port", type=int, default=0, help="port for a server started here (default: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    existing = os.environ.get("PREFECT_API_URL")
    if existing and api_healthy(existing):
        print(f"prefect: using the server at {existing}", file=sys.stderr)
        return subprocess.call(command)
    home = os.environ.get("PREFECT_HOME", ".prefect")
    os.makedirs(home, exist_ok=True)
    t0 = time.perf_counter()
    proc, api_url = start_server(args.port or free_port(), log_path=os.path.join(home, "server.log"))
    print(f"prefect: server on {api_url} ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    try:
        return subprocess.call(command, env={**os.environ, "PREFECT_API_URL": api_url})
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())

"""Run a command with a Prefect server on 127.0.0.1 (started here unless one already answers).

`python -m flows.server -- dvc repro` costs one server start (~13 s) for the whole
pipeline, instead of one temporary server per stage process, and records every stage
flow run in the project's Prefect database, so `make ui` shows them later.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from mmfusion.procs import free_port, http_ok, start_until_ready, stop_process_group

__all__ = ["api_healthy", "free_port", "start_server", "stop_server"]


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when a Prefect API answers /health at `api_url`."""
    return http_ok(f"{api_url.rstrip('/')}/health", timeout=timeout)


def start_server(port: int, timeout: float = 90.0, log_path: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start` on 127.0.0.1:`port`; return (process, api_url) once healthy."""
    api_url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_until_ready(cmd, f"{api_url}/health", Path(log_path) if log_path else None, timeout)
    return proc, api_url


stop_server = stop_process_group


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

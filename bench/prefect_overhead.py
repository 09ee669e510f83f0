"""Per-stage Prefect overhead: one stage run three ways, wall time of the whole process.

  plain     python -m mmfusion.stages.<stage>          (no Prefect)
  ephemeral python -m flows.stages <stage>              (no server: Prefect starts a temporary one)
  server    python -m flows.stages <stage>              (PREFECT_API_URL -> a running server)

Usage: python bench/prefect_overhead.py [--stage split] [--repeats 3] [--out bench/results/prefect_overhead.json]
Run it in a project where the stage's inputs exist (after `make run`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.server import free_port, start_server, stop_server  # noqa: E402


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="split")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/prefect_overhead.json")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    py = sys.executable
    modes = {
        "plain": ([py, "-m", f"mmfusion.stages.{args.stage}"], base),
        "ephemeral": ([py, "-m", "flows.stages", args.stage], base),
    }
    results: dict[str, list[float]] = {m: [] for m in (*modes, "server")}
    for _ in range(args.repeats):
        for mode, (cmd, env) in modes.items():
            results[mode].append(timed(cmd, env))
    t0 = time.perf_counter()
    proc, api = start_server(free_port())
    server_start = time.perf_counter() - t0
    try:
        for _ in range(args.repeats):
            results["server"].append(timed([py, "-m", "flows.stages", args.stage], {**base, "PREFECT_API_URL": api}))
    finally:
        stop_server(proc)
    med = {m: statistics.median(v) for m, v in results.items()}
    report = {
        "stage": args.stage,
        "repeats": args.repeats,
        "seconds_median": med,
        "seconds_all": results,
        "overhead_vs_plain_s": {"ephemeral": med["ephemeral"] - med["plain"], "server": med["server"] - med["plain"]},
        "server_start_s": server_start,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_1m": os.getloadavg()[0]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["seconds_median"] | {"server_start_s": server_start}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Keep-alive recycling benchmark: how the requests of 32 keep-alive clients spread over the service's workers,
in steady state and after a worker is killed, for each `package.keepalive_requests` value, in one run.

    .venv/bin/python bench/keepalive.py                                   # 100 (the default) against 0 (never)
    .venv/bin/python bench/keepalive.py --values 100 1000 0 --seconds 30 --repeat 2

Each case serves this checkout's service (`bentoml serve mmfusion.serving.service:MMFusion`, the model of
reports/package.json, 2 workers as params say) on a free 127.0.0.1 port with a throwaway log, and runs 32
clients that each keep one connection and send image+text /classify requests back to back. With `kill`, the
worker with the lowest pid gets kill -9 after 5 s (BentoML starts a replacement; clients that lose their
connection reconnect). Afterwards /health, asked on fresh connections, gives each worker's items.
Keep-alive clients stay with the worker that accepted them: with 0 the replacement of a killed worker
gets no client at all. Writes bench/results/keepalive-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmfusion.procs import free_port, start_until_ready, stop_process_group  # noqa: E402


def worker_pids(proc) -> list[int]:
    import psutil

    return sorted(p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                  if "_bentoml_impl.worker.service" in " ".join(p.cmdline()))  # fmt: skip


async def load(url: str, proc, clients: int, seconds: float, kill: bool, inputs) -> dict:
    import httpx

    done, errors, latencies, killed = 0, 0, [], {}
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients)) as http:

        async def client(i: int) -> None:
            nonlocal done, errors
            while time.perf_counter() < stop:
                png, text = inputs[i % len(inputs)]
                t0 = time.perf_counter()
                try:
                    r = await http.post("/classify", files={"image": ("x.png", png, "image/png")}, data={"text": text})
                except httpx.TransportError:  # the killed worker's connections: reconnect
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                done += r.status_code == 200

        async def killer() -> None:
            if kill:
                await asyncio.sleep(5)
                pids = worker_pids(proc)
                killed.update(pid=pids[0], of=pids)
                os.kill(pids[0], signal.SIGKILL)

        t = time.perf_counter()
        await asyncio.gather(killer(), *(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - t
    latencies.sort()
    return {"answered": done, "req_per_s": round(done / elapsed, 1), "transport_errors": errors, "killed": killed,
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None}  # fmt: skip


def workers_items(url: str, tries: int = 40) -> dict[str, int]:
    import httpx

    seen = {}
    for _ in range(tries):
        w = httpx.post(f"{url}/health", headers={"connection": "close"}, timeout=30).json()["worker"]
        seen[str(w["pid"])] = w["model_calls"]["items"]
    return seen


def run_case(value: int, kill: bool, args, model: str, inputs, work: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["package"]["keepalive_requests"] = value
    path = work / f"params-{value}.yaml"
    path.write_text(yaml.safe_dump(params))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "BENTOML_HOME": args.bentoml_home, "MMFUSION_MODEL": model, "MMFUSION_PARAMS": str(path),
           "MMFUSION_INFERENCE_LOG": str(work / f"log-{value}-{kill}.sqlite"), "BENTOML_DO_NOT_TRACK": "true",
           "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}  # fmt: skip
    cmd = [sys.executable, "-m", "bentoml", "serve", "mmfusion.serving.service:MMFusion", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_until_ready(cmd, f"{url}/readyz", work / "serve.log", 300, cwd=REPO, env=env)
    try:
        time.sleep(3)  # both workers loaded: /readyz answers once one is
        result = asyncio.run(load(url, proc, args.clients, args.seconds, kill, inputs))
        items = workers_items(url)
    finally:
        stop_process_group(proc)
    alive = {pid: n for pid, n in items.items() if not (result["killed"] and int(pid) == result["killed"]["pid"])}
    return {"keepalive_requests": value, "kill": kill, **result, "items_by_worker": items,
            "workers_without_traffic": sum(1 for n in alive.values() if n == 0)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--values", type=int, nargs="+", default=[100, 0], help="package.keepalive_requests values to compare")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-steady", action="store_true", help="only the kill cases")
    ap.add_argument("--bentoml-home", default=os.environ.get("BENTOML_HOME", str(REPO / ".bentoml")))
    args = ap.parse_args()

    from bench.serve import load_inputs

    model = json.loads((REPO / "reports" / "package.json").read_text())["model_tag"]
    inputs = load_inputs(32)
    work = Path(tempfile.mkdtemp(prefix="mmfusion-keepalive-"))
    cases = [(v, k) for _ in range(args.repeat) for k in ((True,) if args.no_steady else (False, True)) for v in args.values]
    results = []
    for value, kill in cases:
        r = run_case(value, kill, args, model, inputs, work)
        print(json.dumps(r), flush=True)
        results.append(r)
    out = REPO / "bench" / "results" / f"keepalive-{'cuda' if os.environ.get('CUDA_VISIBLE_DEVICES') else 'cpu'}.json"
    out.write_text(json.dumps({"model": model, "clients": args.clients, "seconds": args.seconds, "machine": platform.machine(),
                               "cpus": os.cpu_count(), "load_average": list(os.getloadavg()), "cases": results}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

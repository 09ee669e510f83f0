"""Load and failure benchmark: good and bad requests at concurrency 32, a worker killed mid-run, a restart.

    .venv/bin/python bench/load.py                                  # models from this project
    .venv/bin/python bench/load.py --bentoml-home /tmp/x/bentoml --model mmfusion:concat-...  --good 1000 --bad 100

It serves this checkout's service (`bentoml serve mmfusion.serving.service:MMFusion`, the
package params of --params) on a free 127.0.0.1 port with its inference log in a temp folder,
then:
1. sends `--good` image+text /classify requests mixed with `--bad` client mistakes from 32
   clients; a third of the way in it `kill -9`s one worker. Each good request carries its own
   `x-request-id`; a client retries one that got no answer (connection lost), as a client would.
2. checks the log: one row per answered good request (by `client_request_id`), none for bad
   ones, `PRAGMA integrity_check` ok, no upload temp folders of dead workers left.
3. restarts the server (SIGTERM, drain, start again) and checks that every row is still there.
Targets: 0 5xx, 0 answered requests missing from the log, 0 rows lost or overwritten.
Writes bench/results/load-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmfusion.procs import free_port, start_until_ready, stop_process_group  # noqa: E402


def inputs(n: int) -> list[tuple[bytes, str]]:
    from bench.serve import load_inputs

    return load_inputs(n)


def bad_requests(png: bytes) -> list[tuple[str, dict, int]]:
    """(name, httpx request kwargs, expected status) client mistakes."""
    return [
        ("control_chars", {"method": "POST", "url": "/classify", "data": {"text": "\x01\x02"}}, 400),
        ("zero_width", {"method": "POST", "url": "/classify", "data": {"text": "\u200b"}}, 400),
        ("corrupt_png", {"method": "POST", "url": "/classify", "files": {"image": ("x.png", png[: len(png) // 2], "image/png")}}, 400),
        ("get", {"method": "GET", "url": "/classify"}, 405),
        ("bad_json", {"method": "POST", "url": "/classify_batch", "content": b"{", "headers": {"content-type": "application/json"}}, 400),
        (
            "invalid_utf8",
            {
                "method": "POST", "url": "/classify", "headers": {"content-type": "multipart/form-data; boundary=b"},
                "content": b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\n\xff\xfe apple\r\n--b--\r\n',
            },
            400,
        ),  # fmt: skip
        ("long_filename", {"method": "POST", "url": "/classify", "files": {"image": ("a" * 300 + ".png", png, "image/png")}}, 200),
    ]


def worker_pids(proc) -> list[int]:
    import psutil

    return sorted(
        p.pid for p in psutil.Process(proc.pid).children(recursive=True) if _is_worker(p)
    )


def _is_worker(p) -> bool:
    """A live BentoML service worker (a killed one is a zombie until reaped)."""
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE and "_bentoml_impl.worker.service" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def start(env: dict, port: int, out: Path, timeout: float) -> object:
    cmd = [sys.executable, "-m", "bentoml", "serve", "mmfusion.serving.service:MMFusion", "--host", "127.0.0.1", "--port", str(port)]
    return start_until_ready(cmd, f"http://127.0.0.1:{port}/readyz", out, timeout, cwd=REPO, env=env)


async def run_load(url: str, proc, good: int, bad: int, concurrency: int, kill_at: float, pngs) -> dict:
    import httpx

    rng = random.Random(0)
    bads = bad_requests(pngs[0][0])
    jobs = [("good", i) for i in range(good)] + [("bad", i) for i in range(bad)]
    rng.shuffle(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    stats = {"answered_good": [], "status": {}, "bad_unexpected": [], "transport_errors": 0, "retries": 0, "gave_up": 0}
    done = 0
    killed: dict = {}

    async def one(http, kind: str, i: int) -> None:
        nonlocal done
        if kind == "good":
            png, text = pngs[i % len(pngs)]
            kw = {"method": "POST", "url": "/classify", "files": {"image": ("x.png", png, "image/png")}, "data": {"text": text},
                  "headers": {"x-request-id": f"load-{i}"}}  # fmt: skip
            expected = 200
        else:
            name, kw, expected = bads[i % len(bads)]
        for attempt in range(4):
            try:
                resp = await http.request(**kw)
            except httpx.TransportError:
                stats["transport_errors"] += 1
                if attempt == 3:
                    stats["gave_up"] += 1
                    break
                stats["retries"] += 1
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            code = str(resp.status_code)
            stats["status"][code] = stats["status"].get(code, 0) + 1
            if kind == "good" and resp.status_code == 200:
                stats["answered_good"].append(f"load-{i}")
            elif kind == "bad" and resp.status_code != expected:
                stats["bad_unexpected"].append((name, resp.status_code, resp.text[:200]))
            if resp.status_code in (429, 503) and attempt < 3:  # back-pressure: retry later
                await asyncio.sleep(0.5)
                continue
            break
        done += 1

    async def client(http) -> None:
        while not queue.empty():
            kind, i = queue.get_nowait()
            await one(http, kind, i)

    async def killer() -> None:
        while done < kill_at * len(jobs):
            await asyncio.sleep(0.05)
        pids = worker_pids(proc)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        killed.update({"pid": victim, "at_request": done, "workers_before": pids})
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            while time.monotonic() - t_kill < 180:
                new = [p for p in worker_pids(proc) if p not in pids]
                if new:
                    try:
                        health = (await http.post("/health")).json()
                        if health["worker"]["pid"] in new:
                            killed["recovered_s"] = round(time.monotonic() - t_kill, 1)
                            killed["new_pid"] = health["worker"]["pid"]
                            return
                    except (httpx.HTTPError, KeyError, ValueError):
                        pass
                await asyncio.sleep(0.25)

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        await asyncio.wait_for(kill_task, timeout=200)
    stats["wall_s"] = round(time.perf_counter() - t0, 1)
    stats["killed_worker"] = killed
    return stats


def log_check(path: Path, answered: list[str]) -> dict:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        rows = conn.execute("SELECT request_id, client_request_id FROM predictions").fetchall()
    finally:
        conn.close()
    by_client: dict[str, int] = {}
    for _, cid in rows:
        by_client[cid] = by_client.get(cid, 0) + 1
    missing = [a for a in answered if a not in by_client]
    return {
        "integrity_check": integrity,
        "rows": len(rows),
        "unique_request_ids": len({r for r, _ in rows}),
        "answered_good": len(answered),
        "answered_missing_from_log": len(missing),
        "missing_sample": missing[:5],
        "rows_not_from_good_requests": sum(1 for _, c in rows if not (c or "").startswith("load-")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--good", type=int, default=1000)
    ap.add_argument("--bad", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--kill-at", type=float, default=0.33, help="fraction of requests done when a worker is killed")
    ap.add_argument("--bentoml-home", default=os.environ.get("BENTOML_HOME", str(REPO / ".bentoml")))
    ap.add_argument("--model", default=None, help="model tag (default: reports/package.json's)")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--start-timeout", type=float, default=600)
    args = ap.parse_args()

    model = args.model or json.loads((REPO / "reports" / "package.json").read_text())["model_tag"]
    tmp = Path(tempfile.mkdtemp(prefix="mmfusion-load-"))
    log_path = tmp / "inference.sqlite"
    env = {
        **os.environ, "BENTOML_HOME": args.bentoml_home, "MMFUSION_MODEL": model, "MMFUSION_PARAMS": args.params,
        "MMFUSION_INFERENCE_LOG": str(log_path), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": f"{REPO / 'src'}:{REPO}",
    }  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pngs = inputs(64)
    result: dict = {"model": model, "good": args.good, "bad": args.bad, "concurrency": args.concurrency,
                    "machine": platform.machine(), "cpus": os.cpu_count(), "load_average_before": list(os.getloadavg())}  # fmt: skip
    t = time.perf_counter()
    proc = start(env, port, tmp / "serve.log", args.start_timeout)
    result["start_s"] = round(time.perf_counter() - t, 1)
    try:
        load = asyncio.run(run_load(url, proc, args.good, args.bad, args.concurrency, args.kill_at, pngs))
        time.sleep(2)  # the writer threads commit within milliseconds; leave them a margin
        result["load"] = {k: v for k, v in load.items() if k != "answered_good"}
        result["log"] = log_check(log_path, load["answered_good"])
        leftover = [p.name for p in Path(tempfile.gettempdir()).glob("mmfusion-uploads-*")
                    if p.name.endswith(str(load["killed_worker"].get("pid")))]  # fmt: skip
        result["upload_dirs_of_killed_worker_left"] = leftover
        t = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
        result["shutdown_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        proc = start(env, port, tmp / "serve.log", args.start_timeout)
        result["restart_s"] = round(time.perf_counter() - t, 1)
        result["after_restart"] = log_check(log_path, load["answered_good"])
    finally:
        stop_process_group(proc)
    result["load_average_after"] = list(os.getloadavg())
    five = sum(v for k, v in result["load"]["status"].items() if k.startswith("5"))
    result["targets"] = {
        "no_5xx": five == 0,
        "no_answered_request_lost": result["log"]["answered_missing_from_log"] == 0,
        "every_row_unique": result["log"]["rows"] == result["log"]["unique_request_ids"],
        "integrity_ok": result["log"]["integrity_check"] == "ok",
        "restart_keeps_every_row": result["after_restart"]["rows"] == result["log"]["rows"],
        "no_upload_dirs_left": not result["upload_dirs_of_killed_worker_left"],
    }
    device = "cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu"
    out = REPO / "bench" / "results" / f"load-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}; server output in {tmp / 'serve.log'}")


if __name__ == "__main__":
    main()

"""Load and failure benchmark: 32 clients, a worker killed, a restart, one log (SQLite/PostgreSQL) for N replicas.

    .venv/bin/python bench/load.py                                      # SQLite log, 1 replica: load-cpu.json
    .venv/bin/python bench/load.py --log postgres --replicas 2 --good 400 --bad 40
    .venv/bin/python bench/load.py --log sqlite --replicas 2 --good 400 --bad 40   # 2 servers, one SQLite file
    .venv/bin/python bench/load.py --log postgres --good 400 --bad 40   # 1 replica on PostgreSQL
    .venv/bin/python bench/load.py --bentoml-home /tmp/x/bentoml --model mmfusion:concat-...  --good 1000 --bad 100

It serves this checkout's service (`bentoml serve mmfusion.serving.service:MMFusion`, the package
params of --params) as `--replicas` servers on free 127.0.0.1 ports, started at once, all writing to
one inference log given through MMFUSION_INFERENCE_LOG:
- `--log sqlite` (default): one SQLite file in a temp folder (several servers on one machine may
  share it: WAL mode);
- `--log postgres`: a real PostgreSQL server (`mmfusion.localpg.LocalPostgres`) started in the temp
  folder and stopped at the end; its URL with the password goes to the servers through the env var,
  the results hold it masked only, and the script checks that the password is in no server output.
Each replica runs `--workers` worker processes (MMFUSION_WORKERS=N, the deployment override /health reports;
default: params' `workers` for one replica, 1 each for several; the count is verified from the process
tree). Then:
1. sends `--good` image+text /classify requests mixed with `--bad` client mistakes from 32 clients,
   round-robin over the replicas; a third of the way in it `kill -9`s one worker of replica 0 (the one
   holding the most client connections: keep-alive connections stay with the worker that accepted
   them, so another worker may be serving none) and times until a new worker answers /health. Each
   good request carries its own `x-request-id`; a client retries one that got no answer (connection
   lost) on the next replica, as a client behind a load balancer would. Meanwhile a monitor-style
   reader reads the whole predictions table (`read_inference_log`) every 0.5 s: its read times, and
   the writers' throughput (good req/s) beside them, show whether readers hold up writers.
2. checks the log through SQLAlchemy: one row per answered good request (by `client_request_id`),
   none for bad ones, (request_id, item) unique and the table's primary key, `PRAGMA integrity_check`
   ok (SQLite; "n/a (server)" on PostgreSQL), rows per writing process (host:pid) and per replica, no
   upload temp folders of the killed worker left; each answered request missing from the log is listed
   with the replica that answered it and when, relative to the kill (`missing_detail`).
3. restarts every replica (SIGTERM, drain, start again) and checks that every row is still there.
Targets: 0 5xx, 0 answered requests missing from the log, every row unique, integrity, restart keeps
every row, no upload dirs left; with several replicas, rows from every replica; on PostgreSQL, the
password in no server output. Writes bench/results/load-<device>-<log>-r<replicas>.json
(load-<device>.json for the default SQLite log with one replica, as before).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

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


def client_connections(pid: int, port: int) -> int:
    """Established client connections to `port` a worker holds (not its log database's)."""
    import psutil

    try:
        return sum(1 for c in psutil.Process(pid).net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)  # fmt: skip
    except psutil.Error:
        return 0


def start(env: dict, port: int, out: Path, timeout: float) -> object:
    cmd = [sys.executable, "-m", "bentoml", "serve", "mmfusion.serving.service:MMFusion", "--host", "127.0.0.1", "--port", str(port)]
    return start_until_ready(cmd, f"http://127.0.0.1:{port}/readyz", out, timeout, cwd=REPO, env=env)


def start_all(env: dict, ports: list[int], tmp: Path, timeout: float, procs: list) -> list[float]:
    """Start one server per port at once (as replicas of a deployment do: they migrate the log under its
    lock); fills `procs` (so a caller's finally stops those that started); each one's seconds to ready."""
    procs[:] = [None] * len(ports)
    t0 = time.perf_counter()

    def one(k: int) -> float:
        procs[k] = start(env, ports[k], tmp / f"serve-{k}.log", timeout)
        return round(time.perf_counter() - t0, 1)

    with ThreadPoolExecutor(len(ports)) as pool:
        return list(pool.map(one, range(len(ports))))


def stop_all(procs: list) -> None:
    for proc in procs:
        if proc is not None:
            stop_process_group(proc)


class Reader(threading.Thread):
    """A monitor-style reader: the whole predictions table through read_inference_log every `every` s."""

    def __init__(self, url, every: float = 0.5):
        super().__init__(name="log-reader", daemon=True)
        self.url, self.every = url, every
        self.ms: list[float] = []
        self.rows_last = 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from mmfusion.monitoring.inference_log import read_inference_log

        while not self.stop.is_set():
            t = time.perf_counter()
            try:
                self.rows_last = len(read_inference_log(self.url))
                self.ms.append((time.perf_counter() - t) * 1000)
            except Exception as exc:  # reported, never fatal: the load goes on
                self.errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
            self.stop.wait(max(0.0, self.every - (time.perf_counter() - t)))

    def summary(self) -> dict:
        ms = sorted(self.ms)
        return {
            "every_s": self.every,
            "reads": len(ms),
            "read_ms_p50": round(statistics.median(ms), 1) if ms else None,
            "read_ms_p95": round(ms[int(0.95 * (len(ms) - 1))], 1) if ms else None,
            "read_ms_max": round(ms[-1], 1) if ms else None,
            "rows_in_last_read": self.rows_last,
            "errors": len(self.errors),
            "error_sample": self.errors[:3],
        }


def _pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[int(q * (len(values) - 1))], 1) if values else None


async def run_load(urls: list[str], procs: list, good: int, bad: int, concurrency: int, kill_at: float, pngs) -> dict:
    import httpx

    rng = random.Random(0)
    bads = bad_requests(pngs[0][0])
    jobs = [("good", i) for i in range(good)] + [("bad", i) for i in range(bad)]
    rng.shuffle(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for seq, job in enumerate(jobs):
        queue.put_nowait((seq % len(urls), *job))  # round-robin over the replicas
    stats = {"answered_good": [], "status": {}, "status_by_replica": [{} for _ in urls], "bad_unexpected": [],
             "transport_errors": 0, "retries": 0, "gave_up": 0}  # fmt: skip
    latencies: list[float] = []
    answered_at: dict[str, tuple[int, float]] = {}  # good id -> (replica, monotonic time of its 200)
    done = 0
    killed: dict = {}

    async def one(https, replica: int, kind: str, i: int) -> None:
        nonlocal done
        if kind == "good":
            png, text = pngs[i % len(pngs)]
            kw = {"method": "POST", "url": "/classify", "files": {"image": ("x.png", png, "image/png")}, "data": {"text": text},
                  "headers": {"x-request-id": f"load-{i}"}}  # fmt: skip
            expected = 200
        else:
            name, kw, expected = bads[i % len(bads)]
        for attempt in range(4):
            r = (replica + attempt) % len(https)  # a retry goes to the next replica, as through a load balancer
            t = time.perf_counter()
            try:
                resp = await https[r].request(**kw)
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
            stats["status_by_replica"][r][code] = stats["status_by_replica"][r].get(code, 0) + 1
            if kind == "good" and resp.status_code == 200:
                stats["answered_good"].append(f"load-{i}")
                answered_at[f"load-{i}"] = (r, time.monotonic())
                latencies.append((time.perf_counter() - t) * 1000)
            elif kind == "bad" and resp.status_code != expected:
                stats["bad_unexpected"].append((name, resp.status_code, resp.text[:200]))
            if resp.status_code in (429, 503) and attempt < 3:  # back-pressure: retry later
                await asyncio.sleep(0.5)
                continue
            break
        done += 1

    async def client(https) -> None:
        while not queue.empty():
            replica, kind, i = queue.get_nowait()
            await one(https, replica, kind, i)

    async def killer() -> None:
        while done < kill_at * len(jobs):
            await asyncio.sleep(0.05)
        proc = procs[0]
        pids = worker_pids(proc)
        port = int(urls[0].rsplit(":", 1)[1])
        conns = {pid: client_connections(pid, port) for pid in pids}
        # the worker holding the most client connections: one that is answering (keep-alive connections stay
        # with the worker that accepted them, so another worker of the replica may be serving none)
        victim = max(pids, key=lambda pid: conns[pid])
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        stats["_t_kill"] = t_kill
        killed.update({"replica": 0, "pid": victim, "at_request": done, "workers_before": pids,
                       "client_connections_before": {str(k): v for k, v in conns.items()}})  # fmt: skip
        # a new connection per probe: a kept-alive one would always reach the same (surviving) worker
        async with httpx.AsyncClient(base_url=urls[0], timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            while time.monotonic() - t_kill < 180:
                new = [p for p in worker_pids(proc) if p not in pids]
                if new:
                    try:
                        health = (await http.post("/health", headers={"connection": "close"})).json()
                        if health["worker"]["pid"] in new:
                            killed["recovered_s"] = round(time.monotonic() - t_kill, 1)
                            killed["new_pid"] = health["worker"]["pid"]
                            return
                    except (httpx.HTTPError, KeyError, ValueError):
                        pass
                await asyncio.sleep(0.25)

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    https = [httpx.AsyncClient(base_url=u, timeout=120, limits=limits) for u in urls]
    try:
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(client(https) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        await asyncio.wait_for(kill_task, timeout=200)
    finally:
        for http in https:
            await http.aclose()
    stats["wall_s"] = round(wall, 1)
    stats["good_per_s"] = round(len(stats["answered_good"]) / wall, 2) if wall else None
    stats["good_latency_ms"] = {"p50": _pct(latencies, 0.5), "p95": _pct(latencies, 0.95), "max": _pct(latencies, 1.0)}
    stats["killed_worker"] = killed
    stats["_answered_at"] = answered_at
    return stats


def log_check(url, answered: list[str], pid_replica: dict[int, int] | None = None) -> dict:
    """The log as SQLAlchemy reads it on either back end (a read-only connection)."""
    import sqlalchemy as sa

    from mmfusion import logdb

    with logdb.reading(url) as conn:
        if logdb.is_sqlite(url):
            integrity = conn.exec_driver_sql("PRAGMA integrity_check").scalar()
        else:
            integrity = "n/a (server)"
        pk = sa.inspect(conn).get_pk_constraint("predictions").get("constrained_columns") or []
        duplicate_keys = conn.execute(sa.text(
            "SELECT COUNT(*) FROM (SELECT request_id, item FROM predictions GROUP BY request_id, item HAVING COUNT(*) > 1) AS d"
        )).scalar()  # fmt: skip
        rows = conn.execute(sa.text("SELECT request_id, item, client_request_id, host, pid FROM predictions")).fetchall()
    by_client: dict[str, int] = {}
    by_process: dict[str, int] = {}
    by_replica: dict[str, int] = {}
    for _, _, cid, host, pid in rows:
        by_client[cid] = by_client.get(cid, 0) + 1
        key = f"{host}:{pid}"
        by_process[key] = by_process.get(key, 0) + 1
        if pid_replica is not None:
            r = pid_replica.get(int(pid)) if pid is not None else None
            name = f"replica-{r}" if r is not None else "unknown"
            by_replica[name] = by_replica.get(name, 0) + 1
    missing = [a for a in answered if a not in by_client]
    out = {
        "integrity_check": integrity,
        "primary_key": pk,
        "duplicate_keys": int(duplicate_keys),
        "rows": len(rows),
        "unique_keys": len({(r, i) for r, i, *_ in rows}),
        "unique_request_ids": len({r for r, *_ in rows}),
        "answered_good": len(answered),
        "answered_missing_from_log": len(missing),
        "missing_sample": missing[:5],
        "missing_all": missing,
        "rows_not_from_good_requests": sum(1 for _, _, c, *_ in rows if not (c or "").startswith("load-")),
        # a good request retried after its answer was lost may have been logged twice (each with its own
        # request_id): at-least-once, reported, not a failure
        "good_ids_with_several_rows": sum(1 for c, n in by_client.items() if (c or "").startswith("load-") and n > 1),
        "rows_by_process": dict(sorted(by_process.items())),
    }
    if pid_replica is not None:
        out["rows_by_replica"] = dict(sorted(by_replica.items()))
    return out


def missing_detail(missing: list[str], load: dict) -> list[dict]:
    """For each answered good request missing from the log: the replica that answered and when, relative to
    the kill -9 (negative: answered that many seconds before it)."""
    t_kill = load.get("_t_kill")
    out = []
    for cid in missing:
        replica, t = load["_answered_at"].get(cid, (None, None))
        rel = round(t - t_kill, 3) if t is not None and t_kill is not None else None
        out.append({"client_request_id": cid, "replica": replica, "answered_s_after_kill": rel})
    return out


def health_of(urls: list[str], tries: int = 6) -> dict:
    """/health of each replica (a few calls each, to see more than one worker): each worker's writer counters."""
    import httpx

    out: dict = {}
    for k, u in enumerate(urls):
        seen: dict = {}
        for _ in range(tries):
            try:
                h = httpx.post(f"{u}/health", timeout=10).json()
                seen[str(h["worker"]["pid"])] = h["worker"].get("inference_log")
                out.setdefault("service_log", h["service"].get("inference_log"))
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                seen["error"] = str(exc)[:200]
        out[f"replica-{k}"] = seen
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--good", type=int, default=1000)
    ap.add_argument("--bad", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--kill-at", type=float, default=0.33, help="fraction of requests done when a worker is killed")
    ap.add_argument("--log", choices=["sqlite", "postgres"], default="sqlite",
                    help="the inference log: a SQLite file in the temp folder, or a local PostgreSQL server started there")  # fmt: skip
    ap.add_argument("--replicas", type=int, default=1, help="bentoml serve processes on their own ports, sharing the log")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes per replica (default: params' workers for 1 replica, 1 for several)")  # fmt: skip
    ap.add_argument("--read-every", type=float, default=0.5, help="seconds between the monitor-style reader's reads")
    ap.add_argument("--bentoml-home", default=os.environ.get("BENTOML_HOME", str(REPO / ".bentoml")))
    ap.add_argument("--model", default=None, help="model tag (default: reports/package.json's)")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--start-timeout", type=float, default=600)
    args = ap.parse_args()
    if args.replicas < 1:
        ap.error("--replicas must be at least 1")

    from mmfusion import logdb

    model = args.model or json.loads((REPO / "reports" / "package.json").read_text())["model_tag"]
    workers = args.workers if args.workers is not None else (1 if args.replicas > 1 else None)
    tmp = Path(tempfile.mkdtemp(prefix="mmfusion-load-"))
    pngs = inputs(64)
    result: dict = {"model": model, "good": args.good, "bad": args.bad, "concurrency": args.concurrency,
                    "log_backend": args.log, "replicas": args.replicas, "workers_asked": workers or "params",
                    "machine": platform.machine(), "cpus": os.cpu_count(), "load_average_before": list(os.getloadavg())}  # fmt: skip
    pg = None
    password = None
    procs: list = []
    try:
        if args.log == "postgres":
            from mmfusion.localpg import LocalPostgres

            t = time.perf_counter()
            pg = LocalPostgres(tmp / "pg")
            log_url = pg.start()
            password = pg.password
            result["postgres_start_s"] = round(time.perf_counter() - t, 1)
            log_value = log_url.render_as_string(hide_password=False)
        else:
            log_value = str(tmp / "inference.sqlite")
            log_url = logdb.resolve_url(log_value)
        result["log_url"] = logdb.masked(log_url)
        env = {
            **os.environ, "BENTOML_HOME": args.bentoml_home, "MMFUSION_MODEL": model, "MMFUSION_PARAMS": args.params,
            logdb.URL_ENV: log_value, "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": f"{REPO / 'src'}:{REPO}",
        }  # fmt: skip
        if workers is not None:
            env["MMFUSION_WORKERS"] = str(workers)
        ports = [free_port() for _ in range(args.replicas)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        t = time.perf_counter()
        result["replica_ready_s"] = start_all(env, ports, tmp, args.start_timeout, procs)
        result["start_s"] = round(time.perf_counter() - t, 1)
        started = [worker_pids(p) for p in procs]
        result["workers_per_replica"] = [len(p) for p in started]
        pid_replica = {pid: k for k, pids in enumerate(started) for pid in pids}

        reader = Reader(log_url, args.read_every)
        reader.start()
        try:
            load = asyncio.run(run_load(urls, procs, args.good, args.bad, args.concurrency, args.kill_at, pngs))
        finally:
            reader.stop.set()
            reader.join(30)
        time.sleep(2)  # the writer threads commit within milliseconds; leave them a margin
        for k, p in enumerate(procs):  # the killed worker's replacement, and any other newcomer
            for pid in worker_pids(p):
                pid_replica.setdefault(pid, k)
        result["load"] = {k: v for k, v in load.items() if k != "answered_good" and not k.startswith("_")}
        result["reader"] = reader.summary()
        result["health"] = health_of(urls)
        result["log"] = log_check(log_url, load["answered_good"], pid_replica)
        result["log"]["missing_detail"] = missing_detail(result["log"].pop("missing_all"), load)
        leftover = [p.name for p in Path(tempfile.gettempdir()).glob("mmfusion-uploads-*")
                    if p.name.endswith(str(load["killed_worker"].get("pid")))]  # fmt: skip
        result["upload_dirs_of_killed_worker_left"] = leftover
        t = time.perf_counter()
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(120)
        result["shutdown_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        result["replica_restart_ready_s"] = start_all(env, ports, tmp, args.start_timeout, procs)
        result["restart_s"] = round(time.perf_counter() - t, 1)
        result["after_restart"] = log_check(log_url, load["answered_good"])
        result["after_restart"].pop("missing_all")
    finally:
        stop_all(procs)
        if pg is not None:
            try:
                pg.stop()
            except Exception as exc:  # reported; the results are still written
                result["postgres_stop_error"] = str(exc)[:300]
    result["load_average_after"] = list(os.getloadavg())
    five = sum(v for k, v in result["load"]["status"].items() if k.startswith("5"))
    lg = result["log"]
    if args.log == "sqlite":
        integrity_ok = lg["integrity_check"] == "ok"
    else:  # no file to check: the server's own; the key must be the primary key and hold
        integrity_ok = lg["primary_key"] == ["request_id", "item"] and lg["duplicate_keys"] == 0
    result["targets"] = {
        "no_5xx": five == 0,
        "no_answered_request_lost": lg["answered_missing_from_log"] == 0,
        "every_row_unique": lg["rows"] == lg["unique_keys"] and lg["duplicate_keys"] == 0,
        "integrity_ok": integrity_ok,
        "restart_keeps_every_row": result["after_restart"]["rows"] == lg["rows"],
        "no_upload_dirs_left": not result["upload_dirs_of_killed_worker_left"],
    }
    if workers is not None:
        result["targets"]["workers_per_replica_as_asked"] = all(n == workers for n in result["workers_per_replica"])
    if args.replicas > 1:
        result["targets"]["rows_from_every_replica"] = all(lg["rows_by_replica"].get(f"replica-{k}", 0) > 0
                                                           for k in range(args.replicas))  # fmt: skip
    text = json.dumps(result, indent=2) + "\n"
    if password is not None:
        outputs = sorted(tmp.glob("serve-*.log")) + [tmp / "pg" / "server.log"]
        leaked = [p.name for p in outputs if p.exists() and password in p.read_text(errors="replace")]
        leaked += ["/health"] if password in json.dumps(result["health"]) else []
        result["server_outputs_checked"] = [p.name for p in outputs if p.exists()] + ["/health"]
        result["password_found_in"] = leaked
        result["targets"]["password_not_in_server_output"] = not leaked
        text = json.dumps(result, indent=2) + "\n"
        assert password not in text, "the log's password is in the results"
        assert not leaked, f"the log's password is in server output: {leaked}"
    device = "cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu"
    name = f"load-{device}.json" if (args.log, args.replicas) == ("sqlite", 1) else f"load-{device}-{args.log}-r{args.replicas}.json"
    out = REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}; server output in {tmp}/serve-*.log")


if __name__ == "__main__":
    main()

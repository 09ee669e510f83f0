"""Serving benchmark: latency and throughput of the BentoML service vs the bare Predictor, same inputs, one run.

    .venv/bin/python bench/serve.py                       # models/best, 10 s per point
    .venv/bin/python bench/serve.py --seconds 5 --concurrency 1 8 32

For each batching mode (off, on) it starts `bentoml serve mmfusion.serving.service:MMFusion`
on a free 127.0.0.1 port (its own BENTOML_HOME under a temp dir, the inference log on, as in
production), and sends single image+text /classify requests from N concurrent clients for a
fixed time. Then it measures the in-process Predictor on the same decoded inputs at several
batch sizes: the best items/s there is the limit a server can approach. The load generator
shares the CPU with the server; the load average before and after is recorded.
With `--runtimes torch onnx onnx-int8` every point is repeated per encoder runtime, in the
same run on the same inputs: each runtime serves a bench copy of the model folder whose
encoders record that runtime (the head's weights are the model's; only speed is measured here,
accuracy per runtime is the accuracy guard's job: docs/encoders.md). The fusion head
runs under `package.head_runtime` (auto: ONNX Runtime on CPU), except for `torch`, the
all-torch path, whose head is torch too; `ENCODERS/HEAD` names both (`recorded/torch`: the
model's encoders with an eager head), so a head change is measured in the same run.
With `--explain` every served point is measured again with `explain=true` and with `explain=true
overlay=true` on the same server (docs/serving.md, "Explanations"): keys `c<N>_explain`, `c<N>_explain_overlay`.
Writes bench/results/serve-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from mmfusion.procs import free_port, start_until_ready, stop_process_group  # noqa: E402


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def percentiles(values: list[float]) -> dict:
    import numpy as np

    arr = np.asarray(values) * 1000
    return {f"p{q}_ms": round(float(np.percentile(arr, q)), 2) for q in (50, 95, 99)} | {
        "mean_ms": round(float(arr.mean()), 2)
    }


def load_inputs(n: int) -> list[tuple[bytes, str]]:
    """n (image file bytes, text) pairs: the first test samples of data/split/test.csv."""
    import pandas as pd

    from mmfusion import paths

    df = pd.read_csv(REPO / paths.SPLIT / "test.csv").head(n)
    return [((REPO / row.image).read_bytes(), str(row.text)) for row in df.itertuples()]


def start_server(env: dict, log_file: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", "mmfusion.serving.service:MMFusion", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    return start_until_ready(cmd, f"{url}/readyz", log_file, timeout, cwd=REPO, env=env), url


stop_server = stop_process_group


# /classify's options per measured variant (--explain): the form fields sent beside the image and the text
VARIANTS = {"": {}, "explain": {"explain": "true"}, "explain_overlay": {"explain": "true", "overlay": "true"}}


def multipart_request(host: str, png: bytes, text: str, form: dict[str, str], boundary: str = "mmfusionbenchboundary") -> bytes:
    """One whole HTTP/1.1 POST /classify (keep-alive), multipart image + text + form fields, as bytes."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n"
    ]
    for name, value in {"text": text, **form}.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (
        f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader) -> tuple[int, bytes, bool]:
    """(status, body, server closes) of one HTTP/1.1 answer with a Content-Length (BentoML's JSON answers)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" not in headers:
        raise RuntimeError(f"answer without Content-Length (headers {headers}): the lean client reads no chunked bodies")
    body = await reader.readexactly(int(headers["content-length"]))
    return status, body, headers.get("connection", "").lower() == "close"


class Tally:
    """What a load point counts: answers to requests started after warm-up and ended in the window."""

    def __init__(self, warmup: float, seconds: float):
        self.latencies: list[float] = []
        self.server_ms: list[float] = []
        self.errors: dict[str, int] = {}
        self.error_sample: list[str] = []
        start = time.perf_counter()
        self.t_measure, self.t_end, self.seconds = start + warmup, start + warmup + seconds, seconds

    def add(self, t0: float, t1: float, status: int, body: bytes) -> None:
        if t0 < self.t_measure or t1 > self.t_end:
            return
        if status == 200:
            self.latencies.append(t1 - t0)
            self.server_ms.append(json.loads(body)["latency_ms"])
        else:
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1
            if len(self.error_sample) < 3:
                self.error_sample.append(body[:300].decode("utf-8", "replace"))

    def summary(self, concurrency: int, variant: str) -> dict:
        lat, server_ms = self.latencies, self.server_ms
        return {
            "concurrency": concurrency,
            "variant": variant or "plain",
            "requests": len(lat),
            "errors": self.errors,
            "error_sample": self.error_sample,
            "requests_per_s": round(len(lat) / self.seconds, 2),
            **percentiles(lat),
            "server_p50_ms": round(sorted(server_ms)[len(server_ms) // 2], 2) if server_ms else None,
        }


async def lean_load_point(url: str, inputs: list[tuple[bytes, str]], concurrency: int, seconds: float, warmup: float,
                          variant: str = "") -> dict:  # fmt: skip
    """`load_point` with a lean client: requests built once as bytes, raw asyncio streams (uvloop), keep-alive,
    reconnecting when the server closes (package.keepalive_requests). The load generator shares the 2 cores
    with the server: httpx took ~2.6 ms of CPU per request, which the server's own throughput then lacked."""
    from urllib.parse import urlsplit

    parsed = urlsplit(url)
    host, port = parsed.hostname, parsed.port
    requests = [multipart_request(f"{host}:{port}", png, text, VARIANTS[variant]) for png, text in inputs]
    tally = Tally(warmup, seconds)

    async def client(k: int) -> None:
        i, conn = k, None
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= tally.t_end:
                    return
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                reader, writer = conn
                writer.write(requests[i % len(requests)])
                i += concurrency
                status, body, close = await read_response(reader)
                tally.add(t0, time.perf_counter(), status, body)
                if close:
                    writer.close()
                    conn = None
        finally:
            if conn is not None:
                conn[1].close()

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return tally.summary(concurrency, variant)


async def load_point(url: str, inputs: list[tuple[bytes, str]], concurrency: int, seconds: float, warmup: float,
                     variant: str = "") -> dict:  # fmt: skip
    """N clients in closed loop for `warmup` + `seconds`; only requests started after warm-up count (httpx)."""
    import httpx

    tally = Tally(warmup, seconds)

    async def client(k: int, http: httpx.AsyncClient) -> None:
        i = k
        while True:
            t0 = time.perf_counter()
            if t0 >= tally.t_end:
                return
            png, text = inputs[i % len(inputs)]
            i += concurrency
            form = {"text": text, **VARIANTS[variant]}
            resp = await http.post(f"{url}/classify", files={"image": ("x.png", png, "image/png")}, data=form)
            tally.add(t0, time.perf_counter(), resp.status_code, resp.content)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(k, http) for k in range(concurrency)))
    return tally.summary(concurrency, variant)


CLIENTS = {"lean": lean_load_point, "httpx": load_point}


def run_point(client: str, *args) -> dict:
    """One load point with `client` (lean under uvloop), with the CPU seconds the load generator used."""
    t0 = os.times()
    if client == "lean":
        import uvloop

        point = uvloop.run(CLIENTS[client](*args))
    else:
        point = asyncio.run(CLIENTS[client](*args))
    t1 = os.times()
    point["client_cpu_s"] = round(t1.user - t0.user + t1.system - t0.system, 2)
    point["client"] = client
    return point


def with_runtime(model_dir: Path, runtime: str, out_dir: Path) -> Path:
    """A bench copy of `model_dir` whose encoders record `runtime` (int8: calibrated as featurize does)."""
    from mmfusion.config import load_params
    from mmfusion.encoders import create_encoder
    from mmfusion.encoders.runtime import Int8Settings, sample_calibration
    from mmfusion.features.extract import build_input
    from mmfusion.modalities import recorded_settings

    shutil.copytree(model_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    params = load_params(REPO / "params.yaml")
    int8 = Int8Settings(**__import__("dataclasses").asdict(params.featurize.int8))
    train = REPO / "data" / "split" / "train.csv"
    for m, entry in config["encoders"].items():
        enc = create_encoder(entry["encoder"], device="cpu")
        if entry.get("runtime", {}).get("name", "torch") == runtime:
            continue
        source = build_input(m, root=REPO, **recorded_settings(config)[m])

        def calibration(source=source):
            import pandas as pd

            return sample_calibration(pd.read_csv(train)[source.column].tolist(), source.content, int8)

        enc.set_runtime(runtime, int8=int8, calibration=calibration)
        config["encoders"][m] = enc.describe()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def bench_predictor(model_dir: Path, inputs: list[tuple[bytes, str]], device: str, seconds: float, head_runtime: str) -> dict:
    """The bare Predictor on the same (decoded) inputs: items/s per thread count and batch size.

    The best of all is the limit a server can approach (the server's own thread setting is a param).
    A Predictor per thread count: ONNX Runtime sessions take torch's thread count when built."""
    import torch

    from mmfusion.modalities.image import decode_image
    from mmfusion.inference.predictor import Predictor

    items = [{"image": decode_image(png), "text": text} for png, text in inputs]
    grid = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        predictor = Predictor.from_dir(model_dir, device=device, head_runtime=head_runtime)
        predictor.predict(items[:4])  # load weights / sessions
        for bs in (1, 4, 8, 16, 32):
            n = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                start = (n * bs) % len(items)
                predictor.predict((items + items)[start : start + bs])
                n += 1
            elapsed = time.perf_counter() - t0
            grid[f"threads{threads}_batch{bs}"] = {
                "items_per_s": round(n * bs / elapsed, 2),
                "ms_per_batch": round(elapsed / n * 1000, 2),
            }
    best = max(grid, key=lambda k: grid[k]["items_per_s"])
    return {"grid": grid, "best": best, "best_items_per_s": grid[best]["items_per_s"], "head_runtime": predictor.head_runtime}


def _worker_limit(model_dir, inputs, device, threads, head_runtime, batch_sizes, seconds, barrier, results) -> None:
    """One of `bench_workers`' processes: a Predictor under `threads` threads, timed per batch size in step with the others."""
    import torch

    from mmfusion.inference.predictor import Predictor
    from mmfusion.modalities.image import decode_image

    torch.set_num_threads(threads)
    items = [{"image": decode_image(png), "text": text} for png, text in inputs]
    predictor = Predictor.from_dir(model_dir, device=device, head_runtime=head_runtime)
    predictor.predict(items[:4])
    out = {}
    for bs in batch_sizes:
        barrier.wait()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            start = (n * bs) % len(items)
            predictor.predict((items + items)[start : start + bs])
            n += 1
        out[bs] = n * bs / (time.perf_counter() - t0)
    results.put(out)


def bench_workers(model_dir: Path, inputs, device: str, workers: int, threads: int, seconds: float, head_runtime: str) -> dict:
    """The in-process limit for the served worker count: `workers` processes, each a bare Predictor under
    `threads` threads (as `package.workers` / `package.cpu_threads` serve), all timed at once per batch size;
    their items/s summed. The served figure's honest ceiling: the same processes, no HTTP, no load generator."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    batch_sizes = (1, 8, 16, 32)
    procs = [
        ctx.Process(target=_worker_limit, args=(model_dir, inputs, device, threads, head_runtime, batch_sizes, seconds, barrier, results))
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    per_worker = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    by_batch = {f"batch{bs}": round(sum(w[bs] for w in per_worker), 2) for bs in batch_sizes}
    best = max(by_batch, key=by_batch.get)
    return {"workers": workers, "threads": threads, "items_per_s_by_batch": by_batch, "best": best, "best_items_per_s": by_batch[best]}


def split_runtime(entry: str) -> tuple[str, str | None]:
    """`ENCODERS[/HEAD]` -> (encoder runtime, head runtime or None for the default: torch for torch, else the package's)."""
    encoders, _, head = entry.partition("/")
    return encoders, head or ("torch" if encoders == "torch" else None)


def run_runtime(args, work: Path, model_dir: Path, model_tag: str, inputs, device: str, runtime: str) -> dict:
    """Served points (per batching mode and concurrency) and the in-process limit of one model folder."""
    import yaml

    from mmfusion.config import PackageParams, apply_overrides, params_to_dict, parse_params

    result: dict = {"served": {}}
    name = runtime.replace("/", "-")
    head = split_runtime(runtime)[1]
    overrides = ([f"package.head_runtime={head}"] if head else []) + [f"package.{a}" for a in args.set]
    served = parse_params(apply_overrides({"package": params_to_dict(PackageParams())}, overrides)).package
    for mode in args.modes:
        params_file = work / f"params-{name}-{mode}.yaml"
        package = params_to_dict(served)
        package["batching"]["enabled"] = "true" if mode == "on" else "false"
        params_file.write_text(yaml.safe_dump({"package": package}))
        env = {
            **os.environ,
            "MMFUSION_PARAMS": str(params_file),
            "MMFUSION_MODEL": model_tag,
            "MMFUSION_INFERENCE_LOG": str(work / f"inference-{name}-{mode}.sqlite"),
        }
        proc, url = start_server(env, work / f"serve-{name}-{mode}.log")
        try:
            points = []
            for c in args.concurrency:
                for variant in VARIANTS if args.explain else [""]:
                    point = run_point(args.client, url, inputs, c, args.seconds, args.warmup, variant)
                    point["load_average"] = load_average()
                    print(f"{runtime} batching {mode:3s} c={c:3d} {variant}: {point}", file=sys.stderr)
                    points.append(point)
            result["served"][f"batching_{mode}"] = points
        finally:
            stop_server(proc)
    if args.no_in_process:
        result["in_process"] = {"skipped": True, "best": None, "best_items_per_s": None}
        result["in_process_workers"] = {"skipped": True, "best_items_per_s": None}
    else:
        result["in_process"] = bench_predictor(model_dir, inputs, device, max(3.0, args.seconds / 2), served.head_runtime)
        result["in_process_workers"] = bench_workers(
            model_dir, inputs, device, served.workers, served.cpu_threads or 1, max(3.0, args.seconds / 2), served.head_runtime
        )  # fmt: skip
    limit = result["in_process"]["best_items_per_s"]
    workers_limit = result["in_process_workers"]["best_items_per_s"]
    result["summary"] = {
        mode: {
            f"c{p['concurrency']}" + (f"_{p['variant']}" if p["variant"] != "plain" else ""): {
                "requests_per_s": p["requests_per_s"],
                "p50_ms": p["p50_ms"],
                "fraction_of_in_process_limit": round(p["requests_per_s"] / limit, 3) if limit else None,
                # the same worker count and threads, all busy at once, no HTTP (bench_workers)
                "fraction_of_workers_limit": round(p["requests_per_s"] / workers_limit, 3) if workers_limit else None,
            }
            for p in points
        }
        for mode, points in result["served"].items()
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="models/best")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on"], help="adaptive batching")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="package params for the served runs, as `dvc exp run -S` takes them without `package.` "
        "(cpu_threads=2 batching.max_batch_size=16)",
    )
    parser.add_argument("--runtimes", nargs="+", default=["recorded"], help="encoder runtimes to compare: recorded (the model's own), torch, onnx, onnx-int8, auto (each encoder's default); "
        "ENCODERS/HEAD also names the head runtime (recorded/torch, recorded/onnx)")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process limit (quick A/B of server settings)")
    parser.add_argument("--explain", action="store_true", help="each point also with explain=true, and with overlay=true")
    parser.add_argument("--client", choices=list(CLIENTS), default="lean",
                        help="load generator: lean (pre-built requests on raw asyncio streams, ~10x less CPU than httpx) | httpx")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from mmfusion import paths
    from mmfusion.config import PackageParams, ParamsError, apply_overrides, params_to_dict, parse_params
    from mmfusion.errors import UserError

    model_dir = Path(args.model_dir)
    model_kind = str(model_dir)
    if not (model_dir / "config.json").exists() or not (REPO / paths.SPLIT / "test.csv").exists():
        print(f"bench/serve.py needs a trained model in {model_dir} and {paths.SPLIT}/test.csv: "
              "run `dvc repro evaluate` first", file=sys.stderr)
        return 2
    # the served package params: the defaults, then --set (checked before any server starts)
    overrides = [f"package.{item}" for item in args.set]
    try:
        parse_params(apply_overrides({"package": params_to_dict(PackageParams())}, overrides))
        from mmfusion.inference.head_runtime import check_head_runtime

        for entry in args.runtimes:
            head = split_runtime(entry)[1]
            if head:
                check_head_runtime(head, f"--runtimes {entry}")
    except (ParamsError, UserError) as exc:
        print(f"bench/serve.py: error: {exc}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="mmfusion-bench-"))
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # before bentoml is imported: a private store
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    import torch
    import yaml

    from mmfusion.stages.package import describe_model, save_bento_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = describe_model(model_dir, PackageParams(smoke_test=False))
    model_tag, _ = save_bento_model(model_dir, "mmfusion", info)
    inputs = load_inputs(args.inputs)

    result = {
        "benchmark": "serve",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "model": model_kind,
        "model_version": info["version"],
        "inputs": len(inputs),
        "seconds_per_point": args.seconds,
        "package_overrides": args.set,
        "load_average_start": load_average(),
        "note": "load generator runs on the same machine; other work on the machine disturbs the numbers",
        "served": {},
    }
    result["runtimes"] = {}
    for runtime in args.runtimes:
        encoders = split_runtime(runtime)[0]
        rt_dir = model_dir if encoders == "recorded" else work / f"model-{encoders}"
        if not rt_dir.exists():
            with_runtime(model_dir, encoders, rt_dir)
        rt_info = describe_model(rt_dir, PackageParams(smoke_test=False))
        rt_tag, _ = save_bento_model(rt_dir, "mmfusion", rt_info)
        print(f"runtime {runtime}: {rt_tag}", file=sys.stderr)
        result["runtimes"][runtime] = run_runtime(args, work, rt_dir, rt_tag, inputs, device, runtime)
    first = result["runtimes"][args.runtimes[0]]
    result.update({k: first[k] for k in ("served", "in_process", "summary")})
    result["load_average_end"] = load_average()
    if "torch" in result["runtimes"] and len(result["runtimes"]) > 1:
        result["vs_torch"] = compare_runtimes(result["runtimes"])
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"serve-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for runtime, r in result["runtimes"].items():
        print(runtime, json.dumps(r["summary"], indent=2))
        print(f"{runtime} in-process limit: {r['in_process']['best_items_per_s']} items/s ({r['in_process']['best']}); "
              f"{r['in_process_workers'].get('workers')} workers at once: {r['in_process_workers']['best_items_per_s']} items/s")
    if "vs_torch" in result:
        print(json.dumps(result["vs_torch"], indent=2))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def compare_runtimes(runtimes: dict) -> dict:
    """Served req/s of each runtime over torch's, per batching mode and concurrency (same run, same inputs)."""
    base = runtimes["torch"]["summary"]
    out = {}
    for runtime, r in runtimes.items():
        out[runtime] = {
            mode: {
                c: round(v["requests_per_s"] / base[mode][c]["requests_per_s"], 2) if base.get(mode, {}).get(c, {}).get("requests_per_s") else None
                for c, v in points.items()
            }
            for mode, points in r["summary"].items()
        }
        limit = r["in_process"].get("best_items_per_s")
        out[runtime]["in_process_limit_items_per_s"] = limit
    return out


if __name__ == "__main__":
    sys.exit(main())

"""Scale-out benchmark: featurize throughput on the local engine vs Dask (compute.engine: dask) with 1 and
2 workers, and the Prefect + Dask overhead of one mapped task (a shard), on this machine.

Each configuration encodes the same `--n` images (the first rows of data/split/train.csv, image encoder
only) into a fresh cache. Dask runs use a LocalCluster of worker processes (1 torch thread each)
started before timing and warmed up on other images, so the figures are the steady state of a
running cluster: wall seconds of `featurize.run`, images/s, images/s per worker (vs the local
engine on one thread). The per-shard overhead is the wall time per task of `--noop` mapped tasks
that do nothing. The load average is recorded: on a shared machine the numbers move with other jobs.

    .venv/bin/python bench/scale.py                       # --n 128 --shard-size 32
    .venv/bin/python bench/scale.py --n 256 --shard-size 64

Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])

import pandas as pd  # noqa: E402

from mmfusion import paths  # noqa: E402
from mmfusion.config import parse_params  # noqa: E402


def noop(item: int) -> int:
    """A mapped task that does nothing: what remains is Prefect's and Dask's cost per task."""
    return item


def make_project(data_root: Path, n: int, offset: int, dest: Path) -> Path:
    """A project root whose train split is rows [offset, offset+n) of the real train split (val/test: 1 row)."""
    rows = pd.read_csv(data_root / paths.SPLIT / "train.csv")
    if len(rows) < offset + n:
        raise SystemExit(f"need {offset + n} train rows in {data_root}, found {len(rows)}")
    (dest / paths.SPLIT).mkdir(parents=True)
    for split, part in {"train": rows.iloc[offset : offset + n], "val": rows.iloc[:1], "test": rows.iloc[1:2]}.items():
        part.to_csv(dest / paths.SPLIT / f"{split}.csv", index=False)
    (dest / "data" / "clean").symlink_to((data_root / "data" / "clean").resolve())
    return dest


def featurize_once(params_data: dict, project: Path) -> dict:
    from mmfusion.stages import featurize

    start = time.perf_counter()
    summary = featurize.run(parse_params(params_data), project)
    wall = time.perf_counter() - start
    stats = summary["encoders"]["image"]
    return {"wall_s": round(wall, 2), "encoded": stats["encoded"], "images_per_s": round(stats["encoded"] / wall, 1),
            "shards": stats.get("shards", 0), "shard_seconds": stats.get("shard_seconds", [])}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="images per configuration")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--noop", type=int, default=32, help="no-op tasks for the per-task overhead")
    parser.add_argument("--data-root", default=str(REPO), help="a project with data/split and data/clean")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = parser.parse_args()

    from distributed import LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from mmfusion.compute import map_tasks, prefect_api_url

    data_root = Path(args.data_root)
    image_only = {"encoders": {"image": "efficientnet_lite0"}, "device": "cpu", "num_workers": 0, "cpu_threads": 1}
    base = {"featurize": image_only}
    results: dict = {"n": args.n, "shard_size": args.shard_size, "cpus": os.cpu_count(), "platform": platform.platform(),
                     "load_before": os.getloadavg(), "runs": {}}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="mmfusion-scale-"))
    offset = 0
    try:
        with prefect_test_harness(server_startup_timeout=120):
            for threads in (1, 0):  # one core (as one worker has) and every core
                project = make_project(data_root, args.n, offset, work / f"local-{threads}")
                offset += args.n
                data = {"featurize": {**base["featurize"], "cpu_threads": threads, "cache_dir": str(project / "cache")}}
                results["runs"][f"local, {threads or os.cpu_count()} thread(s)"] = featurize_once(data, project)
                print(results["runs"], flush=True)
            for workers in (1, 2):
                with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env={"PREFECT_API_URL": prefect_api_url()}) as cluster:  # fmt: skip
                    compute = {"engine": "dask", "address": cluster.scheduler_address, "shard_size": args.shard_size}
                    warm = make_project(data_root, 8 * workers, offset, work / f"warm-{workers}")  # load the weights
                    offset += 8 * workers
                    featurize_once({**base, "compute": {**compute, "shard_size": 4},
                                    "featurize": {**base["featurize"], "cache_dir": str(warm / "cache")}}, warm)  # fmt: skip
                    project = make_project(data_root, args.n, offset, work / f"dask-{workers}")
                    offset += args.n
                    data = {"featurize": {**base["featurize"], "cache_dir": str(project / "cache")}, "compute": compute}
                    run = featurize_once(data, project)
                    run["images_per_s_per_worker"] = round(run["images_per_s"] / workers, 1)
                    # inside the shards: what one worker encodes per second once its task runs
                    run["in_shard_images_per_s_per_worker"] = round(run["encoded"] / sum(run["shard_seconds"]), 1)
                    start = time.perf_counter()
                    map_tasks(noop, list(range(args.noop)), parse_params({"compute": compute}).compute, "noop")
                    run["overhead_per_task_s"] = round((time.perf_counter() - start) / args.noop, 3)
                    results["runs"][f"dask, {workers} worker(s)"] = run
                    print(results["runs"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| engine | wall s | images/s | per worker | per worker inside shards | shards | s per no-op task |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        cells = [name, r["wall_s"], r["images_per_s"], r.get("images_per_s_per_worker", ""),
                 r.get("in_shard_images_per_s_per_worker", ""), r["shards"], r.get("overhead_per_task_s", "")]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

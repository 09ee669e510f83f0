"""Where each stage reads and writes, relative to the project root: one place, used by every stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

RAW = Path("data/raw")
CLEAN = Path("data/clean")
SPLIT = Path("data/split")
AUGMENTED = Path("data/augmented")
REPORTS = Path("reports")
CLEAN_REPORT = REPORTS / "clean.json"
VALIDATION = REPORTS / "validation"
SPLIT_REPORT = REPORTS / "split.json"
AUGMENT_REPORT = REPORTS / "augment.json"
INGEST_REPORT = REPORTS / "ingest.json"

MANIFEST = "manifest.csv"
SPLITS = ("train", "val", "test")

FEATURES = Path("features")  # featurize: embeddings per split + meta.json
FEATURIZE_REPORT = REPORTS / "featurize.json"  # timings and cache hits of the last run (a DVC metric)

MODELS = Path("models")
STRATEGIES = MODELS / "strategies"  # one self-describing folder per trained strategy
BEST = MODELS / "best"  # the winner on val, with its calibration
EVALUATION = REPORTS / "evaluate"
TRAIN_REPORT = REPORTS / "train.json"

PACKAGE_REPORT = REPORTS / "package.json"
BENTOFILE = Path("bentofile.yaml")
BENTO_BUILD_CTX = Path("src")  # the Bento carries its own copy of the mmfusion package
BENTOS = Path("bentos")  # package: the built Bento exported as <name>.tar, a DVC out (mmfusion/bentos.py)


def resolve(root: str | Path, path: str | Path) -> Path:
    """`path` as given when it is absolute, else under the project `root` (params hold paths relative to it)."""
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path


def fresh_dir(path: Path) -> Path:
    """An empty folder at `path` (a stage owns its outputs and rewrites them whole)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path

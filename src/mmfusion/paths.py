"""Where each stage reads and writes, relative to the project root: one place, used by every stage."""

from __future__ import annotations

from pathlib import Path

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

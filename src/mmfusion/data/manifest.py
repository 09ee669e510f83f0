"""The manifest: one row per sample, the contract between stages.

Every stage writes a `manifest.csv` next to its `images/` folder; image paths in
it are relative to that folder's parent, so a stage output is self-contained.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmfusion.errors import UserError

RAW_COLUMNS = ("id", "image", "text", "label", "group", "source", "license")
CLEAN_COLUMNS = RAW_COLUMNS + ("width", "height", "image_sha256")  # clean_columns() of the image and text specs
STRING_COLUMNS = ("id", "image", "text", "label", "group", "source", "license", "image_sha256", "source_id")


def clean_columns(specs: Mapping[str, Any]) -> list[str]:
    """The clean manifest's columns for the data's modality specs ({name: ModalitySpec}): id, each modality's
    column, the other raw columns, then the fields each spec's clean rule adds (`CLEAN_COLUMNS` for images
    and texts)."""
    own = [spec.column for spec in specs.values()]
    first, *rest = [c for c in RAW_COLUMNS if c not in own]
    return [first, *own, *rest, *(c for spec in specs.values() for c in spec.clean_fields)]


class ManifestError(UserError):
    """A manifest is missing, unreadable or malformed."""


def read_manifest(path: str | Path, required: tuple[str, ...] = RAW_COLUMNS) -> pd.DataFrame:
    """Read a manifest CSV (or Parquet) with text columns kept as strings ('' not NaN)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[])
    else:
        raise ManifestError(f"manifest must be .csv, .tsv or .parquet: {path}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ManifestError(
            f"manifest {path} is missing column(s) {', '.join(missing)}; it has: {', '.join(map(str, df.columns))}"
        )
    for col in STRING_COLUMNS:
        if col in df.columns:
            df[col] = df[col].fillna("").astype(str)
    for col in ("width", "height", "view", *(c for c in df.columns if str(c).startswith("has_"))):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col]).astype(int)
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest CSV atomically (a killed run never leaves half a manifest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def resolve_inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing paths that escape `root` (../, absolute paths, symlinks out)."""
    root_resolved = root.resolve()
    candidate = (root / relative).resolve()
    if not relative or not candidate.is_relative_to(root_resolved):
        raise ManifestError(f"image path {relative!r} escapes the image root {root}")
    return candidate

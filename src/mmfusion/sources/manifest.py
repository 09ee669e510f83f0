"""A user's data: a CSV or Parquet manifest with image paths relative to an image root."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd

from mmfusion.config import IngestParams
from mmfusion.data.manifest import ManifestError, read_manifest, resolve_inside

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def build(params: IngestParams, out_dir: Path) -> pd.DataFrame:
    """Check the whole manifest first (columns, ids, paths), then copy images into `out_dir/images`.

    A missing image file is not an error here: the row is kept and `clean` reports it.
    """
    m = params.manifest
    if not m.path:
        raise ManifestError("ingest.source is 'manifest' but ingest.manifest.path is empty")
    columns = {"id": m.id_column, "image": m.image_column, "text": m.text_column, "label": m.label_column}
    if m.group_column:
        columns["group"] = m.group_column
    src = read_manifest(Path(m.path), required=())
    missing = [f"{col} (for {key})" for key, col in columns.items() if col not in src.columns]
    if missing:
        raise ManifestError(
            f"manifest {m.path} is missing column(s) {', '.join(missing)}; it has: {', '.join(map(str, src.columns))}"
        )
    df = pd.DataFrame({key: src[col].fillna("").astype(str) for key, col in columns.items()})
    if "group" not in df:
        df["group"] = df["id"]
    df["group"] = df["group"].where(df["group"] != "", df["id"])
    if (df["id"] == "").any():
        raise ManifestError(f"manifest {m.path}: {int((df['id'] == '').sum())} row(s) have an empty id")
    dup = df["id"][df["id"].duplicated()].unique()
    if len(dup):
        raise ManifestError(f"manifest {m.path}: duplicate id(s) {', '.join(map(str, dup[:5]))}")
    root = Path(m.image_root or Path(m.path).parent)
    sources = [resolve_inside(root, rel) for rel in df["image"]]  # raises before any copy

    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = [_UNSAFE.sub("_", i) + p.suffix.lower() for i, p in zip(df["id"], sources)]
    if len(set(names)) != len(names):
        raise ManifestError(f"manifest {m.path}: ids collide after making them file-name safe")
    for path, name in zip(sources, names):
        if path.is_file():
            shutil.copyfile(path, images / name)
    df["image"] = [f"images/{n}" for n in names]
    df["source"] = "manifest"
    df["license"] = src["license"].astype(str) if "license" in src.columns else ""
    return df

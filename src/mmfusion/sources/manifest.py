"""A user's data: a CSV or Parquet manifest with image paths relative to an image root."""

from __future__ import annotations

import hashlib
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
    src = read_manifest(Path(m.path), required=())
    derive_id = not m.id_column or m.id_column not in src.columns
    columns = {"image": m.image_column, "text": m.text_column, "label": m.label_column}
    if not derive_id:
        columns["id"] = m.id_column
    if m.group_column:
        columns["group"] = m.group_column
    missing = [f"{col} (for {key})" for key, col in columns.items() if col not in src.columns]
    if missing:
        raise ManifestError(
            f"manifest {m.path} is missing column(s) {', '.join(missing)}; it has: {', '.join(map(str, src.columns))}"
        )
    df = pd.DataFrame({key: src[col].fillna("").astype(str) for key, col in columns.items()})
    if derive_id:
        df["id"] = derive_ids(df["image"], df["text"])
        df.attrs["ids_derived"] = True
    df = df[["id", *[c for c in df.columns if c != "id"]]]
    if "group" not in df:
        df["group"] = df["id"]
    df["group"] = df["group"].where(df["group"] != "", df["id"])
    if (df["id"] == "").any():
        raise ManifestError(f"manifest {m.path}: {int((df['id'] == '').sum())} row(s) have an empty id")
    dup = df["id"][df["id"].duplicated()].unique()
    if len(dup):
        raise ManifestError(f"manifest {m.path}: duplicate id(s) {', '.join(map(str, dup[:5]))}")
    root = Path(m.image_root or Path(m.path).parent)
    # An empty image path is a text-only sample (clean decides whether to keep it); raises before any copy.
    sources = [resolve_inside(root, rel) if rel.strip() else None for rel in df["image"]]

    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = [_UNSAFE.sub("_", i) + p.suffix.lower() if p is not None else "" for i, p in zip(df["id"], sources)]
    given = [n for n in names if n]
    if len(set(given)) != len(given):
        raise ManifestError(f"manifest {m.path}: ids collide after making them file-name safe")
    for path, name in zip(sources, names):
        if path is not None and path.is_file():
            shutil.copyfile(path, images / name)
    df["image"] = [f"images/{n}" if n else "" for n in names]
    df["source"] = "manifest"
    df["license"] = src["license"].astype(str) if "license" in src.columns else ""
    return df


def derive_ids(images: pd.Series, texts: pd.Series) -> list[str]:
    """Stable ids for a manifest without an id column: `<image file stem>-<10 hex of sha256(image path, text)>`.

    The id depends only on the row's image path (as written in the manifest) and its text, so
    it survives reordering, added rows and re-ingesting. Rows with the same image path and text
    (exact repeats) get `-2`, `-3`, ... in file order; a text-only row's stem is `text`.
    """
    ids, seen = [], {}
    for image, text in zip(images, texts, strict=True):
        stem = _UNSAFE.sub("_", Path(image).stem)[:40].strip("._") or "text"
        digest = hashlib.sha256(f"{image}\0{text}".encode()).hexdigest()[:10]
        base = f"{stem}-{digest}"
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return ids

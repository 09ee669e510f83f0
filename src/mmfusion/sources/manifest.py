"""A user's data: a CSV or Parquet manifest with one column per modality; file paths relative to a files root.

The data's modalities are the registered ones whose column the manifest has (`ingest.manifest.columns`
maps a modality to another column name); a modality kept as files (`spec.folder`) has its files copied.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mmfusion.config import IngestParams, ManifestSourceParams
from mmfusion.data.manifest import ManifestError, read_manifest, resolve_inside
from mmfusion.modalities import get_modality, list_modalities

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def data_columns(m: ManifestSourceParams, have: Sequence[str]) -> dict[str, str]:
    """{modality: the manifest column holding it} for the registered modalities whose column the manifest
    has, in registration order; `ingest.manifest.columns` overrides a spec's own column name (an empty name
    leaves the modality out of the data).

    A name there that is no registered modality, a column named there that the manifest lacks, or a manifest
    with no modality's column at all is a ManifestError."""
    registered = list_modalities()
    unknown = [name for name in m.columns if name not in registered]
    if unknown:
        raise ManifestError(
            f"ingest.manifest.columns names {', '.join(map(repr, unknown))}, not a registered modality; "
            f"registered: {', '.join(registered)}"
        )
    have = [str(c) for c in have]
    wanted = {name: m.columns.get(name, get_modality(name).column) for name in registered}
    missing = [f"{col} (for {name})" for name, col in m.columns.items() if col and col not in have]
    if missing:
        raise ManifestError(f"manifest {m.path} is missing column(s) {', '.join(missing)}; it has: {', '.join(have)}")
    columns = {name: col for name, col in wanted.items() if col and col in have}
    if not columns:
        expected = ", ".join(f"{col} (for {name})" for name, col in wanted.items() if col)
        raise ManifestError(
            f"manifest {m.path} has no modality column (one of {expected}; ingest.manifest.columns maps a "
            f"modality to yours); it has: {', '.join(have)}"
        )
    shared = {col for col in columns.values() if list(columns.values()).count(col) > 1}
    if shared:
        names = [name for name, col in columns.items() if col in shared]
        raise ManifestError(
            f"manifest {m.path}: column(s) {', '.join(sorted(shared))} would hold more than one modality "
            f"({', '.join(names)}); set ingest.manifest.columns"
        )
    return columns


def build(params: IngestParams, out_dir: Path) -> pd.DataFrame:
    """Check the whole manifest first (columns, ids, paths), then copy each file modality's files into
    `out_dir/<its folder>` (`images/`); a value modality's (text's) values are kept as they are.

    A missing file is not an error here: the row is kept and `clean` reports it.
    """
    m = params.manifest
    if not m.path:
        raise ManifestError("ingest.source is 'manifest' but ingest.manifest.path is empty")
    src = read_manifest(Path(m.path), required=())
    modalities = data_columns(m, list(src.columns))
    absent = [name for name in list_modalities() if name not in modalities]
    log.info("manifest %s: modalities %s; no column for %s (ingest.manifest.columns maps a modality to yours)",
             m.path, ", ".join(f"{n} (column {c})" for n, c in modalities.items()), ", ".join(absent) or "none")  # fmt: skip
    specs = {name: get_modality(name) for name in modalities}
    derive_id = not m.id_column or m.id_column not in src.columns
    fields = {"label": m.label_column}
    if not derive_id:
        fields["id"] = m.id_column
    if m.group_column:
        fields["group"] = m.group_column
    missing = [f"{col} (for {key})" for key, col in fields.items() if col not in src.columns]
    if missing:
        raise ManifestError(
            f"manifest {m.path} is missing column(s) {', '.join(missing)}; it has: {', '.join(map(str, src.columns))}"
        )

    def strings(col: str) -> pd.Series:
        return src[col].fillna("").astype(str)

    df = pd.DataFrame({spec.column: strings(modalities[name]) for name, spec in specs.items()})
    df["id"] = derive_ids(df, list(specs)) if derive_id else strings(m.id_column)
    df["label"] = strings(m.label_column)
    df["group"] = strings(m.group_column) if m.group_column else df["id"]
    df["group"] = df["group"].where(df["group"] != "", df["id"])
    df = df[["id", *(spec.column for spec in specs.values()), "label", "group"]]
    if (df["id"] == "").any():
        raise ManifestError(f"manifest {m.path}: {int((df['id'] == '').sum())} row(s) have an empty id")
    dup = df["id"][df["id"].duplicated()].unique()
    if len(dup):
        raise ManifestError(f"manifest {m.path}: duplicate id(s) {', '.join(map(str, dup[:5]))}")

    root = Path(m.files_root or Path(m.path).parent)
    # Every file modality's paths are checked before any copy. An empty path is a sample without that
    # modality (clean decides whether to keep it).
    files: dict[str, tuple[list[Path | None], list[str]]] = {}
    for name, spec in specs.items():
        if spec.folder is None:
            continue
        sources = [_inside(root, rel, name) if rel.strip() else None for rel in df[spec.column]]
        names = [_UNSAFE.sub("_", i) + p.suffix.lower() if p is not None else "" for i, p in zip(df["id"], sources)]
        given = [n for n in names if n]
        if len(set(given)) != len(given):
            raise ManifestError(f"manifest {m.path}: ids collide after making them file-name safe")
        files[name] = sources, names
    for name, (sources, names) in files.items():
        spec = specs[name]
        folder = out_dir / spec.folder
        folder.mkdir(parents=True, exist_ok=True)
        for path, target in zip(sources, names):
            if path is not None and path.is_file():
                shutil.copyfile(path, folder / target)
        df[spec.column] = [f"{spec.folder}/{n}" if n else "" for n in names]
    df["source"] = "manifest"
    df["license"] = src["license"].astype(str) if "license" in src.columns else ""
    df.attrs["ids_derived"] = derive_id
    return df


def _inside(root: Path, relative: str, modality: str) -> Path:
    """`root / relative` for a file of `modality`, refusing a path that escapes the files root."""
    try:
        return resolve_inside(root, relative)
    except ManifestError:
        raise ManifestError(
            f"{modality} path {relative!r} escapes the files root {root} (ingest.manifest.files_root)"
        ) from None


def derive_ids(df: pd.DataFrame, modalities: Sequence[str]) -> list[str]:
    """Stable ids for a manifest without an id column: `<stem>-<10 hex of sha256(the row's values)>`.

    `df` holds each of `modalities` (the data's, in registration order) under its spec's column. The digest
    is over every modality's value as written in the manifest (file paths as given), joined by NUL in that
    order, so an id depends only on the row: it survives reordering, added rows and re-ingesting. The stem
    is the file stem of the row's first file modality that has a path (an image's), else the name of the
    data's first value modality (`text`), else of its first modality. For image+text data that is
    `<image file stem>-<sha256(image path, text)>`, a text-only row's stem being `text`. Rows with the same
    values (exact repeats) get `-2`, `-3`, ... in file order.
    """
    specs = [get_modality(name) for name in modalities]
    files = [spec.column for spec in specs if spec.folder is not None]
    values = [spec.name for spec in specs if spec.folder is None]
    fallback = values[0] if values else specs[0].name
    ids, seen = [], {}
    for row in zip(*(df[spec.column].astype(str) for spec in specs), strict=True):
        by_column = dict(zip((spec.column for spec in specs), row))
        stems = (_UNSAFE.sub("_", Path(by_column[col]).stem)[:40].strip("._") for col in files)
        stem = next((s for s in stems if s), fallback)
        digest = hashlib.sha256("\0".join(row).encode()).hexdigest()[:10]
        base = f"{stem}-{digest}"
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return ids

"""The manifest: one row per sample, the contract between stages.

Every stage writes a `manifest.csv` next to its `images/` folder; image paths in
it are relative to that folder's parent, so a stage output is self-contained.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmfusion.errors import UserError
from mmfusion.tables import read_parquet

FIELDS = ("id", "label", "group", "source", "license")  # the raw columns that are no modality's
# The columns of image+text data (the built-in modalities), as the functions below give them for their specs.
RAW_COLUMNS = ("id", "image", "text", "label", "group", "source", "license")
CLEAN_COLUMNS = RAW_COLUMNS + ("width", "height", "image_sha256")
STRING_COLUMNS = ("id", "image", "text", "label", "group", "source", "license", "image_sha256", "source_id")


def raw_columns(specs: Mapping[str, Any]) -> list[str]:
    """The raw manifest's columns for the data's modality specs ({name: ModalitySpec}): id, each modality's
    column, then the other `FIELDS` (`RAW_COLUMNS` for images and texts)."""
    first, *rest = FIELDS
    return [first, *(spec.column for spec in specs.values()), *rest]


def clean_columns(specs: Mapping[str, Any]) -> list[str]:
    """The clean manifest's columns for the data's modality specs: the raw columns, then the fields each
    spec's clean rule adds (`CLEAN_COLUMNS` for images and texts)."""
    return [*raw_columns(specs), *(c for spec in specs.values() for c in spec.clean_fields)]


def string_columns(specs: Mapping[str, Any]) -> list[str]:
    """The columns read as strings ('' not NaN): the raw columns, the clean fields whose missing value is a
    string, and augment's `source_id` (`STRING_COLUMNS` for images and texts)."""
    fields = (c for spec in specs.values() for c, empty in spec.clean_fields.items() if isinstance(empty, str))
    return [*raw_columns(specs), *fields, "source_id"]


def data_specs(columns: Iterable[str], root: str | Path = ".", params: Any = None) -> dict[str, Any]:
    """{modality: spec} of the modalities whose column a manifest has (the data's), files relative to `root`,
    with the settings of a pipeline run's `params` (each spec's defaults without)."""
    from mmfusion.modalities import settings_from_params, specs_for  # the registry, plugins included, at call time
    from mmfusion.modalities.base import modalities_in

    modalities = modalities_in(columns)
    return specs_for(modalities, root, settings_from_params(modalities, params) if params is not None else None)


class ManifestError(UserError):
    """A manifest is missing, unreadable or malformed."""


Required = Sequence[str] | Callable[[Mapping[str, Any]], Sequence[str]]


def read_manifest(path: str | Path, required: Required = raw_columns) -> pd.DataFrame:
    """Read a manifest CSV (or Parquet) with text columns kept as strings ('' not NaN).

    `required` is a list of columns, or a function of the data's modality specs (`raw_columns`,
    `clean_columns`): then the manifest must also have at least one registered modality's column."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        df = read_parquet(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[])
    else:
        raise ManifestError(f"manifest must be .csv, .tsv or .parquet: {path}")
    specs = data_specs(df.columns)
    if callable(required):
        if not specs:
            from mmfusion.modalities import get_modality, list_modalities

            columns = ", ".join(get_modality(m).column for m in list_modalities())
            raise ManifestError(
                f"manifest {path} has no modality column (one of {columns}); it has: {', '.join(map(str, df.columns))}"
            )
        required = required(specs)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ManifestError(
            f"manifest {path} is missing column(s) {', '.join(missing)}; it has: {', '.join(map(str, df.columns))}"
        )
    for col in string_columns(specs):
        if col in df.columns:
            df[col] = df[col].fillna("").astype(str)
    numeric: dict[str, type] = {"view": int, **{c: int for c in df.columns if str(c).startswith("has_")}}
    for spec in specs.values():  # each modality's clean-manifest fields with a numeric default (width, audio_seconds)
        numeric.update({c: type(v) for c, v in spec.clean_fields.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for col, kind in numeric.items():
        if col in df.columns:
            df[col] = pd.to_numeric(df[col]).astype(kind)
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

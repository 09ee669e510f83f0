"""Cleaning: each modality's rule over its raw value, then de-duplication; every dropped row gets a reason.

The data's modalities are the registered specs whose column the raw manifest has (`modalities/`); each
spec's `clean` normalises, decodes and checks its value and names the reason it drops a row for
(`empty_text`, `text_too_short`, `undecodable_image`, `image_too_small`, ...). Reasons, one per dropped
row, the first that applies:
  missing_label, disallowed_label (the label rules, here),
  no_modality (none of the data's modalities), or with `clean.allow_missing_modality` off the
  `missing` reason of the first modality a row lacks (`missing_image`, `empty_text`),
  a modality's own reasons, values before files (checking a text is cheaper than decoding a file);
  for a file modality first `missing_<modality>` when its file cannot be read or lies outside the raw data,
  label_conflict (the same file content, in any file modality, under different labels: every copy is dropped),
  duplicate (the same content in every modality as an earlier row: later copies are dropped).

A row with only some modalities is a real sample: with `clean.allow_missing_modality` (default on) a
row whose cell of a modality is empty (a text empty after normalisation counts as empty) is kept
without it, and reported under its presence pattern (`image_only`, `text_only`); that modality's clean
columns are then empty/0. With it off, such a row is dropped with the spec's `missing` reason. A row
that names a file that cannot be read is still dropped: that is a broken row, not a sample without it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mmfusion.config import CleanParams
from mmfusion.data.manifest import ManifestError, clean_columns, resolve_inside
from mmfusion.modalities.base import (
    Dropped,
    ModalitySpec,
    modalities_in,
    presence_pattern,
    presence_patterns,
    specs_for,
)

log = logging.getLogger(__name__)


def normalize_label(raw: str, params: CleanParams) -> str:
    """Strip a label and map it through `clean.label_aliases`."""
    label = " ".join(str(raw).split())
    return params.label_aliases.get(label, label)


def _article(what: str) -> str:
    return f"{'an' if what[0] in 'aeiou' else 'a'} {what}"


def read_file(spec: ModalitySpec, raw: str, raw_root: Path) -> bytes:
    """The bytes of a file modality's raw file; `missing_<modality>` when it escapes `raw_root` or cannot be read."""
    try:
        return resolve_inside(raw_root, raw).read_bytes()
    except (OSError, ManifestError) as exc:
        raise Dropped(f"missing_{spec.name}", f"cannot read {raw}: {exc.__class__.__name__}") from exc


def _remove_files(fields: Mapping[str, Any], specs: Mapping[str, ModalitySpec], out_root: Path) -> None:
    """Delete the files a row's file modalities wrote (a later modality dropped the row)."""
    for spec in specs.values():
        if spec.folder and fields.get(spec.column):
            (out_root / fields[spec.column]).unlink(missing_ok=True)


def clean_row(
    row: pd.Series, raw_root: Path, out_root: Path, params: CleanParams, allowed: set[str],
    specs: Mapping[str, ModalitySpec],
) -> dict:  # fmt: skip
    """One raw row as a clean-manifest row; raises Dropped with the first reason that applies."""
    label = normalize_label(row["label"], params)
    if not label:
        raise Dropped("missing_label", "label is empty")
    if allowed and label not in allowed:
        raise Dropped("disallowed_label", f"label {label!r} not in clean.allowed_labels")
    present = {m: spec.present(row[spec.column]) for m, spec in specs.items()}
    if not params.allow_missing_modality:
        for m, spec in specs.items():
            if not present[m]:
                raise spec.missing()
    elif not any(present.values()):
        raise Dropped("no_modality", "neither " + " nor ".join(_article(s.described) for s in specs.values()))
    fields: dict[str, Any] = {}
    try:
        # values before files: a row dropped for its text costs no decode and leaves no file behind
        for m, spec in sorted(specs.items(), key=lambda kv: kv[1].folder is not None):
            if present[m]:
                raw = row[spec.column]
                data = read_file(spec, raw, raw_root) if spec.folder else None
                fields.update(spec.clean(raw, data, out_root, params))
            else:
                fields.update({spec.column: "", **spec.clean_fields})
    except Dropped:
        _remove_files(fields, specs, out_root)
        raise
    return {
        "id": row["id"],
        "label": label,
        "group": row["group"] or row["id"],
        "source": row["source"],
        "license": row["license"],
        **fields,
    }


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def drop_conflicts_and_duplicates(
    df: pd.DataFrame, dropped: list[dict], specs: Mapping[str, ModalitySpec]
) -> pd.DataFrame:
    """Drop every copy of a file seen under two labels, and later copies of the same content in every modality."""
    for spec in specs.values():
        if spec.folder is None:  # only a file's content under two labels is a conflict (a caption may fit two)
            continue
        key = spec.dedup_key
        labels_per_file = df[df[key] != ""].groupby(key)["label"].nunique()
        conflicted = labels_per_file[labels_per_file > 1].index
        for content in conflicted:
            rows = df[df[key] == content]
            detail = f"same {spec.name} under labels " + ", ".join(
                f"{i} ({lab})" for i, lab in zip(rows["id"], rows["label"], strict=True)
            )
            dropped.extend({"id": i, "reason": "label_conflict", "detail": detail} for i in rows["id"])
        df = df[~df[key].isin(set(conflicted))]
    keys = [spec.dedup_key for spec in specs.values()]
    dup_mask = df.duplicated(subset=keys, keep="first")
    first_of = {tuple(r[:-1]): r[-1] for r in df[~dup_mask][[*keys, "id"]].itertuples(index=False)}
    same = _listed(list(specs))
    for _, row in df[dup_mask].iterrows():
        first = first_of[tuple(row[k] for k in keys)]
        dropped.append({"id": row["id"], "reason": "duplicate", "detail": f"same {same} as {first}"})
    return df[~dup_mask].reset_index(drop=True)


def clean_dataset(raw: pd.DataFrame, raw_root: Path, out_root: Path, params: CleanParams,
                  settings: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """Clean `raw` (files relative to `raw_root`) into `out_root`; return (clean manifest, report).

    The modalities are the registered ones whose column `raw` has; a file modality's files go to
    `out_root/<its folder>`. `raw_root` is only read. The report holds counts per reason, the kept
    rows per presence pattern (`image+text`, `image_only`, `text_only` for images and texts) and one
    row per dropped sample. `settings`: each modality's settings ({modality: {...}}, a run's
    `settings_from_params`; the specs' defaults where missing).
    """
    specs = specs_for(modalities_in(raw.columns), raw_root, settings)
    for spec in specs.values():
        if spec.folder:
            (out_root / spec.folder).mkdir(parents=True, exist_ok=True)
    allowed = set(params.allowed_labels)
    kept: list[dict] = []
    dropped: list[dict] = []
    for _, row in tqdm(raw.iterrows(), total=len(raw), desc="clean", unit="row", mininterval=2):
        try:
            kept.append(clean_row(row, raw_root, out_root, params, allowed, specs))
        except Dropped as exc:
            dropped.append({"id": row["id"], "reason": exc.reason, "detail": exc.detail})

    df = drop_conflicts_and_duplicates(pd.DataFrame(kept, columns=clean_columns(specs)), dropped, specs)
    for spec in specs.values():  # the files of rows dropped as conflicts or duplicates
        if spec.folder:
            for name in set(p[spec.column] for p in kept if p[spec.column]) - set(df[spec.column]):
                (out_root / name).unlink(missing_ok=True)

    counts = Counter(d["reason"] for d in dropped)
    modalities = list(specs)
    present = zip(*(df[spec.column] != "" for spec in specs.values()))
    patterns = Counter(presence_pattern([m for m, has in zip(modalities, row) if has], modalities) for row in present)
    report = {
        "input": int(len(raw)),
        "kept": int(len(df)),
        "dropped": len(dropped),
        "dropped_by_reason": dict(sorted(counts.items())),
        "kept_by_presence": {k: int(patterns.get(k, 0)) for k in presence_patterns(modalities)},
        "labels": {k: int(v) for k, v in df["label"].value_counts().sort_index().items()},
        "dropped_rows": dropped,
    }
    return df, report

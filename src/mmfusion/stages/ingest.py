"""ingest: materialise raw data (the modalities' files + manifest) from a source into data/raw."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pandas as pd

from mmfusion import paths
from mmfusion.config import Params
from mmfusion.data.manifest import write_manifest
from mmfusion.errors import UserError
from mmfusion.sources import get_source
from mmfusion.stages.common import fresh_dir, stage_main, write_json

log = logging.getLogger(__name__)


def select_samples(df: pd.DataFrame, min_class_count: int, limit: int, seed: int = 0) -> pd.DataFrame:
    """Drop labels with fewer than `min_class_count` samples, then keep a stratified `limit` (0 = all)."""
    counts = df["label"].value_counts()
    small = counts[counts < min_class_count]
    if len(small):
        log.info("ingest: dropping %d label(s) under %d samples: %s", len(small), min_class_count, ", ".join(small.index))
    df = df[~df["label"].isin(small.index)]
    if limit and limit < len(df):
        from sklearn.model_selection import train_test_split  # here: sklearn is ~1 s of every ingest process's start

        df, _ = train_test_split(df, train_size=limit, stratify=df["label"], random_state=seed)
    return df.sort_values("id").reset_index(drop=True)


def add_feedback(df: pd.DataFrame, feedback_dir: Path, staging: Path) -> pd.DataFrame:
    """The source's rows plus the exported feedback in `feedback_dir` (manifest.csv + one folder per file
    modality, `images/`), if any.

    Feedback files are copied into the staging folder of their modality under their own `feedback-` names
    (no collision with the source's files); their rows keep source=feedback (split puts them in train)."""
    from mmfusion.data.manifest import data_specs, raw_columns, read_manifest, resolve_inside

    manifest = feedback_dir / paths.MANIFEST
    if not manifest.exists():
        return df
    specs = data_specs(df.columns)  # the source's modalities
    fb = read_manifest(manifest, required=[c for c in raw_columns(specs) if c not in {s.column for s in specs.values()}])
    for spec in specs.values():  # requests that all lacked a modality export no column for it
        if spec.column not in fb:
            fb[spec.column] = ""
    if fb.empty:
        return df
    clash = set(fb["id"]) & set(df["id"])
    if clash:
        raise ValueError(f"ingest: feedback ids collide with the source's: {', '.join(sorted(clash)[:5])}")
    for spec in specs.values():
        if not spec.folder:
            continue
        folder = staging / spec.folder
        folder.mkdir(parents=True, exist_ok=True)
        for rel in fb[spec.column]:
            if rel:  # a row without the modality keeps its empty value
                src = resolve_inside(feedback_dir, rel)
                shutil.copyfile(src, folder / src.name)
        fb[spec.column] = [f"{spec.folder}/{Path(r).name}" if r else "" for r in fb[spec.column]]
    fb = fb.assign(source="feedback")
    log.info("ingest: + %d feedback sample(s) from %s", len(fb), feedback_dir)
    return pd.concat([df, fb[raw_columns(specs)]], ignore_index=True)


def drop_unkept_files(df: pd.DataFrame, staging: Path) -> None:
    """Delete the files of every file modality's staging folder that no row of `df` names (the rows the
    selection dropped)."""
    from mmfusion.data.manifest import data_specs

    for spec in data_specs(df.columns).values():
        folder = staging / spec.folder if spec.folder else None
        if folder is None or not folder.is_dir():
            continue
        keep = set(df[spec.column])
        for path in folder.iterdir():
            if f"{spec.folder}/{path.name}" not in keep:
                path.unlink()


def run(params: Params, root: Path = Path(".")) -> dict:
    """Build data/raw from the configured source (ingest.source)."""
    p = params.ingest
    source = get_source(p.source)  # unknown names fail before any work
    out = root / paths.RAW
    staging = fresh_dir(out.with_name(out.name + ".tmp"))
    df = source(p, staging)
    if df.empty:
        raise UserError(f"ingest source {p.source!r} produced no samples")
    before = len(df)
    ids_derived = bool(df.attrs.get("ids_derived", False))
    df = select_samples(df, p.min_class_count, p.limit)
    if p.feedback_dir:
        df = add_feedback(df, root / p.feedback_dir, staging)
    drop_unkept_files(df, staging)
    write_manifest(df, staging / paths.MANIFEST)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    summary = {
        "source": p.source,
        "label_field": p.label_field if p.source == "emoji" else p.manifest.label_column,
        "samples": int(len(df)),
        "feedback_samples": int((df["source"] == "feedback").sum()),
        "ids": "derived from each row's values (ingest.manifest.columns)" if ids_derived else "from the manifest",
        "dropped_small_classes_or_limit": int(before - len(df)),
        "labels": {k: int(v) for k, v in df["label"].value_counts().sort_index().items()},
    }
    write_json(root / paths.INGEST_REPORT, summary)
    log.info("ingest: %d samples, %d labels -> %s", len(df), len(summary["labels"]), out)
    return summary


def main() -> int:
    return stage_main("ingest", run)


if __name__ == "__main__":
    sys.exit(main())

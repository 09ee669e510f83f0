"""split: stratified, grouped train/val/test manifests from data/clean into data/split, with their group mix checked."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd

from mmfusion import paths
from mmfusion.config import Params
from mmfusion.data.manifest import clean_columns, data_specs, read_manifest, write_manifest
from mmfusion.data.split import check_group_mix, group_mix, split_counts, split_dataset
from mmfusion.stages.common import fresh_dir, stage_main, write_json

log = logging.getLogger(__name__)


def run(params: Params, root: Path = Path(".")) -> dict:
    """Write data/split/{train,val,test}.csv and a per-class count table (the files stay in data/clean)."""
    df = read_manifest(root / paths.CLEAN / paths.MANIFEST, required=clean_columns)
    files = [spec.column for spec in data_specs(df.columns).values() if spec.folder]
    # Labelled feedback always trains: the source's rows are split exactly as without it, so the
    # test split stays fixed across retrains (champion and challenger are compared on it).
    is_feedback = df["source"] == "feedback"
    splits = split_dataset(df[~is_feedback].reset_index(drop=True), params.split)
    if is_feedback.any():
        splits["train"] = pd.concat([splits["train"], df[is_feedback]]).sort_values("id").reset_index(drop=True)
    out = fresh_dir(root / paths.SPLIT)
    # From here on the file modalities' paths are relative to the project root (data/clean/images/...).
    for name, part in splits.items():
        # a row without a file modality keeps its empty path
        part = part.assign(**{c: [(paths.CLEAN / p).as_posix() if p else "" for p in part[c]] for c in files})
        write_manifest(part, out / f"{name}.csv")
    table = split_counts(splits)
    table.to_csv(out / "class_counts.csv")
    mix = group_mix(splits)
    # severity warning: a split the data cannot balance is reported and the pipeline goes on
    check = check_group_mix(mix, params.split.max_group_share)
    summary = {
        "sizes": {name: int(len(part)) for name, part in splits.items()},
        "fractions": {name: round(len(part) / len(df), 4) for name, part in splits.items()},
        "group_mix": mix.set_index("split").drop(columns="held_out").to_dict("index"),
        "group_check": check,
        "class_counts": {label: row.to_dict() for label, row in table.iterrows()},
    }
    write_json(root / paths.SPLIT_REPORT, summary)
    log.info("split: %s", summary["sizes"])
    for line in check["warnings"]:
        log.warning("split warning: %s", line)
    return summary


def main() -> int:
    return stage_main("split", run)


if __name__ == "__main__":
    sys.exit(main())

"""augment: K seeded views per training sample into data/augmented, each modality's from its spec
(image views, text perturbations)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from mmfusion import paths
from mmfusion.config import Params
from mmfusion.data.augment import view_seed
from mmfusion.data.manifest import data_specs, read_manifest, write_manifest
from mmfusion.stages.common import fresh_dir, stage_main, write_json

log = logging.getLogger(__name__)


def augmented_columns(specs: dict) -> list[str]:
    """The augmented manifest's columns for the train split's modality specs."""
    return ["id", "source_id", "view", *(spec.column for spec in specs.values()), "label", "group"]


def run(params: Params, root: Path = Path(".")) -> dict:
    """Write augment.views views of every training sample (each modality's views + a manifest linking to
    source ids); view k of a sample has one seed, shared by its modalities."""
    p = params.augment
    train = read_manifest(root / paths.SPLIT / "train.csv")
    specs = data_specs(train.columns, root, params)
    out = fresh_dir(root / paths.AUGMENTED)
    for spec in specs.values():
        if spec.folder:
            (out / spec.folder).mkdir()
    rows = []
    for _, row in tqdm(train.iterrows(), total=len(train) if p.views else 0, desc="augment", unit="img", mininterval=2):
        if p.views == 0:
            break
        seeds = [view_seed(p.seed, row["id"], k) for k in range(p.views)]
        values = {}
        for spec in specs.values():
            value = row[spec.column]
            # a row without the modality (clean.allow_missing_modality) keeps its empty value
            stem = Path(value).stem if spec.folder and value else row["id"]
            named = [(seed, f"{stem}__v{k}") for k, seed in enumerate(seeds)]
            views = spec.augment(value, p, named, out) if spec.present(value) else None
            if views is None:
                values[spec.column] = [value] * p.views
            elif spec.folder:  # paths relative to the project root, as in data/split
                values[spec.column] = [(paths.AUGMENTED / v).as_posix() for v in views]
            else:
                values[spec.column] = views
        for k in range(p.views):
            rows.append(
                {
                    "id": f"{row['id']}__v{k}",
                    "source_id": row["id"],
                    "view": k,
                    **{column: view[k] for column, view in values.items()},
                    "label": row["label"],
                    "group": row["group"],
                }
            )
    write_manifest(pd.DataFrame(rows, columns=augmented_columns(specs)), out / paths.MANIFEST)
    summary = {"views_per_sample": p.views, "train_samples": int(len(train)), "views": len(rows)}
    write_json(root / paths.AUGMENT_REPORT, summary)
    log.info("augment: %d views of %d training samples", len(rows), len(train))
    return summary


def main() -> int:
    return stage_main("augment", run)


if __name__ == "__main__":
    sys.exit(main())

"""augment: K seeded image views and text perturbations per training sample, into data/augmented."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from mmfusion import paths
from mmfusion.config import Params
from mmfusion.data.augment import augment_image, augment_text, view_seed
from mmfusion.modalities.image import decode_image
from mmfusion.data.manifest import read_manifest, write_manifest
from mmfusion.stages.common import fresh_dir, stage_main, write_json

log = logging.getLogger(__name__)

AUGMENTED_COLUMNS = ("id", "source_id", "view", "image", "text", "label", "group")


def run(params: Params, root: Path = Path(".")) -> dict:
    """Write augment.views views of every training sample (images + manifest linking to source ids)."""
    p = params.augment
    train = read_manifest(root / paths.SPLIT / "train.csv")
    out = fresh_dir(root / paths.AUGMENTED)
    (out / "images").mkdir()
    rows = []
    for _, row in tqdm(train.iterrows(), total=len(train) if p.views else 0, desc="augment", unit="img", mininterval=2):
        if p.views == 0:
            break
        # a text-only sample (clean.allow_missing_modality) gets text views only
        img = decode_image(root / row["image"]) if row["image"] else None
        stem = Path(row["image"]).stem if row["image"] else row["id"]
        for k in range(p.views):
            seed = view_seed(p.seed, row["id"], k)
            name = f"images/{stem}__v{k}.png"
            if img is not None:
                augment_image(img, p, seed).save(out / name, format="PNG")
            rows.append(
                {
                    "id": f"{row['id']}__v{k}",
                    "source_id": row["id"],
                    "view": k,
                    "image": (paths.AUGMENTED / name).as_posix() if img is not None else "",
                    "text": augment_text(row["text"], p, seed),
                    "label": row["label"],
                    "group": row["group"],
                }
            )
    write_manifest(pd.DataFrame(rows, columns=list(AUGMENTED_COLUMNS)), out / paths.MANIFEST)
    summary = {"views_per_sample": p.views, "train_samples": int(len(train)), "views": len(rows)}
    write_json(root / paths.AUGMENT_REPORT, summary)
    log.info("augment: %d views of %d training samples", len(rows), len(train))
    return summary


def main() -> int:
    return stage_main("augment", run)


if __name__ == "__main__":
    sys.exit(main())

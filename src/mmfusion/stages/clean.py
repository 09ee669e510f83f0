"""clean: drop undecodable, empty and duplicate samples from data/raw into data/clean, with reasons."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mmfusion import paths
from mmfusion.config import Params
from mmfusion.data.clean import clean_dataset
from mmfusion.data.manifest import read_manifest, write_manifest
from mmfusion.errors import UserError
from mmfusion.modalities import settings_from_params
from mmfusion.modalities.base import modalities_in
from mmfusion.stages.common import fresh_dir, stage_main, write_json

log = logging.getLogger(__name__)


def run(params: Params, root: Path = Path(".")) -> dict:
    """Clean data/raw into data/clean and write reports/clean.json (one row per dropped sample)."""
    raw_dir = root / paths.RAW
    raw = read_manifest(raw_dir / paths.MANIFEST)
    out = fresh_dir(root / paths.CLEAN)
    df, report = clean_dataset(raw, raw_dir, out, params.clean, settings_from_params(modalities_in(raw.columns), params))
    write_manifest(df, out / paths.MANIFEST)
    write_json(root / paths.CLEAN_REPORT, report)
    log.info(
        "clean: kept %d of %d; dropped %s", report["kept"], report["input"], report["dropped_by_reason"] or "nothing"
    )
    if df.empty:
        raise UserError(f"clean: every sample was dropped; see {paths.CLEAN_REPORT}")
    return {k: v for k, v in report.items() if k != "dropped_rows"}


def main() -> int:
    return stage_main("clean", run)


if __name__ == "__main__":
    sys.exit(main())

"""validate: a Great Expectations suite over data/clean; a failed critical expectation stops the pipeline."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mmfusion import paths
from mmfusion.config import Params
from mmfusion.data.manifest import clean_columns, read_manifest
from mmfusion.data.validate import validate_manifest
from mmfusion.modalities import settings_from_params
from mmfusion.modalities.base import modalities_in
from mmfusion.stages.common import fresh_dir, stage_main

log = logging.getLogger(__name__)


def run(params: Params, root: Path = Path(".")) -> dict:
    """Validate data/clean; write reports/validation/result.json and Data Docs HTML."""
    df = read_manifest(root / paths.CLEAN / paths.MANIFEST, required=clean_columns)
    out = fresh_dir(root / paths.VALIDATION)
    result = validate_manifest(df, root / paths.CLEAN, out, params.validate,
                               settings_from_params(modalities_in(df.columns), params))  # fmt: skip
    log.info(
        "validate: %d expectations, %d warnings; Data Docs: %s",
        result["evaluated"], result["warnings"], out / result["data_docs"],
    )
    return {k: v for k, v in result.items() if k != "expectations"}


def main() -> int:
    return stage_main("validate", run)


if __name__ == "__main__":
    sys.exit(main())

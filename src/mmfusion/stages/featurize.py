"""featurize: encode train (originals + augmented views), val and test once with each configured encoder.

Writes features/<split>.safetensors + .csv and features/meta.json (see mmfusion.features.store),
through a content-addressed cache so unchanged samples are never encoded twice. The work itself is
`mmfusion.features.build.build_features`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmfusion import paths
from mmfusion.compute import build_task_runner  # noqa: F401 - flows/stages.py: this stage's runner
from mmfusion.config import Params
from mmfusion.features.build import FeaturizeShardsError, build_features, check_params  # noqa: F401 - re-exported
from mmfusion.stages.common import stage_main, write_json


def run(params: Params, root: Path = Path(".")) -> dict:
    """Encode every split with each configured encoder (cached by content) and write features/."""
    summary = build_features(params, root, root / paths.FEATURES)
    write_json(root / paths.FEATURIZE_REPORT, summary)
    return summary


def main() -> int:
    return stage_main("featurize", run)


if __name__ == "__main__":
    sys.exit(main())

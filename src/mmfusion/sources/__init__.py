"""Ingest sources by name: `emoji` (bundled default data) and `manifest` (a user's data).

A source materialises raw samples into a folder: `images/` plus a manifest with the
raw columns (`mmfusion.data.manifest.RAW_COLUMNS`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from mmfusion.config import IngestParams
from mmfusion.errors import UserError

Source = Callable[[IngestParams, Path], pd.DataFrame]


def get_source(name: str) -> Source:
    """The source called `name`; an unknown name is an error listing the known ones."""
    from mmfusion.sources import emoji, manifest

    sources: dict[str, Source] = {"emoji": emoji.build, "manifest": manifest.build}
    if name not in sources:
        raise UserError(f"unknown ingest source {name!r}; available: {', '.join(sorted(sources))}")
    return sources[name]

"""The live pointer: which packaged Bento is served. Promotion writes it; serving and the monitor read it.

`retrain.live_path` (reports/live.json) holds {"live": {...}, "previous": [...newest first], "rolled_back": [...]},
each entry naming a Bento and its model (`bento_tag`, `model_tag`, `model_version`). Without one, the last
packaged Bento (reports/package.json) is what is served.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmfusion import paths
from mmfusion.config import Params


def read_live(params: Params, root: Path) -> dict:
    """The pointer's state; an empty one (nothing promoted yet) where there is no file."""
    path = paths.resolve(root, params.retrain.live_path)
    if not path.exists():
        return {"live": None, "previous": [], "rolled_back": []}
    return {"previous": [], "rolled_back": [], **json.loads(path.read_text())}


def write_live(params: Params, root: Path, state: dict) -> Path:
    """Replace the pointer's state atomically (a reader never sees half a file)."""
    path = paths.resolve(root, params.retrain.live_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)
    return path


def packaged(root: Path) -> dict | None:
    """The last Bento the package stage built (reports/package.json), as a pointer entry."""
    report = Path(root) / paths.PACKAGE_REPORT
    if not report.exists():
        return None
    p = json.loads(report.read_text())
    return {"bento_tag": p["bento_tag"], "model_tag": p["model_tag"], "model_version": p.get("model_version")}


def live_entry(params: Params, root: Path) -> dict | None:
    """The live Bento: the pointer's, else the last packaged one (before any promotion)."""
    return read_live(params, root)["live"] or packaged(root)

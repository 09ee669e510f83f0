"""A tiny synthetic features/ folder for tests: no encoders, no images, seconds to train (test-only: not in the Bento).

Each class has a centre per modality; image and text each blur a different half of the
classes together, so only fusion separates all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion.features.store import save_features

SYNTHETIC_DIMS = {"image": 24, "text": 16}


def write_synthetic_features(
    out_dir: Path,
    classes: int = 4,
    per_class: dict[str, int] | None = None,
    dims: dict[str, int] | None = None,
    noise: float = 0.6,
    seed: int = 0,
) -> Path:
    """Write train/val/test/augmented splits + meta.json into `out_dir`; returns it."""
    out_dir = Path(out_dir)
    per_class = per_class or {"train": 30, "val": 10, "test": 10, "augmented": 0}
    dims = dims or SYNTHETIC_DIMS
    rng = np.random.default_rng(seed)
    centres = {m: rng.normal(size=(classes, d)) * 2.0 for m, d in dims.items()}
    modalities = list(dims)
    for i, m in enumerate(modalities):
        # modality i cannot tell apart the pairs of classes (2k + i % 2, 2k + 1 - i % 2): a shared centre
        for c in range(i % 2, classes - 1, 2):
            centres[m][c + 1] = centres[m][c]
    for split, n in per_class.items():
        y = np.repeat(np.arange(classes), n)
        arrays = {m: (centres[m][y] + rng.normal(scale=noise, size=(len(y), d))).astype(np.float32) for m, d in dims.items()}
        index = pd.DataFrame(
            {
                "id": [f"{split}-{k}" for k in range(len(y))],
                "label": [f"class_{c}" for c in y],
                "group": [f"{split}-{k}" for k in range(len(y))],
            }
        )
        if split == "augmented":
            index["source_id"] = index["id"]
            index["view"] = 0
        save_features(out_dir, split, arrays, index)
    meta = {
        "modalities": {
            m: {"encoder": f"synthetic_{m}", "dim": d, "fingerprint": f"synthetic-{m}-{seed}", "preprocessing": {}}
            for m, d in dims.items()
        }
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return out_dir

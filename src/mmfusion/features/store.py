"""The features/ folder: the contract between `featurize` and everything that trains on features.

Layout, per split (train, val, test, augmented):
  features/<split>.safetensors  one tensor per modality ("image", "text"), shape [N, dim], rows aligned with
  features/<split>.csv          the index: id, label, group (+ source_id and view for augmented)
  features/meta.json            {"modalities": {modality: {"encoder", "dim", "fingerprint", "preprocessing"}}, ...}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from mmfusion.data.manifest import read_manifest, write_manifest

FEATURE_SPLITS = ("train", "val", "test", "augmented")


def save_features(out_dir: Path, split: str, arrays: dict[str, np.ndarray], index: pd.DataFrame) -> None:
    """Write one split's embeddings and index atomically; every array must have len(index) rows."""
    for modality, arr in arrays.items():
        if arr.ndim != 2 or arr.shape[0] != len(index):
            raise ValueError(f"{split}/{modality}: expected [{len(index)}, dim] array, got {arr.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{split}.safetensors.tmp"
    save_file({m: np.ascontiguousarray(a) for m, a in arrays.items()}, str(tmp))
    os.replace(tmp, out_dir / f"{split}.safetensors")
    write_manifest(index, out_dir / f"{split}.csv")


def load_features(features_dir: Path, split: str) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """(arrays by modality, index DataFrame) for one split; arrays are returned as float32."""
    features_dir = Path(features_dir)
    path = features_dir / f"{split}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no features for split {split!r}: {path} (run `dvc repro featurize`)")
    arrays = {m: a.astype(np.float32, copy=False) for m, a in load_file(str(path)).items()}
    index = read_manifest(features_dir / f"{split}.csv", required=("id", "label"))
    return arrays, index


def load_meta(features_dir: Path) -> dict[str, Any]:
    """features/meta.json: encoder name, dim, fingerprint and preprocessing per modality."""
    return json.loads((Path(features_dir) / "meta.json").read_text())

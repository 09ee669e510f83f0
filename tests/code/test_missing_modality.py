"""Rows that lack a modality in the data itself: the mask reaches training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfusion.config import parse_params
from mmfusion.features.store import load_features, save_features
from mmfusion.fusion import create_head
from mmfusion.stages import evaluate as evaluate_stage
from mmfusion.stages import train as train_stage
from mmfusion.training.data import load_split
from mmfusion.training.presence import mark_missing, presence_from_nan
from tests.code.synthetic import write_synthetic_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"hidden_dim": 16, "epochs": 6, "batch_size": 32, "patience": 6, "warmup_epochs": 1, "lr": 3e-3}


def drop_modalities_in_data(features: Path, share: float = 0.2, seed: int = 0) -> None:
    """Make `share` of each split's rows text-only and as many image-only (zeros + has_<m> = 0)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test", "augmented"):
        arrays, index = load_features(features, split)
        n = len(index)
        order = rng.permutation(n)
        k = int(share * n)
        index["has_image"], index["has_text"] = 1, 1
        index.loc[order[:k], "has_image"] = 0
        index.loc[order[k : 2 * k], "has_text"] = 0
        for m in arrays:
            arrays[m][index[f"has_{m}"].to_numpy() == 0] = 0.0
        save_features(features, split, arrays, index)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("partial")
    write_synthetic_features(root / "features", per_class={"train": 25, "val": 10, "test": 10, "augmented": 0})
    drop_modalities_in_data(root / "features")
    return root


def test_the_head_sees_the_data_mask_not_zeros(root):
    train = load_split(root / "features", "train", [f"class_{i}" for i in range(4)])
    assert not train.complete
    head = create_head("concat", dims=train.dims, num_classes=4, hidden_dim=8)
    seen = {}
    head.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], present=args[1] if len(args) > 1 else None))
    marked = mark_missing(train)
    with presence_from_nan(head):
        all_on = torch.ones(len(train), 2, dtype=torch.bool)
        head({m: a for m, a in marked.x.items()}, all_on)
    assert torch.equal(seen["present"], train.presence(head.modalities))
    assert all(torch.isfinite(a).all() for a in seen["x"].values())
    # a row whose only modality was hidden (modality dropout) gets it back
    with presence_from_nan(head):
        only_image = torch.tensor([[True, False]] * len(train))
        head({m: a for m, a in marked.x.items()}, only_image)
    assert seen["present"].any(dim=1).all()
    head({m: a for m, a in train.x.items()})  # the hook is gone: no NaN anywhere, all present
    assert seen["present"] is None or seen["present"].all()


def test_train_and_evaluate_report_accuracy_per_presence_pattern(root):
    params = parse_params(
        {"train": {**FAST, "strategies": ["text_only", "concat"]},
         "evaluate": {"raw_check": 0, "explain_rows": 0, "faithfulness_rows": 0, "bootstrap": 100}}
    )  # fmt: skip
    train_stage.run(params, root)
    evaluate_stage.run(params, root)
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    _, index = load_features(root / "features", "test")
    want = {
        "image+text": int(((index["has_image"] == 1) & (index["has_text"] == 1)).sum()),
        "image_only": int((index["has_text"] == 0).sum()),
        "text_only": int((index["has_image"] == 0).sum()),
    }
    for name, entry in metrics["strategies"].items():
        by = entry["test"]["by_presence"]
        assert {k: v["n"] for k, v in by.items()} == want, name
        assert all(0.0 <= v["accuracy"] <= 1.0 for v in by.values())
    assert metrics["strategies"]["concat"]["test"]["accuracy"] > 0.5  # chance is 0.25
    assert "image_only" in (root / "reports/evaluate/leaderboard.md").read_text()

"""Cross-validated selection on small data, out-of-fold stacking, and the `ensemble` strategy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfusion.config import parse_params
from mmfusion.stages import evaluate as evaluate_stage
from mmfusion.stages import train as train_stage
from mmfusion.inference.checkpoint import load_checkpoint
from mmfusion.training.crossval import make_folds
from mmfusion.training.data import load_split
from mmfusion.training.ensemble_selection import crossfit_probs, greedy_selection
from mmfusion.training.loop import predict_logits
from tests.code.synthetic import write_synthetic_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"hidden_dim": 16, "epochs": 6, "batch_size": 32, "patience": 6, "warmup_epochs": 1, "lr": 3e-3}
LABELS = [f"class_{i}" for i in range(4)]


def test_greedy_selection_prefers_the_model_that_helps_and_crossfits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    good = np.eye(3)[y] * 0.6 + 0.4 / 3
    noise = rng.dirichlet(np.ones(3), 60)
    weights = greedy_selection({"noise": noise, "good": good}, y, "accuracy", size=10)
    assert weights["good"] >= 9 and sum(weights.values()) == 10
    folds = [np.arange(i, 60, 3) for i in range(3)]
    assert (crossfit_probs({"noise": noise, "good": good}, y, folds, "accuracy").argmax(1) == y).mean() == 1.0


def test_folds_are_grouped_and_stratified(tmp_path):
    write_synthetic_features(tmp_path / "features", per_class={"train": 12, "val": 4, "test": 2, "augmented": 0})
    data = load_split(tmp_path / "features", "train", LABELS)
    data.groups = [f"g{i // 2}" for i in range(len(data))]  # pairs of rows share a group
    folds = make_folds(data, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(data)))
    fold_of = {g: k for k, held in enumerate(folds) for g in np.asarray(data.groups)[held]}
    assert all(fold_of[g] == k for k, held in enumerate(folds) for g in np.asarray(data.groups)[held])
    for held in folds:  # every class in every fold
        assert set(data.y[held].tolist()) == set(range(4))
    with pytest.raises(ValueError, match="at least 50 groups"):
        make_folds(data, 50, seed=0)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cv")
    write_synthetic_features(root / "features", per_class={"train": 20, "val": 8, "test": 10, "augmented": 0})
    params = parse_params(
        {"train": {**FAST, "strategies": ["image_only", "text_only", "late_stacking", "ensemble"]},
         "evaluate": {"raw_check": 0, "explain_rows": 0, "faithfulness_rows": 0, "bootstrap": 100, "cv_folds": 3}}
    )  # fmt: skip
    train_stage.run(params, root)
    evaluate_stage.run(params, root)
    return root


def test_small_data_is_selected_by_cross_validation(evaluated):
    metrics = json.loads((evaluated / "reports/evaluate/metrics.json").read_text())
    assert metrics["selection"] == "cv"  # 112 train+val rows < evaluate.cv_max_rows
    s = metrics["strategies"]
    for name, entry in s.items():
        assert entry["cv"]["folds"] == 3 and len(entry["cv"]["fold_scores"]) == 3
        assert entry["cv"]["mean"] == pytest.approx(np.mean(entry["cv"]["fold_scores"]), abs=1e-3)
    assert metrics["winner"] == max(s, key=lambda n: s[n]["cv"]["mean"])
    # the synthetic classes need both modalities: fused strategies beat every baseline under CV too
    assert s[metrics["winner"]]["cv"]["mean"] > max(s["image_only"]["cv"]["mean"], s["text_only"]["cv"]["mean"])
    assert "heldout" in metrics["winner_vs_best_unimodal"]
    assert "CV macro_f1 mean ± sd" in (evaluated / "reports/evaluate/leaderboard.md").read_text()


def test_the_served_model_is_the_refit_bag_and_reproduces_the_reported_test_scores(evaluated):
    metrics = json.loads((evaluated / "reports/evaluate/metrics.json").read_text())
    best = evaluated / "models/best"
    head, config = load_checkpoint(best)  # the path Predictor.from_dir takes
    assert config["strategy"] == metrics["winner"] and config["selection"]["mode"] == "cv"
    assert head.name == "ensemble" and len(head.members) >= 1
    # each input's preprocessing survives selection: serving reads it from here, never from params
    assert config["inputs"] == {"image": {"background": [255, 255, 255]}, "text": {"lowercase": True}}
    test = load_split(evaluated / "features", "test", LABELS)
    acc = (predict_logits(head, test).argmax(1) == test.y.numpy()).mean()
    assert acc == pytest.approx(metrics["strategies"][metrics["winner"]]["test"]["accuracy"], abs=1e-6)
    if metrics["winner"] == "ensemble":
        assert json.loads((best / "members.json").read_text())["members"] == config["members"]
    # a bag is served at temperature 1 (a temperature from single fold models over-softens it)
    calibration = json.loads((best / "calibration.json").read_text())
    assert calibration["temperature"] == 1.0 and calibration["fitted_on"].startswith("none")
    assert all(s["temperature"] == 1.0 for s in metrics["strategies"].values())


def test_ensemble_records_its_members_and_loads_through_the_checkpoint(evaluated, tmp_path):
    from mmfusion.stages.evaluate import load_candidates
    from mmfusion.inference.checkpoint import save_checkpoint

    params = parse_params({"train": {**FAST, "strategies": ["image_only", "text_only", "late_stacking", "ensemble"]},
                           "evaluate": {"selection": "holdout"}})  # fmt: skip
    mode, candidates, _, test, _ = load_candidates(params, evaluated)
    ens = candidates[-1]
    assert mode == "holdout" and ens.evaluation.name == "ensemble" and ens.evaluation.cv is None
    assert all(c.evaluation.temperature != 1.0 for c in candidates)  # holdout: fitted on val, for every strategy
    assert set(ens.members) <= {"image_only", "text_only", "late_stacking"}
    assert sum(ens.members.values()) == pytest.approx(1.0, abs=1e-3)
    assert set(ens.config["inputs"]) == {"image", "text"} and all(c.config.get("inputs") for c in candidates)
    save_checkpoint(tmp_path / "m", ens.head, ens.config)
    head, _ = load_checkpoint(tmp_path / "m")
    with torch.no_grad():
        assert np.allclose(predict_logits(head, test), ens.evaluation.test_logits, atol=1e-5)


def test_predictor_serves_the_bag_from_models_best(evaluated):
    from types import SimpleNamespace

    from mmfusion.inference.predictor import Predictor

    config = json.loads((evaluated / "models/best/config.json").read_text())
    encoders = {m: SimpleNamespace(fingerprint=e["fingerprint"]) for m, e in config["encoders"].items()}
    predictor = Predictor.from_dir(evaluated / "models/best", device="cpu", encoders=encoders)
    test = load_split(evaluated / "features", "test", LABELS)
    out = predictor.predict_embeddings({m: a.numpy() for m, a in test.x.items()})
    metrics = json.loads((evaluated / "reports/evaluate/metrics.json").read_text())
    acc = np.mean([r["label"] == LABELS[y] for r, y in zip(out, test.y.tolist())])
    assert acc == pytest.approx(metrics["strategies"][metrics["winner"]]["test"]["accuracy"], abs=1e-6)
    assert all(abs(sum(r["contributions"].values()) - 1) < 1e-5 for r in out)

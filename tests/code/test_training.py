"""Train loop, train/evaluate stages and the model folder, on a tiny synthetic features/ folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmfusion.config import parse_params
from mmfusion.fusion import create_head
from mmfusion.stages import evaluate as evaluate_stage
from mmfusion.stages import train as train_stage
from mmfusion.training.data import load_training_data
from mmfusion.training.loop import drop_modalities, seed_everything, train_head
from tests.code.synthetic import write_synthetic_features


pytestmark = pytest.mark.usefixtures("one_torch_thread")


FAST = {"hidden_dim": 16, "epochs": 6, "batch_size": 32, "patience": 6, "warmup_epochs": 1, "lr": 3e-3}


def _params(train=None, evaluate=None):
    return parse_params(
        {"train": {**FAST, **(train or {})},
         "evaluate": {"raw_check": 0, "explain_rows": 0, "faithfulness_rows": 0, "bootstrap": 200,
                      "selection": "holdout", **(evaluate or {})}}
    )


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_synthetic_features(
        tmp_path_factory.mktemp("features") / "features",
        per_class={"train": 25, "val": 10, "test": 10, "augmented": 10},
    )


def test_training_lowers_the_loss_and_fits_a_separable_fixture(features):
    train, val, labels = load_training_data(features)
    assert len(train) == 4 * 25 + 4 * 10  # augmented views are used
    seed_everything(0)
    head = create_head("concat", train.dims, len(labels), hidden_dim=16)
    result = train_head(head, train, val, _params(train={"epochs": 15, "patience": 15}).train, torch.device("cpu"))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.5
    assert result.best_val_macro_f1 > 0.9
    assert result.best_epoch == max(result.history, key=lambda h: h["val_macro_f1"])["epoch"]


def test_same_seed_same_weights(features):
    train, val, labels = load_training_data(features)
    p = _params().train
    states = []
    for _ in range(2):
        seed_everything(p.seed)
        head = create_head("gated", train.dims, len(labels), hidden_dim=16)
        states.append(train_head(head, train, val, p, torch.device("cpu")).state_dict)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_modality_dropout_never_empties_a_row():
    g = torch.Generator().manual_seed(0)
    present = torch.ones(1000, 2, dtype=torch.bool)
    present[:100, 0] = False
    out = drop_modalities(present, 0.5, g)
    assert out.any(dim=1).all()
    assert (out[:100] == present[:100]).all()  # a row with one modality keeps it
    assert 0.35 < (~out[100:]).any(dim=1).float().mean() < 0.65


def _root_with(features: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root).mkdir()
    (root / "features").symlink_to(features)
    return root


def test_train_and_evaluate_stages_write_the_documented_outputs(features, tmp_path):
    root = _root_with(features, tmp_path)
    params = _params()
    summary = train_stage.run(params, root)
    assert set(summary["strategies"]) == set(params.train.strategies)
    for name in params.train.strategies:
        folder = root / "models/strategies" / name
        config = json.loads((folder / "config.json").read_text())
        assert config["strategy"] == name and config["labels"] == [f"class_{i}" for i in range(4)]
        assert config["encoders"]["image"]["fingerprint"] == "synthetic-image-0"
        assert config["inputs"] == {"image": {"background": [255, 255, 255]}, "text": {"lowercase": True}}
        assert (folder / "model.safetensors").exists() and (folder / "curves.png").stat().st_size > 1000
        assert len(json.loads((folder / "history.json").read_text())) >= 1

    mix = {"rows": 40, "groups": 40, "largest_group": "g1", "largest_group_share": 0.025}
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports/split.json").write_text(json.dumps({"group_mix": {"test": mix}}))  # the split stage's report
    result = evaluate_stage.run(params, root)
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    assert metrics["winner"] == result["winner"] and metrics["selection_metric"] == "macro_f1"
    assert set(metrics["strategies"]) == set(params.train.strategies)
    keys = {"accuracy", "macro_f1", "auroc", "ece", "ece_calibrated"}
    for name, entry in metrics["strategies"].items():
        assert keys <= set(entry["val"]) and keys <= set(entry["test"])
        if name.endswith("_only"):
            continue
        assert set(entry["ablation"]) == {"without_image", "without_text"}
        assert keys <= set(entry["ablation"]["without_text"])
    winner = metrics["strategies"][metrics["winner"]]
    assert winner["val"]["macro_f1"] == max(e["val"]["macro_f1"] for e in metrics["strategies"].values())
    # the synthetic fixture needs both modalities: fusion must beat every baseline
    assert not winner["unimodal"]
    assert metrics["winner_vs_best_unimodal"]["diff"] > 0.1
    leaderboard = (root / "reports/evaluate/leaderboard.md").read_text()
    assert leaderboard.count("\n|") >= len(params.train.strategies) + 1
    assert "| test | 40 | 40 | g1 | 2.5% |" in leaderboard
    for png in ("leaderboard.png", "reliability.png", f"confusion_{metrics['winner']}.png"):
        assert (root / "reports/evaluate/plots" / png).stat().st_size > 1000
    # explanations and the faithfulness check are off here (no raw files), but their DVC outs are written, saying so
    assert json.loads((root / "reports/evaluate/faithfulness.json").read_text())["passed"] is None
    assert (root / "reports/evaluate/faithfulness.png").exists()
    assert "evaluate.explain_rows is 0" in (root / "reports/evaluate/explanations/index.html").read_text()
    best = root / "models/best"
    assert json.loads((best / "config.json").read_text())["strategy"] == metrics["winner"]
    assert json.loads((best / "calibration.json").read_text())["temperature"] > 0
    assert json.loads((best / "metrics.json").read_text())["test"]["accuracy"] == winner["test"]["accuracy"]


def test_unknown_strategy_fails_before_training(features, tmp_path):
    root = _root_with(features, tmp_path)
    with pytest.raises(ValueError, match="unknown strategy 'concatt'"):
        train_stage.run(_params(train={"strategies": ["concatt"]}), root)
    assert not (root / "models").exists()


def test_selection_metric_is_validated(features, tmp_path):
    root = _root_with(features, tmp_path)
    train_stage.run(_params(train={"strategies": ["concat"]}), root)
    with pytest.raises(ValueError, match="selection_metric"):
        evaluate_stage.run(_params(train={"strategies": ["concat"]}, evaluate={"selection_metric": "ece"}), root)


def test_leaderboard_has_one_ablation_column_per_modality():
    from mmfusion.stages.evaluate import leaderboard_markdown

    block = {"accuracy": 0.5, "macro_f1": 0.4, "auroc": 0.6, "ece": 0.1, "ece_calibrated": 0.05}
    row = {"strategy": "concat", "val": block, "test": block, "test_accuracy_ci": {"low": 0.4, "high": 0.6},
           "ablation": {f"without_{m}": block for m in ("image", "text", "audio")}}
    header, rule, line = leaderboard_markdown([row], "concat", "macro_f1").splitlines()[2:5]
    assert header.endswith("| acc w/o image | acc w/o text | acc w/o audio |")
    assert rule.count("---") == header.count("|") - 1 == line.count("|") - 1
    assert line.startswith("| **concat** | 0.400 | 0.500 | 0.500 [0.400, 0.600] |")
    assert line.endswith("| 0.500 | 0.500 | 0.500 |")


def test_leaderboard_shows_the_splits_group_mix_and_its_warning():
    from mmfusion.stages.evaluate import leaderboard_markdown

    block = {"accuracy": 0.5, "macro_f1": 0.4, "auroc": 0.6, "ece": 0.1, "ece_calibrated": 0.05}
    row = {"strategy": "concat", "val": block, "test": block, "test_accuracy_ci": {"low": 0.4, "high": 0.6},
           "ablation": {}}
    mix = {name: {"rows": 100, "groups": 9, "largest_group": f"{name}-author", "largest_group_share": 0.1234}
           for name in ("train", "val", "test")}  # fmt: skip
    warning = "48% of test (100 rows) is one group, 'ann'"
    text = leaderboard_markdown([row], "concat", "macro_f1", {"group_mix": mix, "group_check": {"warnings": [warning]}})
    assert "| test | 100 | 9 | test-author | 12.3% |" in text.splitlines()
    assert f"**Warning:** {warning}" in text
    plain = leaderboard_markdown([row], "concat", "macro_f1")
    assert plain == leaderboard_markdown([row], "concat", "macro_f1", {"sizes": {}})  # an older split.json
    assert "Group mix" not in plain and text.startswith(plain.rstrip("\n"))

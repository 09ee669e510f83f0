"""Metrics agree with scikit-learn; ECE, temperature scaling and bootstrap behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

from mmfusion.training.metrics import (
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    macro_auroc,
    macro_f1,
    paired_bootstrap,
    softmax,
)

LABELS = ["a", "b", "c", "d"]


@pytest.fixture
def sample():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, size=60)
    logits = rng.normal(size=(60, 4)) + np.eye(4)[y] * 1.5
    return y, logits


def test_accuracy_f1_per_class_match_sklearn(sample):
    y, logits = sample
    m = classification_metrics(logits, y, LABELS)
    pred = logits.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    for i, label in enumerate(LABELS):
        assert m["per_class"][label]["precision"] == pytest.approx(p[i])
        assert m["per_class"][label]["recall"] == pytest.approx(r[i])
        assert m["per_class"][label]["f1"] == pytest.approx(f[i])
        assert m["per_class"][label]["support"] == s[i]


def test_macro_f1_with_a_never_predicted_class_matches_sklearn():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 1, 1])  # class 2 never predicted, class 3 absent everywhere
    assert macro_f1(y, pred, 4) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_auroc_matches_sklearn_including_ties(sample):
    y, logits = sample
    probs = softmax(np.round(logits, 1))  # rounding creates tied scores
    assert macro_auroc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_ece_by_hand():
    # two samples in the 0.9 bin (one right), two in the 0.6 bin (both right)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, y, bins=15) == pytest.approx(expected)


def test_temperature_scaling_lowers_ece_on_an_overconfident_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=2000)
    calibrated = rng.normal(size=(2000, 5)) + np.eye(5)[y] * 1.0
    overconfident = calibrated * 6.0  # same ranking, far too sharp
    before = expected_calibration_error(softmax(overconfident), y)
    t = fit_temperature(overconfident, y)
    after = expected_calibration_error(softmax(overconfident, t), y)
    assert t > 3.0
    assert after < before / 3
    m = classification_metrics(overconfident, y, list("abcde"), temperature=t)
    assert m["ece_calibrated"] == pytest.approx(after) and m["ece"] == pytest.approx(before)
    assert m["accuracy"] == pytest.approx(float((overconfident.argmax(1) == y).mean()))  # T never changes argmax


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    correct = np.r_[np.ones(80), np.zeros(20)]
    ci = bootstrap_ci(correct, resamples=500, seed=1)
    assert ci["low"] < 0.8 < ci["high"] and ci["mean"] == pytest.approx(0.8)
    assert 0.05 < ci["high"] - ci["low"] < 0.25
    assert bootstrap_ci(correct, resamples=500, seed=1) == ci


def test_paired_bootstrap_detects_a_clear_difference():
    better = np.r_[np.ones(90), np.zeros(10)]
    worse = np.r_[np.ones(60), np.zeros(40)]
    out = paired_bootstrap(better, worse, resamples=500, seed=0)
    assert out["diff"] == pytest.approx(0.3)
    assert out["low"] > 0 and out["p_value"] < 0.01
    same = paired_bootstrap(better, better, resamples=200, seed=0)
    assert same["diff"] == 0 and same["p_value"] == 1.0

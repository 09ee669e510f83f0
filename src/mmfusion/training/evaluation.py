"""Evaluate trained strategies on val and test: metrics, calibration, modality ablation, selection on val."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mmfusion.config import EvaluateParams
from mmfusion.errors import UserError
from mmfusion.fusion import FusionHead
from mmfusion.modalities.base import presence_pattern
from mmfusion.training.data import FeatureSet
from mmfusion.training.loop import predict_logits
from mmfusion.training.metrics import bootstrap_ci, classification_metrics, fit_temperature

SELECTION_METRICS = ("accuracy", "macro_f1", "auroc")
SUMMARY_KEYS = ("accuracy", "macro_f1", "auroc", "ece", "ece_calibrated", "nll", "nll_calibrated", "by_presence")


@dataclass
class StrategyEvaluation:
    """Everything evaluate knows about one strategy: JSON-able metrics plus the raw logits for plots/bootstrap."""

    name: str
    unimodal: bool
    temperature: float
    val: dict
    test: dict
    ablation: dict = field(default_factory=dict)
    test_logits: np.ndarray | None = None
    val_logits: np.ndarray | None = None
    cv: dict | None = None  # cross-validation: {"folds", "metric", "mean", "std", "fold_scores", ...}

    def summary(self) -> dict:
        """The metrics.json entry: summary keys only (per-class scores go to per_class.json)."""
        pick = lambda d: {k: d[k] for k in SUMMARY_KEYS if k in d}  # noqa: E731
        return {
            "val": pick(self.val),
            "test": pick(self.test),
            "ablation": {k: pick(v) for k, v in self.ablation.items()},
            "temperature": self.temperature,
            "unimodal": self.unimodal,
            **({"cv": self.cv} if self.cv else {}),
        }

    def selection_score(self, metric: str) -> float:
        """The CV mean of `metric` under cross-validation, else its val value."""
        return self.cv["mean"] if self.cv else self.val[metric]


def hide(n: int, modalities: tuple[str, ...], missing: str | None, present: torch.Tensor | None = None) -> torch.Tensor:
    """A `[n, M]` presence mask with `missing` hidden everywhere (None: as given; `present` default: all)."""
    mask = torch.ones(n, len(modalities), dtype=torch.bool) if present is None else present.clone()
    if missing is not None:
        mask[:, modalities.index(missing)] = False
    return mask


def presence_pattern_names(present: torch.Tensor, modalities: tuple[str, ...]) -> list[str]:
    """Each row's presence pattern (`mmfusion.modalities.base.presence_pattern`) from a presence mask."""
    return [presence_pattern([m for m, h in zip(modalities, row) if h], modalities) for row in present.tolist()]


def accuracy_by_presence(logits: np.ndarray, y: np.ndarray, present: torch.Tensor, modalities: tuple[str, ...]) -> dict:
    """{pattern: {"n", "accuracy"}} over the rows of each presence pattern in the data."""
    names = np.array(presence_pattern_names(present, modalities))
    correct = logits.argmax(axis=1) == y
    return {
        name: {"n": int((names == name).sum()), "accuracy": float(correct[names == name].mean())}
        for name in sorted(set(names.tolist()))
    }


def score_on_test(
    head: FusionHead, test: FeatureSet, labels: list[str], temperature: float, p: EvaluateParams
) -> tuple[dict, dict, np.ndarray]:
    """(test metrics with accuracy per presence pattern, ablation metrics, test logits) for a head."""
    test_present = test.presence(head.modalities)
    test_logits = predict_logits(head, test, present=test_present)
    y = test.y.numpy()
    metrics = lambda logits: classification_metrics(logits, y, labels, temperature, p.ece_bins)  # noqa: E731
    ablation = {}
    if len(head.modalities) > 1:
        for m in head.modalities:
            logits = predict_logits(head, test, present=hide(len(test), head.modalities, m, test_present))
            ablation[f"without_{m}"] = metrics(logits)
    test_metrics = metrics(test_logits)
    test_metrics["by_presence"] = accuracy_by_presence(test_logits, y, test.presence(), tuple(test.x))
    return test_metrics, ablation, test_logits


def evaluate_head(
    name: str, head: FusionHead, val: FeatureSet, test: FeatureSet, labels: list[str], p: EvaluateParams
) -> StrategyEvaluation:
    """Metrics on val and test (temperature fitted on val), and test metrics with each modality hidden."""
    val_logits = predict_logits(head, val, present=val.presence(head.modalities))
    return evaluate_from_logits(name, head, val_logits, val.y.numpy(), test, labels, p)


def evaluate_from_logits(
    name: str,
    head: FusionHead,
    val_logits: np.ndarray,
    y_val: np.ndarray,
    test: FeatureSet,
    labels: list[str],
    p: EvaluateParams,
    cv: dict | None = None,
    calibrate: bool = True,
    temperature: float | None = None,
) -> StrategyEvaluation:
    """As `evaluate_head`, from held-out logits already at hand (val, or out-of-fold under cross-validation).

    `calibrate=False` keeps temperature 1: for a bag of fold models, whose held-out logits come
    from single fold models (see `selection.BAG_TEMPERATURE`). `temperature`, when given, is the one fitted
    elsewhere (a tuned strategy's served model, on its own val logits)."""
    if temperature is None:
        temperature = fit_temperature(val_logits, y_val) if calibrate else 1.0
    test_metrics, ablation, test_logits = score_on_test(head, test, labels, temperature, p)
    return StrategyEvaluation(
        name=name,
        unimodal=bool(head.unimodal),
        temperature=temperature,
        val=classification_metrics(val_logits, y_val, labels, temperature, p.ece_bins),
        test=test_metrics,
        ablation=ablation,
        test_logits=test_logits,
        val_logits=val_logits,
        cv=cv,
    )


def select_winner(results: list[StrategyEvaluation], metric: str) -> StrategyEvaluation:
    """Highest val `metric` (CV mean under cross-validation); ties go to the earlier strategy. Test is never looked at."""
    if metric not in SELECTION_METRICS:
        raise UserError(f"evaluate.selection_metric must be one of {', '.join(SELECTION_METRICS)}, got {metric!r}")
    if not results:
        raise UserError("no trained strategies to evaluate (run the train stage)")
    best = results[0]
    for r in results[1:]:
        if r.selection_score(metric) > best.selection_score(metric):
            best = r
    return best


def correct_vector(result: StrategyEvaluation, y: np.ndarray) -> np.ndarray:
    return (result.test_logits.argmax(axis=1) == y).astype(np.float64)


def accuracy_interval(result: StrategyEvaluation, y: np.ndarray, p: EvaluateParams) -> dict:
    return bootstrap_ci(correct_vector(result, y), p.bootstrap, p.seed)

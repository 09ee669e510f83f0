"""Evaluate trained strategies on val and test: metrics, calibration, modality ablation, selection on val."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mmfusion.config import EvaluateParams
from mmfusion.errors import UserError
from mmfusion.fusion import FusionHead
from mmfusion.training.data import FeatureSet
from mmfusion.training.loop import predict_logits
from mmfusion.training.metrics import bootstrap_ci, classification_metrics, fit_temperature

SELECTION_METRICS = ("accuracy", "macro_f1", "auroc")
SUMMARY_KEYS = ("accuracy", "macro_f1", "auroc", "ece", "ece_calibrated", "nll", "nll_calibrated")


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

    def summary(self) -> dict:
        """The metrics.json entry: summary keys only (per-class scores go to per_class.json)."""
        pick = lambda d: {k: d[k] for k in SUMMARY_KEYS if k in d}  # noqa: E731
        return {
            "val": pick(self.val),
            "test": pick(self.test),
            "ablation": {k: pick(v) for k, v in self.ablation.items()},
            "temperature": self.temperature,
            "unimodal": self.unimodal,
        }


def hide(n: int, modalities: tuple[str, ...], missing: str | None) -> torch.Tensor:
    """A `[n, M]` presence mask with `missing` hidden everywhere (None: all present)."""
    mask = torch.ones(n, len(modalities), dtype=torch.bool)
    if missing is not None:
        mask[:, modalities.index(missing)] = False
    return mask


def evaluate_head(
    name: str, head: FusionHead, val: FeatureSet, test: FeatureSet, labels: list[str], p: EvaluateParams
) -> StrategyEvaluation:
    """Metrics on val and test (temperature fitted on val), and test metrics with each modality hidden."""
    val_logits = predict_logits(head, val)
    test_logits = predict_logits(head, test)
    temperature = fit_temperature(val_logits, val.y.numpy())
    metrics = lambda logits, y: classification_metrics(logits, y, labels, temperature, p.ece_bins)  # noqa: E731
    ablation = {}
    if len(head.modalities) > 1:
        for m in head.modalities:
            logits = predict_logits(head, test, present=hide(len(test), head.modalities, m))
            ablation[f"without_{m}"] = metrics(logits, test.y.numpy())
    return StrategyEvaluation(
        name=name,
        unimodal=bool(head.unimodal),
        temperature=temperature,
        val=metrics(val_logits, val.y.numpy()),
        test=metrics(test_logits, test.y.numpy()),
        ablation=ablation,
        test_logits=test_logits,
        val_logits=val_logits,
    )


def select_winner(results: list[StrategyEvaluation], metric: str) -> StrategyEvaluation:
    """Highest val `metric`; ties go to the earlier strategy in params order. Test is never looked at."""
    if metric not in SELECTION_METRICS:
        raise UserError(f"evaluate.selection_metric must be one of {', '.join(SELECTION_METRICS)}, got {metric!r}")
    if not results:
        raise UserError("no trained strategies to evaluate (run the train stage)")
    best = results[0]
    for r in results[1:]:
        if r.val[metric] > best.val[metric]:
            best = r
    return best


def correct_vector(result: StrategyEvaluation, y: np.ndarray) -> np.ndarray:
    return (result.test_logits.argmax(axis=1) == y).astype(np.float64)


def accuracy_interval(result: StrategyEvaluation, y: np.ndarray, p: EvaluateParams) -> dict:
    return bootstrap_ci(correct_vector(result, y), p.bootstrap, p.seed)

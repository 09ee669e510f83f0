"""Greedy ensemble selection (Caruana et al., 2004) over predicted probabilities.

Start from nothing, add (with replacement) the model whose inclusion most improves the
selection metric of the averaged probabilities, `size` times; ties go to the lower NLL, then
to the earlier model. The weights are the counts. `crossfit_scores` scores the procedure
honestly: weights chosen without fold k are scored on fold k.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from mmfusion.training.metrics import macro_auroc, macro_f1


def score(probs: np.ndarray, y: np.ndarray, metric: str) -> float:
    """accuracy | macro_f1 | auroc of probabilities `probs` [N, C] against labels `y`."""
    if metric == "accuracy":
        return float((probs.argmax(axis=1) == y).mean())
    if metric == "macro_f1":
        return macro_f1(y, probs.argmax(axis=1), probs.shape[1])
    if metric == "auroc":
        return macro_auroc(y, probs)
    raise ValueError(f"unknown metric {metric!r}")


def _nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


def greedy_selection(probs: dict[str, np.ndarray], y: np.ndarray, metric: str, size: int = 25) -> dict[str, int]:
    """{model: times selected} (only models selected at least once), in `probs` order."""
    if not probs:
        raise ValueError("ensemble selection needs at least one model")
    names = list(probs)
    total = np.zeros_like(next(iter(probs.values())), dtype=np.float64)
    counts: Counter[str] = Counter()
    for step in range(1, size + 1):
        best, best_key = None, None
        for name in names:
            candidate = (total + probs[name]) / step
            key = (score(candidate, y, metric), -_nll(candidate, y))
            if best_key is None or key > best_key:
                best, best_key = name, key
        counts[best] += 1
        total += probs[best]
    return {n: counts[n] for n in names if counts[n]}


def blend(probs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The weighted average of the models' probabilities."""
    total = sum(weights.values())
    return sum(probs[n] * (w / total) for n, w in weights.items())


def crossfit_probs(
    probs: dict[str, np.ndarray], y: np.ndarray, folds: list[np.ndarray], metric: str, size: int = 25
) -> np.ndarray:
    """Ensemble probabilities for every row, each from weights selected on the other folds' rows."""
    out = np.zeros_like(next(iter(probs.values())), dtype=np.float64)
    n = len(y)
    for held in folds:
        rest = np.setdiff1d(np.arange(n), held)
        weights = greedy_selection({k: v[rest] for k, v in probs.items()}, y[rest], metric, size)
        out[held] = blend({k: v[held] for k, v in probs.items()}, weights)
    return out

"""Classification metrics, calibration and bootstrap intervals, in plain numpy (checked against scikit-learn)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits / temperature`."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """`[true, predicted]` counts."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y), np.asarray(pred)), 1)
    return cm


def per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class (0 where undefined, as scikit-learn's zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean F1 over the classes that occur in `y` or `pred` (scikit-learn's label set)."""
    cm = confusion_matrix(y, pred, num_classes)
    seen = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(per_class_scores(cm)[2][seen].mean()) if seen.any() else 0.0


def _binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC with tied scores counted half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    n_pos = positive.sum()
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over classes that have both positives and negatives in `y`."""
    y = np.asarray(y)
    values = []
    for c in range(probs.shape[1]):
        positive = y == c
        if 0 < positive.sum() < len(y):
            values.append(_binary_auroc(probs[:, c], positive))
    return float(np.mean(values)) if values else float("nan")


def _confidence_bins(probs: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, correct as 0/1, bin index per row, bin edges) over `bins` equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return conf, correct, which, edges


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - confidence| weighted by the bin's share."""
    conf, correct, which, _ = _confidence_bins(probs, y, bins)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin confidence, accuracy and count (for the reliability diagram)."""
    conf, correct, which, edges = _confidence_bins(probs, y, bins)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": [], "center": []}
    for b in range(bins):
        mask = which == b
        out["center"].append(float((edges[b] + edges[b + 1]) / 2))
        out["count"].append(int(mask.sum()))
        out["confidence"].append(float(conf[mask].mean()) if mask.any() else 0.0)
        out["accuracy"].append(float(correct[mask].mean()) if mask.any() else 0.0)
    return out


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), np.asarray(y)], 1e-12, None))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising validation NLL of softmax(logits / T)."""
    result = minimize_scalar(
        lambda log_t: nll(softmax(logits, float(np.exp(log_t))), y), bounds=(np.log(0.05), np.log(20.0)), method="bounded"
    )
    return float(np.exp(result.x))


def classification_metrics(
    logits: np.ndarray, y: np.ndarray, labels: list[str], temperature: float = 1.0, bins: int = 15
) -> dict:
    """accuracy, macro_f1, auroc, ece (T=1), ece_calibrated (at `temperature`), nll and per-class scores."""
    y = np.asarray(y)
    probs = softmax(logits)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, len(labels))
    precision, recall, f1 = per_class_scores(cm)
    calibrated = softmax(logits, temperature)
    return {
        "accuracy": float((pred == y).mean()),
        "macro_f1": macro_f1(y, pred, len(labels)),
        "auroc": macro_auroc(y, probs),
        "ece": expected_calibration_error(probs, y, bins),
        "ece_calibrated": expected_calibration_error(calibrated, y, bins),
        "nll": nll(probs, y),
        "nll_calibrated": nll(calibrated, y),
        "n": int(len(y)),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(cm[i].sum()),
            }
            for i, label in enumerate(labels)
        },
    }


def bootstrap_ci(correct: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of the mean of a 0/1 `correct` vector (e.g. test accuracy)."""
    correct = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(resamples, len(correct)))
    means = correct[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return {
        "mean": float(correct.mean()),
        "low": float(np.quantile(means, alpha)),
        "high": float(np.quantile(means, 1 - alpha)),
    }


def paired_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Bootstrap of accuracy(a) - accuracy(b) on the same resampled rows; p = share of resamples with diff <= 0."""
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired bootstrap needs predictions on the same samples")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return {
        "diff": float(a.mean() - b.mean()),
        "low": float(np.quantile(diffs, alpha)),
        "high": float(np.quantile(diffs, 1 - alpha)),
        "p_value": float((diffs <= 0).mean()),
    }

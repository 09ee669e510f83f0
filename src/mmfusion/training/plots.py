"""PNG plots (they render offline, unlike DVC's vega HTML): curves, confusion matrix, reliability, leaderboard."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(history: list[dict], path: Path, title: str = "") -> Path:
    """Train/val loss and val accuracy/macro-F1 per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    ax2.plot(epochs, [h["val_macro_f1"] for h in history], label="val macro-F1")
    ax2.set_xlabel("epoch")
    ax2.legend()
    fig.suptitle(title)
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with counts."""
    n = len(labels)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7 if n > 15 else 8)
    ax.set_yticks(range(n), labels, fontsize=7 if n > 15 else 8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title)
    return _save(fig, path)


def plot_reliability(before: dict, after: dict, path: Path, title: str = "") -> Path:
    """Reliability diagram before and after temperature scaling (bins from metrics.reliability_bins)."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for bins, name in ((before, "T=1"), (after, "temperature-scaled")):
        keep = [i for i, c in enumerate(bins["count"]) if c > 0]
        ax.plot([bins["confidence"][i] for i in keep], [bins["accuracy"][i] for i in keep], "o-", label=name)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title)
    return _save(fig, path)


def plot_leaderboard(rows: list[dict], path: Path, metric: str = "accuracy") -> Path:
    """Test `metric` per strategy with the bootstrap interval of test accuracy, and the ablations."""
    names = [r["strategy"] for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
    full = [r["test"][metric] for r in rows]
    err = None
    if metric == "accuracy" and all("test_accuracy_ci" in r for r in rows):
        err = [[f - r["test_accuracy_ci"]["low"] for f, r in zip(full, rows)], [r["test_accuracy_ci"]["high"] - f for f, r in zip(full, rows)]]
    ax.barh(y, full, xerr=err, color="#4878d0", label="all modalities", height=0.5)
    # one marker per hidden modality, whatever the modalities are (`without_<modality>` keys)
    for key, marker in zip(sorted({k for r in rows for k in r.get("ablation", {})}), itertools.cycle("s^vDPX")):
        xs = [r["ablation"].get(key, {}).get(metric, np.nan) for r in rows]
        ax.scatter(xs, y, marker=marker, zorder=3, label=key.replace("_", " "))
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel(f"test {metric}")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower left", fontsize=7)
    return _save(fig, path)

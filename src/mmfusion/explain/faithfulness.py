"""The faithfulness (deletion) check: do explanations point at the parts the model really uses?

For each explained item, its parts are ranked by attribution and removed in that order: the predicted class's
probability with the top k parts removed should fall faster than with k random parts removed (Samek et al. 2017,
"Evaluating the visualization of what a deep neural network has learned"; RISE's deletion metric). The area under
the probability-vs-removed-fraction curve sums it up: explanations beat random when AUC(top) < AUC(random).

    check = FaithfulnessCheck(predictor, params.package.explain, steps=4, draws=2, seed=0)
    for item in items:
        check.add(item)
    check.summary()  # {fractions, all: {top, random, auc_top, auc_random, ...}, modalities: {...}, passed}

The curves run through `PerturbedModel` (the model as a function of a keep-vector over the parts) of the
explanation itself, so masks the attribution already evaluated come from its embeddings cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmfusion.errors import UserError
from mmfusion.explain import Explainer, ExplainTooCostly, PerturbedModel

# keep-matrix [B, parts] (bool) -> class probabilities [B, classes]
KeepFunction = Callable[[np.ndarray], np.ndarray]


def removal_counts(fractions: Sequence[float], parts: int) -> np.ndarray:
    """How many of `parts` parts each fraction removes (rounded; 0 and 1 remove none and all)."""
    return np.rint(np.asarray(fractions, dtype=np.float64) * parts).astype(int)


def deletion_curves(predict: KeepFunction, attributions: np.ndarray, target: int, fractions: Sequence[float],
                    draws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(top, random): the probability of class `target` with the `k` most-attributed parts removed, and with `k`
    random parts removed (the mean over `draws` random orders), for each k of `removal_counts(fractions)`.

    Each order removes parts cumulatively (the parts gone at 20% are gone at 40% too); ties in the attributions go
    to the earlier part. All masks go to `predict` in one call."""
    attributions = np.asarray(attributions, dtype=np.float64).reshape(-1)
    n = attributions.size
    orders = [np.argsort(-attributions, kind="stable")] + [rng.permutation(n) for _ in range(int(draws))]
    counts = removal_counts(fractions, n)
    masks = np.ones((len(orders), len(counts), n), dtype=bool)
    for o, order in enumerate(orders):
        for f, k in enumerate(counts):
            masks[o, f, order[:k]] = False
    probs = np.asarray(predict(masks.reshape(-1, n)))[:, target].reshape(len(orders), len(counts))
    return probs[0], probs[1:].mean(axis=0) if draws else np.full(len(counts), np.nan)


def area(curve: Sequence[float], fractions: Sequence[float]) -> float:
    """The area under a deletion curve over the removed fraction (trapezoids): lower = probability fell sooner."""
    return float(np.trapezoid(np.asarray(curve, dtype=np.float64), np.asarray(fractions, dtype=np.float64)))


def summarise(top: np.ndarray, random: np.ndarray, fractions: np.ndarray, parts: Sequence[int]) -> dict[str, Any]:
    """Mean curves of rows of per-item curves [items, fractions], their areas and how many items beat random."""
    per_top = [area(c, fractions) for c in top]
    per_random = [area(c, fractions) for c in random]
    auc_top, auc_random = area(top.mean(axis=0), fractions), area(random.mean(axis=0), fractions)
    return {
        "items": int(len(top)),
        "parts_mean": round(float(np.mean(parts)), 2),
        "top": [round(float(v), 5) for v in top.mean(axis=0)],
        "random": [round(float(v), 5) for v in random.mean(axis=0)],
        "auc_top": round(auc_top, 5),
        "auc_random": round(auc_random, 5),
        "difference": round(auc_random - auc_top, 5),  # > 0: the attributions' order removes evidence sooner
        "items_top_below_random": round(float(np.mean(np.less(per_top, per_random))), 4),
    }


def within(predict: KeepFunction, width: int, part: slice) -> KeepFunction:
    """`predict` over the parts of `part` only: every other part kept."""

    def run(keep: np.ndarray) -> np.ndarray:
        full = np.ones((len(keep), width), dtype=bool)
        full[:, part] = keep
        return predict(full)

    return run


def keep_function(model: PerturbedModel) -> KeepFunction:
    import torch

    return lambda keep: model(torch.from_numpy(np.asarray(keep, dtype=np.float32))).numpy()


class FaithfulnessCheck:
    """Deletion curves over a set of items, for all their parts ranked together and for each modality's own parts
    (the other modalities kept whole) where the model has more than one; `summary()` is faithfulness.json."""

    def __init__(self, predictor: Any, settings: Any, steps: int = 5, draws: int = 2, seed: int = 0):
        if int(steps) < 1 or int(draws) < 1:
            raise UserError(f"evaluate.faithfulness_steps and faithfulness_draws: at least 1 each, got {steps} {draws}")
        self.explainer = Explainer(predictor, settings, seed=seed)
        self.modalities = tuple(predictor.inputs)
        self.fractions = np.linspace(0.0, 1.0, int(steps) + 1)
        self.draws = int(draws)
        self.rng = np.random.default_rng(seed)
        self.curves: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[int]]] = {}
        self.too_costly = 0

    def _record(self, key: str, top: np.ndarray, random: np.ndarray, parts: int) -> None:
        tops, randoms, counts = self.curves.setdefault(key, ([], [], []))
        tops.append(top)
        randoms.append(random)
        counts.append(parts)

    def add(self, item: Mapping[str, Any]) -> bool:
        """Explain `item` and record its curves; False (counted) when explaining it is over the cost limit."""
        try:
            model, target, _, attr = self.explainer.attribute(item)  # unrounded: near-certain rows have tiny ones
        except ExplainTooCostly:
            self.too_costly += 1
            return False
        predict = keep_function(model)
        self._record("all", *deletion_curves(predict, attr, target, self.fractions, self.draws, self.rng), model.width)
        if len(self.modalities) > 1:
            for m, part in model.slices.items():
                sub = within(predict, model.width, part)
                curves = deletion_curves(sub, attr[part], target, self.fractions, self.draws, self.rng)
                self._record(m, *curves, part.stop - part.start)
        return True

    def summary(self) -> dict[str, Any]:
        """faithfulness.json: the fractions, the mean curves and areas for all parts and per modality, the verdict."""
        found = {k: summarise(np.array(t), np.array(r), self.fractions, n) for k, (t, r, n) in self.curves.items()}
        overall = found.pop("all", None)
        s = self.explainer.settings
        return {
            # the predicted class's probability as the most-attributed parts are removed (top) vs as many random
            # parts (random, the mean of the draws): the explanations pass when AUC(top) < AUC(random)
            "check": "deletion",
            "method": s.method,
            "items": overall["items"] if overall else 0,
            "skipped_too_costly": self.too_costly,
            "fractions": [round(float(f), 4) for f in self.fractions],
            "random_draws": self.draws,
            "all": overall,
            "modalities": {m: found[m] for m in self.modalities if m in found},
            "passed": bool(overall["auc_top"] < overall["auc_random"]) if overall else None,  # None: no item explained
        }


def plot_deletion(report: dict, path: Path, title: str = "") -> Path:
    """faithfulness.png: the summary's deletion curves, the predicted class's probability as the most-attributed parts
    are removed vs random ones, for all parts and for each modality's own parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not report.get("all"):  # the check is off or explained nothing: the plot says so (it is a DVC out)
        fig, ax = plt.subplots(figsize=(5, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, title or "no deletion curves", ha="center", va="center", fontsize=10)
    else:
        panels = [("all parts", report["all"])] + [(f"{m} parts only", r) for m, r in report["modalities"].items()]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True, squeeze=False)
        x = report["fractions"]
        for ax, (name, r) in zip(axes[0], panels):
            ax.plot(x, r["top"], "o-", color="#c0392b", label=f"top attributed (AUC {r['auc_top']:.3f})")
            ax.plot(x, r["random"], "s--", color="#4878d0", label=f"random (AUC {r['auc_random']:.3f})")
            ax.set(xlabel="fraction of parts removed", xlim=(0, 1), ylim=(0, 1))
            ax.set_title(f"{name} (n={r['items']})", fontsize=9)
            ax.legend(loc="lower left", fontsize=7)
        axes[0][0].set_ylabel("predicted class probability")
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

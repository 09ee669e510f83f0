"""evaluate: every trained strategy on val and test, calibration, ablation, bootstrap; the val winner -> models/best."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

from mmfusion import paths
from mmfusion.config import Params
from mmfusion.data.images import decode_image
from mmfusion.data.manifest import read_manifest
from mmfusion.stages.common import fresh_dir, stage_main, write_json
from mmfusion.training.checkpoint import CALIBRATION, METRICS, load_checkpoint, read_config
from mmfusion.training.data import load_split
from mmfusion.training.evaluation import (
    StrategyEvaluation,
    accuracy_interval,
    correct_vector,
    evaluate_head,
    select_winner,
)
from mmfusion.training.metrics import confusion_matrix, paired_bootstrap, reliability_bins, softmax
from mmfusion.training.plots import plot_confusion, plot_leaderboard, plot_reliability

log = logging.getLogger(__name__)


def strategy_dirs(root: Path, order: tuple[str, ...]) -> list[Path]:
    """Trained strategy folders, in params order (then any others, sorted)."""
    base = root / paths.STRATEGIES
    found = {d.name: d for d in sorted(base.glob("*")) if (d / "config.json").exists()} if base.exists() else {}
    if not found:
        raise FileNotFoundError(f"no trained strategies under {base} (run the train stage)")
    return [found[n] for n in order if n in found] + [d for n, d in found.items() if n not in order]


def leaderboard_markdown(rows: list[dict], winner: str, metric: str) -> str:
    """The leaderboard table: val selection metric, test metrics with the accuracy interval, ablations."""
    lines = [
        f"# Leaderboard (winner picked on val {metric}: **{winner}**)",
        "",
        "| strategy | val macro-F1 | val acc | test acc [95% CI] | test macro-F1 | test AUROC | ECE -> calibrated | "
        "acc w/o image | acc w/o text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = r["test_accuracy_ci"]
        abl = r["ablation"]
        cell = lambda k: f"{abl[k]['accuracy']:.3f}" if k in abl else "-"  # noqa: E731
        name = f"**{r['strategy']}**" if r["strategy"] == winner else r["strategy"]
        lines.append(
            f"| {name} | {r['val']['macro_f1']:.3f} | {r['val']['accuracy']:.3f} | "
            f"{r['test']['accuracy']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] | {r['test']['macro_f1']:.3f} | "
            f"{r['test']['auroc']:.3f} | {r['test']['ece']:.3f} -> {r['test']['ece_calibrated']:.3f} | "
            f"{cell('without_image')} | {cell('without_text')} |"
        )
    patterns = sorted({k for r in rows for k in r["test"].get("by_presence", {})})
    if len(patterns) > 1:  # the data has rows missing a modality: accuracy on each kind of row
        lines += ["", "Test accuracy per presence pattern (rows in the test data):", "",
                  "| strategy | " + " | ".join(f"{k} (n={rows[0]['test']['by_presence'].get(k, {}).get('n', 0)})"
                                               for k in patterns) + " |",
                  "|---|" + "---|" * len(patterns)]
        for r in rows:
            by = r["test"]["by_presence"]
            lines.append(f"| {r['strategy']} | " + " | ".join(
                f"{by[k]['accuracy']:.3f}" if k in by else "-" for k in patterns) + " |")
    return "\n".join(lines) + "\n"


def raw_check(params: Params, root: Path, winner: StrategyEvaluation, labels: list[str]) -> dict:
    """Re-predict some test samples from their raw files through Predictor.from_dir(models/best).

    Agreement with the cached-feature predictions shows that serving (decode, normalise, encode, head)
    matches what training and evaluation saw.
    """
    from mmfusion.serving.predictor import Predictor

    n = params.evaluate.raw_check
    test = read_manifest(root / paths.SPLIT / "test.csv", required=("id", "image", "text", "label"))
    rng = np.random.default_rng(params.evaluate.seed)
    rows = np.sort(rng.choice(len(test), size=min(n, len(test)), replace=False))
    predictor = Predictor.from_dir(root / paths.BEST, device=params.evaluate.device)
    background = tuple(params.clean.background)
    items = [
        {
            "image": decode_image(root / test.iloc[i]["image"], background=background) if test.iloc[i]["image"] else None,
            "text": test.iloc[i]["text"],
        }
        for i in rows
    ]
    results = []
    for start in range(0, len(items), 32):
        results.extend(predictor.predict(items[start : start + 32]))
    raw_pred = [r["label"] for r in results]
    cached_pred = [labels[k] for k in winner.test_logits[rows].argmax(axis=1)]
    truth = list(test.iloc[rows]["label"])
    return {
        "samples": int(len(rows)),
        "agreement_with_cached_features": float(np.mean([a == b for a, b in zip(raw_pred, cached_pred)])),
        "accuracy": float(np.mean([a == b for a, b in zip(raw_pred, truth)])),
        "version": predictor.version,
    }


def run(params: Params, root: Path = Path(".")) -> dict:
    """Evaluate every strategy, pick the winner on val, report test, write reports/evaluate and models/best."""
    p = params.evaluate
    dirs = strategy_dirs(root, params.train.strategies)
    labels = read_config(dirs[0])["labels"]
    val = load_split(root / paths.FEATURES, "val", labels)
    test = load_split(root / paths.FEATURES, "test", labels)
    y_test = test.y.numpy()
    results: list[StrategyEvaluation] = []
    for d in dirs:
        head, config = load_checkpoint(d)
        if config["labels"] != labels:
            raise ValueError(f"{d.name} was trained with a different label map than {dirs[0].name}: re-run train")
        results.append(evaluate_head(d.name, head, val, test, labels, p))
    winner = select_winner(results, p.selection_metric)
    unimodal = [r for r in results if r.unimodal]
    best_unimodal = select_winner(unimodal, p.selection_metric) if unimodal else None

    out = fresh_dir(root / paths.EVALUATION)
    plots = out / "plots"
    rows, strategies, per_class = [], {}, {}
    for r in results:
        entry = r.summary()
        entry["test_accuracy_ci"] = accuracy_interval(r, y_test, p)
        strategies[r.name] = entry
        rows.append({"strategy": r.name, **entry})
        per_class[r.name] = {"val": r.val["per_class"], "test": r.test["per_class"]}
        cm = confusion_matrix(y_test, r.test_logits.argmax(axis=1), len(labels))
        plot_confusion(cm, labels, plots / f"confusion_{r.name}.png", title=f"{r.name}: test")
    comparison = None
    if best_unimodal is not None and best_unimodal is not winner:
        comparison = {
            "winner": winner.name,
            "baseline": best_unimodal.name,
            **paired_bootstrap(correct_vector(winner, y_test), correct_vector(best_unimodal, y_test), p.bootstrap, p.seed),
        }
    before = reliability_bins(softmax(winner.test_logits), y_test, p.ece_bins)
    after = reliability_bins(softmax(winner.test_logits, winner.temperature), y_test, p.ece_bins)
    plot_reliability(before, after, plots / "reliability.png", title=f"{winner.name}: test")
    plot_leaderboard(rows, plots / "leaderboard.png")
    (out / "leaderboard.md").write_text(leaderboard_markdown(rows, winner.name, p.selection_metric))
    write_json(out / "per_class.json", per_class)

    # models/best: the winner's folder + its calibration and metrics, self-contained for Predictor/package.
    best = root / paths.BEST
    if best.exists():
        shutil.rmtree(best)
    shutil.copytree(root / paths.STRATEGIES / winner.name, best)
    write_json(best / CALIBRATION, {"temperature": winner.temperature, "fitted_on": "val"})
    write_json(best / METRICS, {"strategy": winner.name, **strategies[winner.name], "vs_best_unimodal": comparison})

    metrics = {
        "winner": winner.name,
        "selection_metric": p.selection_metric,
        "best_unimodal": best_unimodal.name if best_unimodal else None,
        "winner_vs_best_unimodal": comparison,
        "strategies": strategies,
    }
    if p.raw_check > 0:
        metrics["raw_check"] = raw_check(params, root, winner, labels)
    write_json(out / "metrics.json", metrics)
    log.info(
        "evaluate: winner %s (val %s %.4f), test accuracy %.4f",
        winner.name, p.selection_metric, winner.val[p.selection_metric], winner.test["accuracy"],
    )
    return {
        "winner": winner.name,
        "val_" + p.selection_metric: round(winner.val[p.selection_metric], 4),
        "test_accuracy": round(winner.test["accuracy"], 4),
        "best_unimodal": best_unimodal.name if best_unimodal else None,
        "best_unimodal_test_accuracy": round(best_unimodal.test["accuracy"], 4) if best_unimodal else None,
        "raw_check": metrics.get("raw_check"),
        "leaderboard": json.dumps({r["strategy"]: round(r["test"]["accuracy"], 4) for r in rows}),
    }


def main() -> int:
    return stage_main("evaluate", run)


if __name__ == "__main__":
    sys.exit(main())

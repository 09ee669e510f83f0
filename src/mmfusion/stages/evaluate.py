"""evaluate: every trained strategy on val and test, calibration, ablation, bootstrap; the val winner -> models/best."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mmfusion import paths
from mmfusion.compute import build_task_runner, check_compute  # noqa: F401 - flows/stages.py: CV folds as tasks
from mmfusion.config import Params
from mmfusion.data.manifest import read_manifest
from mmfusion.explain import Explainer
from mmfusion.explain.faithfulness import FaithfulnessCheck, plot_deletion
from mmfusion.explain.page import build_page, write_page
from mmfusion.features.store import load_meta
from mmfusion.inference.predictor import Predictor
from mmfusion.inference.checkpoint import CALIBRATION, METRICS, read_config, save_checkpoint
from mmfusion.monitoring.reference import build_reference
from mmfusion.stages.common import fresh_dir, stage_main, write_json
from mmfusion.training.data import FeatureSet, load_split
from mmfusion.training.evaluation import StrategyEvaluation, accuracy_interval, correct_vector, select_winner
from mmfusion.training.selection import (
    BAG_TEMPERATURE,
    Candidate,
    cv_candidates,
    ensemble_candidate,
    holdout_candidates,
    selection_mode,
)
from mmfusion.training.finetune import FEATURES_DIR, is_tuned, strategy_features
from mmfusion.training.strategies import BUILT_BY_EVALUATE
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


def leaderboard_markdown(rows: list[dict], winner: str, metric: str, split_report: dict | None = None) -> str:
    """The leaderboard table: the selection scores (CV mean ± sd on small data, else val), test metrics with
    the accuracy interval, one ablation column per modality (the `without_<modality>` keys evaluated), and
    under it the splits' group mix from `split_report` (reports/split.json) when it has one."""
    cv = any(r.get("cv") for r in rows)
    held = "OOF" if cv else "val"
    ablations = list(dict.fromkeys(k for r in rows for k in r["ablation"]))
    columns = ["strategy", *([f"CV {metric} mean ± sd"] if cv else []), f"{held} macro-F1", f"{held} acc",
               "test acc [95% CI]", "test macro-F1", "test AUROC", "ECE -> calibrated",
               *(f"acc w/o {k.removeprefix('without_')}" for k in ablations)]  # fmt: skip
    lines = [
        f"# Leaderboard (winner picked on {'CV mean' if cv else 'val'} {metric}: **{winner}**)",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in rows:
        ci = r["test_accuracy_ci"]
        abl = r["ablation"]
        name = f"**{r['strategy']}**" if r["strategy"] == winner else r["strategy"]
        cells = [
            name, *([f"{r['cv']['mean']:.3f} ± {r['cv']['std']:.3f}"] if cv else []),
            f"{r['val']['macro_f1']:.3f}", f"{r['val']['accuracy']:.3f}",
            f"{r['test']['accuracy']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]", f"{r['test']['macro_f1']:.3f}",
            f"{r['test']['auroc']:.3f}", f"{r['test']['ece']:.3f} -> {r['test']['ece_calibrated']:.3f}",
            *(f"{abl[k]['accuracy']:.3f}" if k in abl else "-" for k in ablations),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
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
    return "\n".join(lines + format_group_mix(split_report or {})) + "\n"


def format_group_mix(split_report: dict) -> list[str]:
    """Markdown lines for the split stage's group mix: how much of each split its largest group is (none if absent)."""
    mix = split_report.get("group_mix")
    if not mix:
        return []
    lines = ["", "Group mix of the splits (a split mostly from one group measures mostly that group):", "",
             "| split | rows | groups | largest group | its share |", "|---|---|---|---|---|"]  # fmt: skip
    for name, m in mix.items():
        share = f"{m['largest_group_share']:.1%}"
        lines.append(f"| {name} | {m['rows']} | {m['groups']} | {m['largest_group']} | {share} |")
    warnings = split_report.get("group_check", {}).get("warnings", [])
    return lines + ([""] if warnings else []) + [f"**Warning:** {w}" for w in warnings]


def read_test_rows(predictor: Predictor, root: Path):
    """data/split/test.csv with the columns of the model's inputs: the rows the cached test features were made from."""
    columns = [spec.column for spec in predictor.inputs.values()]
    return read_manifest(root / paths.SPLIT / "test.csv", required=("id", "label", *columns))


def raw_check(params: Params, root: Path, winner: StrategyEvaluation, labels: list[str], predictor: Predictor,
              test) -> dict:  # fmt: skip
    """Re-predict some test samples (rows of `test`, test.csv) from their raw files through `predictor`
    (Predictor.from_dir(models/best)).

    Agreement with the cached-feature predictions shows that serving (decode, normalise, encode, head)
    matches what training and evaluation saw.
    """
    n = params.evaluate.raw_check
    rng = np.random.default_rng(params.evaluate.seed)
    rows = np.sort(rng.choice(len(test), size=min(n, len(test)), replace=False))
    items = predictor.read_rows((test.iloc[i] for i in rows), root)
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
        "runtimes": {"encoders": dict(predictor.runtimes), "head": predictor.head_runtime},
    }


def check_faithfulness(params: Params, root: Path, predictor: Predictor | None, test, out: Path) -> dict:
    """The deletion check (mmfusion.explain.faithfulness) on `evaluate.faithfulness_rows` seeded random test rows:
    out/faithfulness.json and out/faithfulness.png (both written when the check is off too: they are DVC outs)."""
    p = params.evaluate
    if p.faithfulness_rows > 0:
        check = FaithfulnessCheck(predictor, params.package.explain, p.faithfulness_steps, p.faithfulness_draws, p.seed)
        rng = np.random.default_rng(p.seed)
        rows = np.sort(rng.choice(len(test), size=min(p.faithfulness_rows, len(test)), replace=False))
        start = time.perf_counter()
        for i in tqdm(rows, desc="evaluate: faithfulness", unit="row", mininterval=2):
            check.add(predictor.read_rows([test.iloc[i]], root)[0])
        report = check.summary()
        seconds = time.perf_counter() - start
        log.info("evaluate: faithfulness check of %d rows in %.1f s, passed: %s", len(rows), seconds, report["passed"])
        verdict = {True: "attributions beat random", False: "attributions do NOT beat random"}.get(report["passed"])
        title = f"{predictor.strategy}, {report['method']}: {verdict or 'no row explained'}"
    else:
        title = "off (evaluate.faithfulness_rows: 0)"
        report = {"check": title, "items": 0, "all": None, "modalities": {}, "passed": None}
    write_json(out / "faithfulness.json", report)
    plot_deletion(report, out / "faithfulness.png", title=title)
    return report


def write_explanations(params: Params, root: Path, predictor: Predictor | None, test, winner: StrategyEvaluation,
                       y_test: np.ndarray, out: Path, faithfulness: dict) -> dict:  # fmt: skip
    """out/explanations/index.html: `evaluate.explain_rows` test rows explained as the service would explain them
    (package.explain), half the most confident correct ones and half the errors (mmfusion.explain.page)."""
    if params.evaluate.explain_rows <= 0:
        page = write_page(out / "explanations", "Explanations", (), (), ["Off: evaluate.explain_rows is 0."])
        return {"page": str(page), "rows": 0}
    notes = [f"Model {predictor.version} ({predictor.strategy}); explanations by {params.package.explain.method} "
             f"over {', '.join(predictor.inputs)} (package.explain), of each row's predicted class."]  # fmt: skip
    if faithfulness["all"]:
        a, verdict = faithfulness["all"], "passed" if faithfulness["passed"] else "FAILED"
        notes.append(f"Faithfulness (../faithfulness.json, {a['items']} random test rows): removing the most-"
                     f"attributed parts first gives AUC {a['auc_top']:.3f} vs {a['auc_random']:.3f} for random parts "
                     f"(lower: the probability falls sooner): {verdict}.")  # fmt: skip
    return build_page(
        Explainer(predictor, params.package.explain, seed=params.evaluate.seed),
        lambda i: predictor.read_rows([test.iloc[i]], root)[0],
        list(test["id"]), list(test["label"]), softmax(winner.test_logits, winner.temperature), y_test,
        params.evaluate.explain_rows, out / "explanations", title=f"Explanations: {predictor.strategy} on test rows",
        notes=notes,
    )  # fmt: skip


def load_candidates(params: Params, root: Path) -> tuple[str, list[Candidate], list[str], FeatureSet, np.ndarray]:
    """(selection mode, candidates, labels, test set, the held-out labels the candidates' val logits are over)."""
    names = params.train.strategies
    dirs = strategy_dirs(root, tuple(n for n in names if n not in BUILT_BY_EVALUATE))
    labels = read_config(dirs[0])["labels"]
    features = root / paths.FEATURES
    val = load_split(features, "val", labels)
    test = load_split(features, "test", labels)
    train = load_split(features, "train", labels)
    mode = selection_mode(params, len(train) + len(val))
    folds = None
    if mode == "cv":
        trainval = train.concat(val)
        candidates, folds = cv_candidates(dirs, labels, trainval, test, load_meta(features).get("modalities", {}), params, root)
        y_heldout = trainval.y.numpy()
    else:
        candidates = holdout_candidates(dirs, labels, val, test, params)
        y_heldout = val.y.numpy()
    if "ensemble" in names:  # over the strategies that share the project's encoders (not the tuned ones)
        shared = [c for c in candidates if not is_tuned(c.evaluation.name)]
        candidates.append(ensemble_candidate(shared, y_heldout, folds, labels, test, params))
    order = {n: i for i, n in enumerate(names)}
    candidates.sort(key=lambda c: order.get(c.evaluation.name, len(order)))
    return mode, candidates, labels, test, y_heldout


def compare(a: StrategyEvaluation, b: StrategyEvaluation | None, y_test: np.ndarray, y_heldout: np.ndarray, p) -> dict | None:
    """Paired bootstrap of `a` against `b` on test, and on the held-out (val or out-of-fold) rows."""
    if b is None or b is a:
        return None
    heldout = lambda r: (r.val_logits.argmax(axis=1) == y_heldout).astype(np.float64)  # noqa: E731
    return {
        "winner": a.name,
        "baseline": b.name,
        **paired_bootstrap(correct_vector(a, y_test), correct_vector(b, y_test), p.bootstrap, p.seed),
        "heldout": paired_bootstrap(heldout(a), heldout(b), p.bootstrap, p.seed),
    }


def write_best(root: Path, winner: Candidate, entry: dict, comparison: dict | None) -> None:
    """models/best: the winner's folder (or its refit bag / ensemble) + calibration and metrics, self-contained."""
    best = root / paths.BEST
    if best.exists():
        shutil.rmtree(best)
    if winner.source_dir is not None:  # a tuned strategy's own features stay behind (the reference is made from them)
        shutil.copytree(winner.source_dir, best, ignore=shutil.ignore_patterns(FEATURES_DIR))
    else:
        save_checkpoint(best, winner.head, winner.config)
        if winner.members:
            write_json(best / "members.json", {"members": winner.members, "selection": winner.config.get("selection")})
    ev = winner.evaluation
    fitted_on = BAG_TEMPERATURE if ev.cv else "val"
    write_json(best / CALIBRATION, {"temperature": ev.temperature, "fitted_on": fitted_on})
    write_json(best / METRICS, {"strategy": ev.name, **entry, "vs_best_unimodal": comparison})


def run(params: Params, root: Path = Path(".")) -> dict:
    """Evaluate every strategy, pick the winner on val (or by CV on small data), report test, write reports and models/best."""
    p = params.evaluate
    check_compute(params.compute)
    mode, candidates, labels, test, y_heldout = load_candidates(params, root)
    results = [c.evaluation for c in candidates]
    y_test = test.y.numpy()
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
    comparison = compare(winner, best_unimodal, y_test, y_heldout, p)
    before = reliability_bins(softmax(winner.test_logits), y_test, p.ece_bins)
    after = reliability_bins(softmax(winner.test_logits, winner.temperature), y_test, p.ece_bins)
    plot_reliability(before, after, plots / "reliability.png", title=f"{winner.name}: test")
    plot_leaderboard(rows, plots / "leaderboard.png")
    split_json = root / paths.SPLIT_REPORT
    split_report = json.loads(split_json.read_text()) if split_json.exists() else None
    (out / "leaderboard.md").write_text(leaderboard_markdown(rows, winner.name, p.selection_metric, split_report))
    write_json(out / "per_class.json", per_class)
    chosen = next(c for c in candidates if c.evaluation is winner)
    write_best(root, chosen, strategies[winner.name], comparison)
    # The drift reference travels with the model (and so inside the BentoML model): monitoring/reference.py. It is
    # made from the embeddings the model reads: a tuned strategy's own features
    reference = build_reference(
        root / paths.BEST, strategy_features(chosen.source_dir, root),
        root / paths.SPLIT, params.monitor.reference_splits, root,
        previews=params.package.log.previews,
    )

    metrics = {
        "winner": winner.name,
        "selection": mode,
        "selection_metric": p.selection_metric,
        "best_unimodal": best_unimodal.name if best_unimodal else None,
        "winner_vs_best_unimodal": comparison,
        "strategies": strategies,
    }
    metrics["reference"] = reference
    predictor = test_rows = None
    if max(p.raw_check, p.explain_rows, p.faithfulness_rows) > 0:  # the served path: models/best on raw test files
        predictor = Predictor.from_dir(root / paths.BEST, device=p.device)
        test_rows = read_test_rows(predictor, root)
    if p.raw_check > 0:
        metrics["raw_check"] = raw_check(params, root, winner, labels, predictor, test_rows)
    faithfulness = check_faithfulness(params, root, predictor, test_rows, out)
    page = write_explanations(params, root, predictor, test_rows, winner, y_test, out, faithfulness)
    write_json(out / "metrics.json", metrics)
    log.info(
        "evaluate: winner %s (%s %s %.4f), test accuracy %.4f",
        winner.name, mode, p.selection_metric, winner.selection_score(p.selection_metric), winner.test["accuracy"],
    )  # fmt: skip
    return {
        "winner": winner.name,
        "selection": mode,
        ("cv_mean_" if mode == "cv" else "val_") + p.selection_metric: round(winner.selection_score(p.selection_metric), 4),
        "test_accuracy": round(winner.test["accuracy"], 4),
        "best_unimodal": best_unimodal.name if best_unimodal else None,
        "best_unimodal_test_accuracy": round(best_unimodal.test["accuracy"], 4) if best_unimodal else None,
        "raw_check": metrics.get("raw_check"),
        "faithfulness": {"passed": faithfulness["passed"],
                         **{k: (faithfulness["all"] or {}).get(k) for k in ("auc_top", "auc_random")}},
        "explanations": page,
        "leaderboard": json.dumps({r["strategy"]: round(r["test"]["accuracy"], 4) for r in rows}),
    }


def main() -> int:
    return stage_main("evaluate", run)


if __name__ == "__main__":
    sys.exit(main())

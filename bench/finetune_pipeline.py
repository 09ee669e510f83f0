"""The pipeline's own fine-tuning (`tuned_<strategy>`, train.finetune) against the frozen strategies, on the
project's current data: the train and evaluate stages run in a scratch project that shares this one's data,
features and feature cache, so nothing here is overwritten.

    .venv/bin/python bench/finetune_pipeline.py                      # emoji, holdout selection, ~6 min on 2 cores
    .venv/bin/python bench/finetune_pipeline.py --selection cv       # CV: each tuned strategy tuned 5 more times
    .venv/bin/python bench/finetune_pipeline.py --strategies weighted_sum,tuned_weighted_sum --set train.finetune.blocks.image=3

Writes JSON (default bench/results/finetune-pipeline-cpu.json) and the leaderboard beside it: each strategy's test accuracy with its
bootstrap interval, val / CV score, train seconds (per epoch for the tuned ones), the tuned encoders'
runtime (int8 or the guard's fp32 fallback and its fidelity), the paired bootstrap of every tuned
strategy against its frozen one on test, and the stages' wall times and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

DEFAULT = "image_only,text_only,weighted_sum,tuned_image_only,tuned_weighted_sum"


def set_key(data: dict, dotted: str, value: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = yaml.safe_load(value)


def scratch_project(base: Path) -> Path:
    """A project dir whose data, features and caches are this repo's (read; the cache is content-addressed)."""
    for name in ("data", "features", ".cache"):
        (base / name).symlink_to(REPO / name)
    (base / "reports").mkdir()
    if (REPO / "reports" / "split.json").exists():
        (base / "reports" / "split.json").symlink_to(REPO / "reports" / "split.json")
    return base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default=DEFAULT, help=f"train.strategies (default {DEFAULT})")
    ap.add_argument("--selection", default="holdout", choices=("holdout", "cv", "auto"), help="evaluate.selection")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a param, e.g. train.finetune.epochs=10")
    ap.add_argument("--out", default=str(REPO / "bench/results/finetune-pipeline-cpu.json"))
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()  # before the chdir into the scratch project
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("mmfusion.encoders.runtime").setLevel(logging.WARNING)
    if not (REPO / "features" / "meta.json").exists():
        print("bench/finetune_pipeline.py needs features/: run `make run` (or `dvc repro featurize`) first")
        return 2

    import numpy as np
    import torch

    from mmfusion.config import load_params
    from mmfusion.stages import evaluate, train
    from mmfusion.training.data import load_split
    from mmfusion.training.finetune import base_strategy, is_tuned, strategy_features
    from mmfusion.training.loop import predict_logits
    from mmfusion.training.metrics import paired_bootstrap
    from mmfusion.inference.checkpoint import load_checkpoint

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["strategies"] = args.strategies.split(",")
    raw["evaluate"].update(selection=args.selection, explain_rows=0, faithfulness_rows=0)
    for item in args.set:
        key, _, value = item.partition("=")
        set_key(raw, key, value)
    with tempfile.TemporaryDirectory(prefix="mmfusion-ft-") as tmp:
        root = scratch_project(Path(tmp))
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        params = load_params(root / "params.yaml")
        os.chdir(root)
        t0 = time.perf_counter()
        trained = train.run(params, root)
        t_train = time.perf_counter() - t0
        evaluated = evaluate.run(params, root)
        t_eval = time.perf_counter() - t0 - t_train
        metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        leaderboard = out.with_name(out.stem + "-leaderboard.md")
        leaderboard.write_text((root / "reports/evaluate/leaderboard.md").read_text())
        labels = json.loads((root / "models/strategies" / args.strategies.split(",")[0] / "config.json").read_text())["labels"]
        comparisons = {}
        for name in raw["train"]["strategies"]:
            frozen = base_strategy(name)
            if not is_tuned(name) or frozen not in raw["train"]["strategies"] or args.selection != "holdout":
                continue
            correct = {}
            for n in (name, frozen):
                d = root / "models/strategies" / n
                head, _ = load_checkpoint(d)
                test = load_split(strategy_features(d, root), "test", labels)
                logits = predict_logits(head, test, present=test.presence(head.modalities))
                correct[n] = (logits.argmax(axis=1) == test.y.numpy()).astype(np.float64)
            comparisons[f"{name} vs {frozen}"] = paired_bootstrap(correct[name], correct[frozen], 1000, 0)
        tuned_runtime = {}
        for name in raw["train"]["strategies"]:
            if is_tuned(name):
                config = json.loads((root / "models/strategies" / name / "config.json").read_text())
                tuned_runtime[name] = {m: {"runtime": e["runtime"]["name"], "fidelity": e["runtime"].get("fidelity"),
                                           "int8_fallback": e["runtime"].get("int8_fallback")}
                                       for m, e in config["encoders"].items() if e.get("tuned")}  # fmt: skip
    result = {
        "command": "bench/finetune_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "strategies": {
            n: {"test_accuracy": round(s["test"]["accuracy"], 4), "test_accuracy_ci": s["test_accuracy_ci"],
                "selection_score": round(s["cv"]["mean"], 4) if s.get("cv") else round(s["val"]["macro_f1"], 4),
                "train": trained["strategies"].get(n)}
            for n, s in metrics["strategies"].items()
        },  # fmt: skip
        "winner": metrics["winner"],
        "selection": metrics["selection"],
        "tuned_vs_frozen_test": comparisons,
        "tuned_runtime": tuned_runtime,
        "seconds": {"train": round(t_train, 1), "evaluate": round(t_eval, 1)},
        "leaderboard": str(leaderboard.relative_to(REPO)) if leaderboard.is_relative_to(REPO) else str(leaderboard),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "evaluate": {k: evaluated[k] for k in ("winner", "test_accuracy", "best_unimodal_test_accuracy")},
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("winner", "seconds", "tuned_vs_frozen_test")}, indent=2))
    for n, s in result["strategies"].items():
        print(f"{n:22s} test {s['test_accuracy']:.3f}  selection {s['selection_score']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

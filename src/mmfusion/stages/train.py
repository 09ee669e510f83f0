"""train: every fusion strategy in train.strategies (unimodal baselines included) on the cached features."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from mmfusion import paths
from mmfusion.compute import build_task_runner, check_compute, map_tasks  # noqa: F401 - flows/stages.py
from mmfusion.config import Params
from mmfusion.devices import resolve_device
from mmfusion.features.store import load_meta
from mmfusion.stages.common import fresh_dir, stage_main, write_json
from mmfusion.training.data import load_training_data
from mmfusion.training.finetune import check_finetune, fit_tuned_from_files, is_tuned
from mmfusion.training.strategies import check_strategies, fit_strategy_from_files

log = logging.getLogger(__name__)


def fit_one(name: str, params: Params, root: str) -> dict:
    """One training trial: a strategy (`fit_strategy_from_files`) or a tuned one (`fit_tuned_from_files`)."""
    return (fit_tuned_from_files if is_tuned(name) else fit_strategy_from_files)(name, params, root)


def run(params: Params, root: Path = Path(".")) -> dict:
    """Train each strategy with early stopping on val macro-F1 into models/strategies/<name>/."""
    p = params.train
    features = root / paths.FEATURES
    encoders = load_meta(features).get("modalities", {})
    check_strategies(p.strategies, tuple(encoders))
    check_finetune(p.strategies, encoders, p.finetune)
    check_compute(params.compute)
    device = resolve_device(p.device)
    train, val, labels = load_training_data(features, p.use_augmented)
    fresh_dir(root / paths.STRATEGIES)  # each strategy writes its own folder in it
    threads = torch.get_num_threads()
    if device.type == "cpu" and p.cpu_threads > 0:
        torch.set_num_threads(p.cpu_threads)
    start = time.perf_counter()
    strategies = {}
    try:
        # one trial per strategy, each reading features/ and writing its own folder: in this process, over local
        # processes when that pays, or one Prefect task each on a cluster (mmfusion.compute.map_tasks)
        fitted = map_tasks(fit_one, list(p.strategies), params.compute, "train-strategy",
                           progress=f"train: {len(p.strategies)} strategies", params=params, root=str(root.resolve()))  # fmt: skip
        strategies = dict(zip(p.strategies, fitted))
    finally:
        used_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    summary = {
        "device": str(device),
        "threads": used_threads,
        "train_rows": len(train),
        "val_rows": len(val),
        "classes": len(labels),
        "seconds_total": round(time.perf_counter() - start, 2),
        "strategies": strategies,
    }
    write_json(root / paths.TRAIN_REPORT, summary)
    log.info("train: %d strategies in %.1fs on %s", len(strategies), summary["seconds_total"], device)
    return summary


def main() -> int:
    return stage_main("train", run)


if __name__ == "__main__":
    sys.exit(main())

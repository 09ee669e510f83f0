"""One strategy, end to end: build its head from params, train it, write its self-describing model folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmfusion.config import Params, TrainParams, params_to_dict
from mmfusion.errors import UserError
from mmfusion.fusion import create_head, list_heads
from mmfusion.fusion.registry import TUNED_PREFIX, base_strategy
from mmfusion.inference.checkpoint import save_checkpoint
from mmfusion.modalities import settings_from_params
from mmfusion.training.data import FeatureSet
from mmfusion.training.loop import TrainResult, seed_everything, train_head
from mmfusion.training.plots import plot_curves
from mmfusion.training.presence import mark_missing, presence_from_nan

log = logging.getLogger(__name__)


def head_options(name: str, p: TrainParams) -> dict[str, Any]:
    """create_head kwargs for strategy `name` from the train params (only the options that head takes)."""
    options: dict[str, Any] = {"hidden_dim": p.hidden_dim, "dropout": p.dropout}
    f = p.fusion
    if name == "weighted_sum" and f.weighted_sum_weights:
        options["weights"] = dict(f.weighted_sum_weights)
    elif name == "late":
        options["combine"] = f.late_combine
    elif name == "cross_attention":
        options.update(layers=f.cross_attention_layers, heads=f.cross_attention_heads)
    return options


def check_strategies(names: tuple[str, ...], modalities: tuple[str, ...]) -> None:
    """Fail before any training on an unknown or repeated strategy name (for features with `modalities`)."""
    if not names:
        raise UserError("train.strategies is empty")
    known = list_heads(modalities)
    unknown = [n for n in names if base_strategy(n) not in known or n == f"{TUNED_PREFIX}ensemble"]
    if unknown:
        raise UserError(
            f"unknown strategy {unknown[0]!r} in train.strategies; registered: {', '.join(known)} "
            f"(and {TUNED_PREFIX}<strategy>: with the top of its encoders fine-tuned, train.finetune)"
        )
    if len(set(names)) != len(names):
        raise UserError(f"train.strategies repeats a name: {list(names)}")


@contextmanager
def torch_threads(device: torch.device, threads: int) -> Iterator[None]:
    """torch's CPU threads set to `threads` (train.cpu_threads; 0: torch's default) on a CPU device, restored after."""
    before = torch.get_num_threads()
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Built by evaluate from the other strategies' predictions, not trained by gradient.
BUILT_BY_EVALUATE = ("ensemble",)


def train_strategy_head(
    name: str,
    train: FeatureSet,
    val: FeatureSet,
    labels: list[str],
    encoders: dict[str, dict],
    params: Params,
    device: torch.device,
) -> tuple[torch.nn.Module, TrainResult]:
    """Build strategy `name`'s head from params and train it (early stopping on `val`); returns (head, result)."""
    p = params.train
    seed_everything(p.seed)
    dims = {m: encoders[m]["dim"] if m in encoders else d for m, d in train.dims.items()}
    head = create_head(name, dims=dims, num_classes=len(labels), **head_options(name, p))
    return head, train_with_presence(head, head, train, val, p, device)


def train_with_presence(model: torch.nn.Module, head, train: FeatureSet, val: FeatureSet, p: TrainParams,
                        device: torch.device) -> TrainResult:  # fmt: skip
    """`train_head(model, ...)`; on data with rows missing a modality, those rows reach `head` (the fusion head
    inside `model`) as missing, not as zeros (training.presence)."""
    if train.complete and val.complete:
        return train_head(model, train, val, p, device)
    with presence_from_nan(head):
        return train_head(model, mark_missing(train), mark_missing(val), p, device)


def model_config(head, labels: list[str], encoders: dict[str, dict], params: Params) -> dict:
    """The config.json fields beyond the head's own: label map, encoders, each input's preprocessing, train params."""
    return {
        "labels": labels,
        "encoders": {m: encoders.get(m, {}) for m in head.modalities},
        # Serving decodes and normalises raw inputs exactly as featurize did (modalities/: the spec's settings).
        "inputs": settings_from_params(head.modalities, params),
        "train": params_to_dict(params.train),
    }


def fit_strategy(
    name: str,
    train: FeatureSet,
    val: FeatureSet,
    labels: list[str],
    encoders: dict[str, dict],
    params: Params,
    out_dir: Path,
    device: torch.device,
) -> dict:
    """Train strategy `name` and write `out_dir` (weights, config, history.json, curves.png); returns its summary."""
    if name in BUILT_BY_EVALUATE:
        log.info("train %-16s built by evaluate from the other strategies' predictions", name)
        return {"built_by": "evaluate"}
    head, result = train_strategy_head(name, train, val, labels, encoders, params, device)
    config = {
        **model_config(head, labels, encoders, params),
        "best_epoch": result.best_epoch,
        "best_val_macro_f1": result.best_val_macro_f1,
        "parameters": sum(t.numel() for t in head.parameters()),
    }
    save_checkpoint(out_dir, head, config)
    (out_dir / "history.json").write_text(json.dumps(result.history, indent=1) + "\n")
    plot_curves(result.history, out_dir / "curves.png", title=name)
    log.info(
        "train %-16s best epoch %2d/%2d  val macro-F1 %.4f  %.1fs",
        name, result.best_epoch, result.epochs_run, result.best_val_macro_f1, result.seconds,
    )
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_macro_f1": round(result.best_val_macro_f1, 4),
        "seconds": round(result.seconds, 2),
        "parameters": config["parameters"],
    }


def fit_strategy_from_files(name: str, params: Params, root: str) -> dict:
    """`fit_strategy` as one training trial on a cluster worker: reads `root`/features, writes
    `root`/models/strategies/<name>/ (a shared path) under train.cpu_threads; returns the summary only."""
    from mmfusion import paths
    from mmfusion.compute import worker_device
    from mmfusion.devices import resolve_device
    from mmfusion.features.store import load_meta
    from mmfusion.training.data import load_training_data

    p = params.train
    features = Path(root) / paths.FEATURES
    device = resolve_device(worker_device(p.device))
    train, val, labels = load_training_data(features, p.use_augmented)
    with torch_threads(device, p.cpu_threads):
        encoders = load_meta(features).get("modalities", {})
        out = Path(root) / paths.STRATEGIES / name
        return fit_strategy(name, train, val, labels, encoders, params, out, device)

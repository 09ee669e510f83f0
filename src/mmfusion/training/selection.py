"""The candidates evaluate chooses from: holdout models (val) or cross-validated bags (train+val), plus `ensemble`.

A `Candidate` is a strategy's evaluation (metrics, logits) plus the head that would be served
and how to write it into models/best. Under holdout a candidate is the model in
models/strategies/<name>/; under cross-validation it is the bag of its k fold models, refitted
on train+val and tested once on test. `ensemble` is greedy selection over the others' held-out
probabilities (val under holdout, out-of-fold under CV), scored by cross-fitting so that its
weights are never scored on the rows that chose them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from mmfusion.config import Params
from mmfusion.fusion import FusionHead
from mmfusion.inference.checkpoint import load_checkpoint, read_config
from mmfusion.training.crossval import CVResult, bag, cross_validate, fold_scores, load_bag_weights, make_folds
from mmfusion.training.data import FeatureSet
from mmfusion.training.ensemble_selection import crossfit_probs, greedy_selection
from mmfusion.training.evaluation import StrategyEvaluation, evaluate_from_logits, evaluate_head
from mmfusion.devices import resolve_device
from mmfusion.training.metrics import softmax
from mmfusion.training.strategies import torch_threads

log = logging.getLogger(__name__)
SELECTIONS = ("auto", "cv", "holdout")


@dataclass
class Candidate:
    evaluation: StrategyEvaluation
    head: FusionHead
    config: dict  # config.json fields beyond the head's own (labels, encoders, text, train)
    source_dir: Path | None = None  # a trained folder to copy as is (holdout single strategies)
    members: dict[str, float] = field(default_factory=dict)  # ensemble: strategy -> weight


def selection_mode(params: Params, trainval_rows: int) -> str:
    """cv or holdout, from evaluate.selection and the size of train+val."""
    p = params.evaluate
    if p.selection not in SELECTIONS:
        raise ValueError(f"evaluate.selection must be one of {', '.join(SELECTIONS)}, got {p.selection!r}")
    if p.selection == "auto":
        return "cv" if trainval_rows < p.cv_max_rows else "holdout"
    return p.selection


def holdout_candidates(
    dirs: list[Path], labels: list[str], val: FeatureSet, test: FeatureSet, params: Params
) -> list[Candidate]:
    """Every trained strategy folder, scored on val and test."""
    out = []
    for d in dirs:
        head, config = load_checkpoint(d)
        if config["labels"] != labels:
            raise ValueError(f"{d.name} was trained with a different label map than {dirs[0].name}: re-run train")
        out.append(Candidate(evaluate_head(d.name, head, val, test, labels, params.evaluate), head, config, source_dir=d))
    return out


# What a selected model's config.json carries over from the configs it was trained with: its labels, encoders,
# each input's recorded preprocessing (`inputs`; `text` in models written before it) and training settings.
# Serving reads the preprocessing from here: a key dropped here is a silent train/serve skew.
CARRIED = ("labels", "encoders", "inputs", "text", "train")


def _base_config(d: Path) -> dict:
    config = read_config(d)
    return {k: config[k] for k in CARRIED if k in config}


def cv_candidates(
    dirs: list[Path],
    labels: list[str],
    trainval: FeatureSet,
    test: FeatureSet,
    encoders: dict[str, dict],
    params: Params,
) -> tuple[list[Candidate], list[np.ndarray]]:
    """Each strategy cross-validated over train+val (its fold trials on params.compute's engine); its bag of fold
    models tested on test. Also returns the folds."""
    p = params.evaluate
    folds = make_folds(trainval, p.cv_folds, p.seed)
    with torch_threads(resolve_device(params.train.device), params.train.cpu_threads):
        results = cross_validate([d.name for d in dirs], trainval, folds, labels, encoders, params, p.selection_metric)
        out = [_cv_candidate(cv, d, labels, trainval, test, folds, params) for cv, d in zip(results, dirs)]
    return out, folds


# Under CV the served model is a bag: the average of its k fold models' probabilities, which is
# softer than any one of them. Its only held-out logits are the single fold models' (out of fold),
# and a temperature fitted on those over-softens the bag. On test, in the first runs with CV as
# the default, it made 18 of 20 strategies' ECE worse (emoji concat 0.042 -> 0.078, GIMP attention
# 0.130 -> 0.307). So a CV bag is served at temperature 1: averaging is its calibration.
BAG_TEMPERATURE = "none (1.0): a CV bag's averaging softens it; a temperature from its single fold models' OOF logits over-softens it"


def _cv_candidate(
    cv: CVResult, d: Path, labels: list[str], trainval: FeatureSet, test: FeatureSet, folds, params: Params
) -> Candidate:
    head = load_bag_weights(bag(cv.heads), cv.heads)
    summary = cv.summary(params.evaluate.selection_metric)
    evaluation = evaluate_from_logits(
        cv.name, head, cv.oof_logits, trainval.y.numpy(), test, labels, params.evaluate, summary, calibrate=False
    )
    config = {**_base_config(d), "strategy": cv.name, "selection": {"mode": "cv", **summary}}
    return Candidate(evaluation, head, config)


def ensemble_candidate(
    candidates: list[Candidate],
    y_heldout: np.ndarray,
    folds: list[np.ndarray] | None,
    labels: list[str],
    test: FeatureSet,
    params: Params,
) -> Candidate:
    """Greedy ensemble selection over the candidates' held-out probabilities (val, or OOF under CV)."""
    p = params.evaluate
    probs = {c.evaluation.name: softmax(c.evaluation.val_logits) for c in candidates}
    cross = folds
    if cross is None:  # holdout: cross-fit the weights over folds of val itself
        k = max(2, min(5, int(np.bincount(y_heldout).min()) if len(y_heldout) else 2))
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=p.seed)
        cross = [held for _, held in splitter.split(np.zeros(len(y_heldout)), y_heldout)]
    heldout_probs = crossfit_probs(probs, y_heldout, cross, p.selection_metric, p.ensemble_size)
    weights = greedy_selection(probs, y_heldout, p.selection_metric, p.ensemble_size)
    chosen = [c for c in candidates if c.evaluation.name in weights]
    head = bag([c.head for c in chosen], [weights[c.evaluation.name] for c in chosen])
    for member, c in zip(head.members, chosen):
        member.load_state_dict(c.head.state_dict())
    logits = np.log(np.clip(heldout_probs, 1e-12, None)).astype(np.float32)
    cv = None
    if folds is not None:
        scores = fold_scores(logits, y_heldout, folds, p.selection_metric)
        cv = {"folds": len(folds), "metric": p.selection_metric, "mean": float(np.mean(scores)),
              "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0, "fold_scores": [round(s, 4) for s in scores]}  # fmt: skip
    # under CV its members are bags (served at temperature 1, above); under holdout, members fitted on train
    evaluation = evaluate_from_logits("ensemble", head.eval(), logits, y_heldout, test, labels, p, cv, calibrate=folds is None)
    total = sum(weights.values())
    members = {n: round(w / total, 4) for n, w in weights.items()}
    config = {**{k: v for k, v in chosen[0].config.items() if k in CARRIED and k != "encoders"},
              "encoders": {m: enc for c in chosen for m, enc in c.config["encoders"].items()},
              "inputs": {m: i for c in chosen for m, i in (c.config.get("inputs") or {}).items()},
              "strategy": "ensemble", "members": members,
              "selection": {"mode": "cv" if folds is not None else "holdout", **(cv or {})}}  # fmt: skip
    log.info("ensemble: %s", ", ".join(f"{n} x{w}" for n, w in weights.items()))
    return Candidate(evaluation, head.eval(), config, members=members)

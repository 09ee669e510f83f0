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
from mmfusion.training.data import FeatureSet, load_split
from mmfusion.compute import map_tasks
from mmfusion.training.finetune import FEATURES_DIR, Activations, fit_tuned_fold, is_tuned, tuned_modalities
from mmfusion.training.ensemble_selection import crossfit_probs, greedy_selection
from mmfusion.training.evaluation import StrategyEvaluation, evaluate_from_logits, evaluate_head
from mmfusion.devices import resolve_device
from mmfusion.training.loop import predict_logits
from mmfusion.training.metrics import fit_temperature, softmax
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


def own_splits(d: Path, labels: list[str], like: dict[str, FeatureSet]) -> dict[str, FeatureSet]:
    """A tuned strategy's own features (its tuned encoders' embeddings) of the splits in `like`, checked to hold
    the same rows in the same order; the project's features for any other strategy."""
    if not (d / FEATURES_DIR).is_dir():
        return like
    own = {s: load_split(d / FEATURES_DIR, s, labels) for s in like}
    for s, data in own.items():
        if data.ids != like[s].ids:
            raise ValueError(f"{d.name}'s own features hold other {s} rows than features/: re-run train")
    return own


def holdout_candidates(
    dirs: list[Path], labels: list[str], val: FeatureSet, test: FeatureSet, params: Params
) -> list[Candidate]:
    """Every trained strategy folder, scored on val and test (a tuned one on its own features)."""
    out = []
    for d in dirs:
        head, config = load_checkpoint(d)
        if config["labels"] != labels:
            raise ValueError(f"{d.name} was trained with a different label map than {dirs[0].name}: re-run train")
        own = own_splits(d, labels, {"val": val, "test": test})
        evaluation = evaluate_head(d.name, head, own["val"], own["test"], labels, params.evaluate)
        out.append(Candidate(evaluation, head, config, source_dir=d))
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
    root: Path = Path("."),
) -> tuple[list[Candidate], list[np.ndarray]]:
    """Each strategy cross-validated over train+val (its fold trials on params.compute's engine); its bag of fold
    models tested on test (tuned strategies: see `_tuned_cv_candidates`). Also returns the folds."""
    p = params.evaluate
    folds = make_folds(trainval, p.cv_folds, p.seed)
    frozen = [d for d in dirs if not is_tuned(d.name)]
    device = resolve_device(params.train.device)
    with torch_threads(device, params.train.cpu_threads):
        results = cross_validate([d.name for d in frozen], trainval, folds, labels, encoders, params, p.selection_metric)
        done = {d.name: _cv_candidate(cv, d, labels, trainval, test, folds, params) for cv, d in zip(results, frozen)}
        tuned = [d for d in dirs if is_tuned(d.name)]
        if tuned:
            done.update(_tuned_cv_candidates(tuned, labels, trainval, test, folds, encoders, params, root, device))
    return [done[d.name] for d in dirs], folds


def _tuned_cv_candidates(dirs: list[Path], labels: list[str], trainval: FeatureSet, test: FeatureSet, folds,
                         encoders: dict, params: Params, root: Path, device) -> dict[str, Candidate]:  # fmt: skip
    """The tuned strategies under CV: each tuned again on each fold (from the cached activations) for its
    out-of-fold score; what is served and tested is the model train fitted, on its own features (not a bag of
    k tuned encoders), calibrated on its own val logits (the fold models' OOF logits are other models': on
    emoji they doubled its test ECE, 0.046 -> 0.106)."""
    p = params.evaluate
    heads = {d.name: load_checkpoint(d)[0] for d in dirs}
    blocks: dict[str, int] = {}  # every modality any of them tunes: one activation set serves them all
    for name, head in heads.items():
        blocks.update(tuned_modalities(name, head, params.train.finetune))
    data = Activations(params, root, encoders, blocks, device).replace(trainval, progress="cv: tuned activations")
    # one trial per (strategy, fold) on the engine params.compute names (local: over processes when that pays)
    trials = [(d.name, k) for d in dirs for k in range(len(folds))]
    fits = map_tasks(fit_tuned_fold, trials, params.compute, "cv-tuned-fold",
                     progress=f"cv: {len(dirs)} tuned x {len(folds)} folds", data=data, folds=folds, labels=labels,
                     encoders=encoders, blocks=blocks, params=params, root=str(root))  # fmt: skip
    out = {}
    for i, d in enumerate(dirs):
        mine = fits[i * len(folds) : (i + 1) * len(folds)]
        oof = np.zeros((len(trainval), len(labels)), dtype=np.float32)
        for held, (logits, _) in zip(folds, mine):
            oof[held] = logits
        scores = fold_scores(oof, trainval.y.numpy(), folds, p.selection_metric)
        cv = CVResult(d.name, oof, scores, best_epochs=[epoch for _, epoch in mine])
        summary = {**cv.summary(p.selection_metric), "served": "the model train fitted (train split, early stopping on val)"}
        own = own_splits(d, labels, {"test": test})["test"]
        val = load_split(d / FEATURES_DIR, "val", labels)
        temperature = fit_temperature(predict_logits(heads[d.name], val, present=val.presence(heads[d.name].modalities)),
                                      val.y.numpy())  # fmt: skip
        evaluation = evaluate_from_logits(d.name, heads[d.name], oof, trainval.y.numpy(), own, labels, p, summary,
                                          temperature=temperature)  # fmt: skip
        out[d.name] = Candidate(evaluation, heads[d.name], read_config(d), source_dir=d)
    return out


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

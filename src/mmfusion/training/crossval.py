"""Cross-validated model selection for small data: grouped, stratified k-fold over train+val.

Each strategy is trained k times (early stopping on its held-out fold, as AutoGluon's bagging
does), giving out-of-fold (OOF) logits for every train+val row and one score per fold. The k
fold models of a strategy, averaged, are its refit model (a *bag*): what is tested once on
test and served. `late_stacking`'s meta-classifier is refitted on the experts' OOF outputs.

Every (strategy, fold) trial is one `fit_fold` call, mapped through `compute.map_tasks`: in
this process on the local engine (strategy by strategy, fold by fold), one Prefect task per
trial on the Dask cluster. Each trial seeds itself (train.seed, as `train_strategy_head` does)
and runs under train.cpu_threads, so a worker gives the local engine's numbers.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from mmfusion.compute import map_tasks, worker_device
from mmfusion.config import Params
from mmfusion.devices import resolve_device
from mmfusion.fusion import FusionHead, create_head
from mmfusion.training.data import FeatureSet
from mmfusion.training.ensemble_selection import score
from mmfusion.training.loop import predict_logits
from mmfusion.training.metrics import softmax
from mmfusion.training.strategies import torch_threads, train_strategy_head

log = logging.getLogger(__name__)


def make_folds(data: FeatureSet, k: int, seed: int) -> list[np.ndarray]:
    """Held-out row indices of each of `k` folds, stratified by label and grouped (a group stays in one fold)."""
    groups = np.asarray(data.groups or data.ids)
    n_groups = len(set(groups.tolist()))
    if k < 2:
        raise ValueError(f"evaluate.cv_folds must be at least 2, got {k}")
    if n_groups < k:
        raise ValueError(f"cross-validation needs at least {k} groups in train+val, found {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # classes smaller than k: sklearn warns, the folds are still valid
        warnings.simplefilter("ignore", UserWarning)
        return [held for _, held in splitter.split(np.zeros(len(data)), data.y.numpy(), groups)]


@dataclass
class CVResult:
    """One strategy under cross-validation."""

    name: str
    oof_logits: np.ndarray  # [N, C] over train+val rows
    fold_scores: list[float]
    heads: list[FusionHead] = field(default_factory=list)
    best_epochs: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_scores))

    @property
    def std(self) -> float:
        return float(np.std(self.fold_scores, ddof=1)) if len(self.fold_scores) > 1 else 0.0

    def summary(self, metric: str) -> dict:
        return {
            "folds": len(self.fold_scores),
            "metric": metric,
            "mean": self.mean,
            "std": self.std,
            "fold_scores": [round(s, 4) for s in self.fold_scores],
            "best_epochs": self.best_epochs,
        }


def fold_scores(oof_logits: np.ndarray, y: np.ndarray, folds: list[np.ndarray], metric: str) -> list[float]:
    return [score(softmax(oof_logits[h]), y[h], metric) for h in folds]


@dataclass
class FoldFit:
    """What one (strategy, fold) trial sends back: small (a head of a few MB at most, the fold's logits)."""

    head: FusionHead  # on CPU, in eval mode
    oof_logits: np.ndarray  # [len(held), C]: the fold's held-out rows
    best_epoch: int


def fit_fold(
    trial: tuple[str, int],
    data: FeatureSet,
    folds: list[np.ndarray],
    labels: list[str],
    encoders: dict[str, dict],
    params: Params,
) -> FoldFit:
    """Train strategy `trial[0]` on the complement of fold `trial[1]`, predict that fold's rows.

    One CV trial, in this process or as a task on a cluster worker (there on the worker's device and
    under train.cpu_threads). `data` travels with the task: CV runs on small data only (train+val
    below evaluate.cv_max_rows), and the worker then trains on exactly the rows the driver's folds index.
    """
    name, k = trial
    device = resolve_device(worker_device(params.train.device))
    held = folds[k]
    fit, out = data.subset(np.setdiff1d(np.arange(len(data)), held)), data.subset(held)
    with torch_threads(device, params.train.cpu_threads):
        head, result = train_strategy_head(name, fit, out, labels, encoders, params, device)
        logits = predict_logits(head.cpu(), out, present=out.presence(head.modalities))
    return FoldFit(head.cpu().eval(), logits, result.best_epoch)


def cross_validate(
    names: list[str],
    data: FeatureSet,
    folds: list[np.ndarray],
    labels: list[str],
    encoders: dict[str, dict],
    params: Params,
    metric: str,
) -> list[CVResult]:
    """Each strategy of `names` trained on each fold's complement (one trial per strategy and fold, on the
    engine params.compute names); per strategy, its OOF logits over `data` and per-fold scores."""
    trials = [(name, k) for name in names for k in range(len(folds))]
    fits = map_tasks(fit_fold, trials, params.compute, "cv-fold", progress=f"cv: {len(names)} strategies x {len(folds)} folds",
                     data=data, folds=folds, labels=labels, encoders=encoders, params=params)  # fmt: skip
    k = len(folds)
    return [collect_folds(name, fits[i * k : (i + 1) * k], data, folds, metric) for i, name in enumerate(names)]


def collect_folds(name: str, fits: list[FoldFit], data: FeatureSet, folds: list[np.ndarray], metric: str) -> CVResult:
    """One strategy's fold trials as its CVResult (late_stacking: its meta-classifier refitted on the OOF outputs)."""
    oof = np.zeros((len(data), fits[0].oof_logits.shape[1]), dtype=np.float32)
    for fitted, held in zip(fits, folds):
        oof[held] = fitted.oof_logits
    heads, epochs = [f.head for f in fits], [f.best_epoch for f in fits]
    cv = CVResult(name, oof, fold_scores(oof, data.y.numpy(), folds, metric), heads, epochs)
    if name == "late_stacking":
        refit_stacking_meta(cv, data, folds, metric)
    log.info("cv %-16s %s %.4f +- %.4f over %d folds", name, metric, cv.mean, cv.std, len(folds))
    return cv


def stacking_features(head: FusionHead, data: FeatureSet) -> torch.Tensor:
    """What late_stacking's meta-classifier reads: masked expert log-probabilities + presence flags."""
    with torch.no_grad():
        present = data.presence(head.modalities)
        experts = head.expert_logits({m: data.x[m] for m in head.modalities}, present)
        logp = torch.stack([torch.log_softmax(experts[m], dim=-1) for m in head.modalities], dim=1)
        logp = logp * present.unsqueeze(-1)
        return torch.cat([logp.flatten(1), present.to(logp.dtype)], dim=1)


def fit_meta(features: torch.Tensor, y: torch.Tensor, init: nn.Linear, l2: float = 1e-3) -> nn.Linear:
    """A multinomial logistic regression (L-BFGS, small L2), started from `init`'s weights."""
    meta = nn.Linear(init.in_features, init.out_features)
    meta.load_state_dict(init.state_dict())
    opt = torch.optim.LBFGS(meta.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(meta(features), y) + l2 * meta.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return meta.eval()


def refit_stacking_meta(cv: CVResult, data: FeatureSet, folds: list[np.ndarray], metric: str) -> None:
    """Meta-classifier on OOF expert outputs: cross-fitted for the OOF scores, then on all rows for the bag."""
    features = torch.zeros(len(data), cv.heads[0].meta.in_features)
    for head, held in zip(cv.heads, folds):
        features[held] = stacking_features(head, data.subset(held))
    y = data.y
    everything = np.arange(len(data))
    oof = np.zeros_like(cv.oof_logits)
    for head, held in zip(cv.heads, folds):
        rest = torch.as_tensor(np.setdiff1d(everything, held))
        meta = fit_meta(features[rest], y[rest], head.meta)
        with torch.no_grad():
            oof[held] = meta(features[torch.as_tensor(held)]).numpy()
    final = fit_meta(features, y, cv.heads[0].meta)
    for head in cv.heads:
        head.meta.load_state_dict(final.state_dict())
    cv.oof_logits = oof
    cv.fold_scores = fold_scores(oof, y.numpy(), folds, metric)


def bag(heads: list[FusionHead], weights: list[float] | None = None) -> FusionHead:
    """The fold models (or any heads over the same label map) as one `ensemble` head."""
    first = heads[0]
    dims = {}
    for h in heads:
        dims.update(h.dims)
    return create_head(
        "ensemble", dims=dims, num_classes=first.num_classes, hidden_dim=first.hidden_dim,
        dropout=first.dropout, members=[h.config for h in heads], weights=weights,
    ).eval()  # fmt: skip


def load_bag_weights(bagged: FusionHead, heads: list[FusionHead]) -> FusionHead:
    """Copy the trained members' weights into a freshly built bag."""
    for member, head in zip(bagged.members, heads):
        member.load_state_dict(head.state_dict())
    return bagged.eval()

"""The train loop over cached features: AdamW, warm-up + cosine, modality dropout, early stopping on val macro-F1."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from mmfusion.config import TrainParams
from mmfusion.fusion import FusionHead, FusionOutput
from mmfusion.training.data import FeatureSet
from mmfusion.training.metrics import macro_f1

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Same seed, same model on CPU (the CPU kernels used here are deterministic; CUDA may differ slightly)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def drop_modalities(present: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Hide one random modality in a `p` share of rows (only rows that have more than one), so heads learn to cope."""
    if p <= 0 or present.shape[1] < 2:
        return present
    rows = present.shape[0]
    drop = (torch.rand(rows, generator=generator) < p) & (present.sum(dim=1) > 1)
    which = torch.randint(present.shape[1], (rows,), generator=generator)
    out = present.clone()
    out[drop.nonzero(as_tuple=True)[0], which[drop]] = False
    # a row must keep at least one modality
    empty = ~out.any(dim=1)
    out[empty] = present[empty]
    return out


def compute_loss(
    out: FusionOutput, y: Tensor, criterion: nn.Module, aux_weight: float = 1.0
) -> Tensor:
    """The head's loss plus, for late fusion, each expert's own loss on the rows that have its modality."""
    loss = criterion(out.logits.float(), y)
    if out.aux_logits and aux_weight > 0:
        aux = []
        for i, logits in enumerate(out.aux_logits.values()):
            rows = out.present[:, i]
            if rows.any():
                aux.append(criterion(logits[rows].float(), y[rows]))
        if aux:
            loss = loss + aux_weight * torch.stack(aux).mean()
    return loss


def class_weights(y: Tensor, num_classes: int) -> Tensor:
    """Inverse-frequency weights, mean 1 (classes absent from training get weight 1)."""
    counts = torch.bincount(y, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), torch.ones_like(counts))
    return w / w.mean()


@torch.no_grad()
def predict_logits(
    head: FusionHead, data: FeatureSet, present: Tensor | None = None, device: torch.device | None = None, batch: int = 1024
) -> np.ndarray:
    """Logits `[N, C]` in eval mode; `present` ([N, M] bool) hides modalities, e.g. for ablations."""
    device = device or next(head.parameters()).device
    head.eval()
    present = present if present is not None else torch.ones(len(data), len(head.modalities), dtype=torch.bool)
    chunks = []
    for start in range(0, len(data), batch):
        sl = slice(start, start + batch)
        x = {m: data.x[m][sl].to(device) for m in head.modalities}
        chunks.append(head(x, present[sl].to(device)).logits.float().cpu())
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, head.num_classes), dtype=np.float32)


@dataclass
class TrainResult:
    state_dict: dict[str, Tensor]
    best_epoch: int
    best_val_macro_f1: float
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def _schedule(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def build_optimizer(head: FusionHead, p: TrainParams, train_rows: int):
    """AdamW with a linear warm-up then cosine decay, stepped once per batch; returns (optimizer, scheduler)."""
    # a model with parts at their own rates (finetune.TunedModel: encoder tops) gives its parameter groups
    groups = head.param_groups(p.lr) if hasattr(head, "param_groups") else head.parameters()
    optimizer = torch.optim.AdamW(groups, lr=p.lr, weight_decay=p.weight_decay, foreach=True)
    steps_per_epoch = max(1, math.ceil(train_rows / p.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(p.warmup_epochs * steps_per_epoch, p.epochs * steps_per_epoch)
    )
    return optimizer, scheduler


def train_epoch(
    head: FusionHead,
    x: dict[str, Tensor],
    y: Tensor,
    present: Tensor,
    order: Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    p: TrainParams,
) -> float:
    """One pass over the training rows in `order` (x, y on the head's device); returns the mean loss."""
    device = y.device
    head.train()
    total, seen = 0.0, 0
    for start in range(0, len(order), p.batch_size):
        idx = order[start : start + p.batch_size]
        idx_d = idx.to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = head({m: t[idx_d] for m, t in x.items()}, present[idx].to(device))
        loss = compute_loss(out, y[idx_d], criterion, p.aux_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


def validation_scores(head: FusionHead, val: FeatureSet, device: torch.device) -> dict[str, float]:
    """val loss, accuracy and macro-F1 (the early-stopping metric) of the head as it is now."""
    logits = predict_logits(head, val, device=device)
    pred = logits.argmax(axis=1)
    y = val.y.numpy()
    return {
        "val_loss": float(nn.functional.cross_entropy(torch.from_numpy(logits), val.y)),
        "val_accuracy": float((pred == y).mean()),
        "val_macro_f1": macro_f1(y, pred, head.num_classes),
    }


def train_head(head: FusionHead, train: FeatureSet, val: FeatureSet, p: TrainParams, device: torch.device) -> TrainResult:
    """Train `head` in place; returns the best-on-val weights (by macro-F1) and the per-epoch history.

    Stops after `p.patience` epochs without a better val macro-F1; the same seed gives the same weights on CPU.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(p.seed)
    head.to(device)
    weight = class_weights(train.y, head.num_classes).to(device) if p.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=p.label_smoothing)
    optimizer, scheduler = build_optimizer(head, p, len(train))
    x_train = {m: train.x[m].to(device) for m in head.modalities}
    y_train = train.y.to(device)
    all_present = torch.ones(len(train), len(head.modalities), dtype=torch.bool)
    best_f1, best_epoch, best_state, stale = -1.0, 0, None, 0
    history: list[dict] = []
    epoch = 0
    for epoch in range(1, p.epochs + 1):
        order = torch.randperm(len(train), generator=generator)
        present = drop_modalities(all_present, p.modality_dropout, generator)
        train_loss = train_epoch(head, x_train, y_train, present, order, criterion, optimizer, scheduler, p)
        scores = validation_scores(head, val, device)
        history.append(
            {"epoch": epoch, "train_loss": train_loss, **scores, "lr": float(scheduler.get_last_lr()[0])}
        )
        if scores["val_macro_f1"] > best_f1:
            best_f1, best_epoch, stale = scores["val_macro_f1"], epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in head.state_dict().items()})
        else:
            stale += 1
            if stale >= p.patience:
                break
    assert best_state is not None
    head.load_state_dict(best_state)
    return TrainResult(
        state_dict=best_state,
        best_epoch=best_epoch,
        best_val_macro_f1=best_f1,
        epochs_run=epoch,
        seconds=time.perf_counter() - start,
        history=history,
    )

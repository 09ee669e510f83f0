"""`ensemble`: a weighted average of member heads' probabilities, itself a head.

Evaluate builds it (it is not trained by gradient): a *bag* is the k fold models of one
strategy under cross-validation (equal weights), and the `ensemble` strategy is a greedy
(Caruana) selection over the strategies' out-of-fold predictions, whose members are those bags.
Its config lists every member's own config, and its state dict holds their weights, so
`create_head(**config)` + `load_state_dict` (the checkpoint path the Predictor uses) rebuild it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmfusion.fusion.base import FusionHead, FusionOutput
from mmfusion.fusion.registry import create_head, register_head

# without explicit members (e.g. the registry-wide tests): an early and a late fusion head
DEFAULT_MEMBERS = ({"name": "concat"}, {"name": "late"})


@register_head("ensemble")
class EnsembleHead(FusionHead):
    """sum_i w_i * softmax(member_i) over the members that have a modality present in the row (weights renormalised)."""

    def __init__(
        self,
        dims,
        num_classes,
        hidden_dim=256,
        dropout=0.2,
        members: list[dict[str, Any]] | tuple = (),
        weights: list[float] | None = None,
    ):
        specs = [dict(m) for m in (members or DEFAULT_MEMBERS)]
        for spec in specs:
            spec.setdefault("dims", dict(dims))
            spec.setdefault("num_classes", num_classes)
            spec.setdefault("hidden_dim", hidden_dim)
            spec.setdefault("dropout", dropout)
        heads = [create_head(**spec) for spec in specs]
        weights = [1.0] * len(heads) if weights is None else [float(w) for w in weights]
        if len(weights) != len(heads) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"ensemble: need one non-negative weight per member ({len(heads)}), got {weights}")
        for h in heads:
            if h.num_classes != num_classes or not set(h.modalities) <= set(dims):
                raise ValueError(f"ensemble: member {h.name} does not fit dims {sorted(dims)} / {num_classes} classes")
        super().__init__(dims, num_classes, hidden_dim, dropout, members=[h.config for h in heads], weights=weights)
        self.members = nn.ModuleList(heads)
        self.register_buffer("mix", torch.tensor(weights, dtype=torch.float32) / sum(weights))
        self.unimodal = all(h.unimodal for h in heads)

    def forward(self, embeddings, present=None) -> FusionOutput:
        present = self.presence(embeddings, present)
        x = self.inputs(embeddings, present.shape[0])
        total, weight = 0.0, torch.zeros(present.shape[0], 1, device=present.device)
        for w, head in zip(self.mix, self.members):
            cols = [self.modalities.index(m) for m in head.modalities]
            member_present = present[:, cols]
            out = head({m: x[m] for m in head.modalities}, member_present)
            usable = member_present.any(dim=1, keepdim=True).to(out.logits.dtype) * w
            total = total + usable * torch.softmax(out.logits.float(), dim=-1)
            weight = weight + usable
        probs = total / weight.clamp_min(1e-12)
        return FusionOutput(logits=torch.log(probs.clamp_min(1e-12)), present=present)

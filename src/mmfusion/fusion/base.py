"""What every fusion head shares: the input contract, the output, and the building blocks.

A head takes `{modality: embedding [B, dim]}` plus `present`, a bool mask `[B, M]`
(column order = `head.modalities`) saying which modality each row really has. A
missing modality is never guessed from its values: its rows may hold anything
(zeros by convention) and the head ignores them, through a learned "missing"
token, a masked softmax or by leaving that modality out of an average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmfusion.errors import UserError


@dataclass
class FusionOutput:
    """Logits plus what the head can say about how it used each modality."""

    logits: Tensor  # [B, C]
    present: Tensor  # [B, M] bool, column order = head.modalities
    weights: Tensor | None = None  # [B, M] per-sample modality weights (attention, gates, late weights); 0 if missing
    aux_logits: dict[str, Tensor] | None = None  # per-modality logits with their own loss (late fusion)


def build_projector(dim: int, hidden_dim: int, dropout: float) -> nn.Module:
    """Normalise a frozen embedding and project it to the head's width (encoders differ in scale)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout))


def build_classifier(in_dim: int, hidden_dim: int, num_classes: int, dropout: float) -> nn.Module:
    """The MLP every head ends with, so strategies differ only in how they fuse."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes)
    )


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over `dim` where masked-out entries get exactly 0 (rows with nothing present give 0s)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=dim), nan=0.0)


class FusionHead(nn.Module):
    """Base class: remembers how it was built (`config`) so a checkpoint can rebuild it by name."""

    name = "fusion"
    unimodal = False  # baselines that look at one modality only

    def __init__(self, dims: dict[str, int], num_classes: int, hidden_dim: int = 256, dropout: float = 0.2, **options):
        super().__init__()
        if not dims:
            raise UserError("a fusion head needs at least one modality")
        if num_classes < 2:
            raise UserError(f"num_classes must be at least 2, got {num_classes}")
        self.dims = {str(m): int(d) for m, d in dims.items()}
        self.modalities: tuple[str, ...] = tuple(self.dims)
        self.num_classes = int(num_classes)
        self.hidden_dim = int(hidden_dim)
        self.dropout = float(dropout)
        self.options: dict[str, Any] = dict(options)

    @property
    def config(self) -> dict[str, Any]:
        """Everything `create_head(**config)` needs to rebuild this head (JSON-able)."""
        return {
            "name": self.name,
            "dims": dict(self.dims),
            "num_classes": self.num_classes,
            "hidden_dim": self.hidden_dim,
            "dropout": self.dropout,
            **self.options,
        }

    def presence(self, embeddings: dict[str, Tensor], present: Tensor | dict[str, Tensor] | None) -> Tensor:
        """The `[B, M]` bool mask: given, or all-present for every modality found in `embeddings`."""
        batch = next(iter(embeddings.values())).shape[0]
        device = next(iter(embeddings.values())).device
        if present is None:
            cols = [torch.full((batch,), m in embeddings, dtype=torch.bool, device=device) for m in self.modalities]
            return torch.stack(cols, dim=1)
        if isinstance(present, dict):
            cols = [
                torch.as_tensor(present[m], dtype=torch.bool, device=device)
                if m in present
                else torch.zeros(batch, dtype=torch.bool, device=device)
                for m in self.modalities
            ]
            present = torch.stack(cols, dim=1)
        present = present.to(device=device, dtype=torch.bool)
        missing_inputs = [i for i, m in enumerate(self.modalities) if m not in embeddings]
        if missing_inputs:
            present = present.clone()
            present[:, missing_inputs] = False
        return present

    def inputs(self, embeddings: dict[str, Tensor], batch: int) -> dict[str, Tensor]:
        """Every modality's embedding; one absent from the dict is zeros (its presence column is False)."""
        ref = next(iter(embeddings.values()))
        return {
            m: embeddings[m] if m in embeddings else ref.new_zeros(batch, self.dims[m]) for m in self.modalities
        }

    def forward(
        self, embeddings: dict[str, Tensor], present: Tensor | dict[str, Tensor] | None = None
    ) -> FusionOutput:  # pragma: no cover - abstract
        raise NotImplementedError

"""The fusion strategies. Every head is N-modality generic; a unimodal baseline is one per modality.

All heads project each modality with the same projector (LayerNorm, Linear, GELU) and
end with the same classifier MLP, so they differ only in how they fuse.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmfusion.fusion.base import FusionHead, FusionOutput, build_classifier, build_projector, masked_softmax
from mmfusion.errors import UserError
from mmfusion.fusion.registry import register_head, register_unimodal, unimodal_name


class _Projected(FusionHead):
    """A head with one projector per modality and a learned token standing in for a missing modality."""

    # Heads that mask missing modalities out (softmax, key padding) need no stand-in token.
    missing_token = True

    def __init__(self, dims, num_classes, hidden_dim=256, dropout=0.2, **options):
        super().__init__(dims, num_classes, hidden_dim, dropout, **options)
        self.projectors = nn.ModuleDict({m: build_projector(d, hidden_dim, dropout) for m, d in self.dims.items()})
        if self.missing_token:
            self.missing = nn.Parameter(torch.zeros(len(self.modalities), hidden_dim))

    def tokens(self, embeddings: dict[str, Tensor], present: Tensor) -> Tensor:
        """`[B, M, H]` projected modality tokens (the learned missing token where a modality is absent)."""
        x = self.inputs(embeddings, present.shape[0])
        toks = torch.stack([self.projectors[m](x[m]) for m in self.modalities], dim=1)
        if not self.missing_token:
            return toks * present.unsqueeze(-1)
        return torch.where(present.unsqueeze(-1), toks, self.missing.unsqueeze(0).to(toks.dtype))


@register_unimodal
class UnimodalHead(FusionHead):
    """Baseline `<modality>_only`: one modality, the same projector + classifier capacity as the fusion heads."""

    unimodal = True

    def __init__(self, dims, num_classes, hidden_dim=256, dropout=0.2, modality: str = ""):
        super().__init__(dims, num_classes, hidden_dim, dropout)  # the name carries the modality
        self.modality = modality
        self.name = unimodal_name(modality)
        if self.modality not in self.dims:
            raise UserError(f"{self.name} needs modality {self.modality!r}; features have {list(self.dims)}")
        self.projector = build_projector(self.dims[self.modality], hidden_dim, dropout)
        self.classifier = build_classifier(hidden_dim, hidden_dim, num_classes, dropout)

    def forward(self, embeddings, present=None) -> FusionOutput:
        present = self.presence(embeddings, present)
        x = self.inputs(embeddings, present.shape[0])[self.modality]
        col = present[:, self.modalities.index(self.modality)]
        # Without its modality a baseline knows nothing: uniform logits.
        logits = self.classifier(self.projector(x)) * col.unsqueeze(-1)
        weights = torch.zeros(present.shape, dtype=logits.dtype, device=logits.device)
        weights[:, self.modalities.index(self.modality)] = col.to(logits.dtype)
        return FusionOutput(logits=logits, present=present, weights=weights)




@register_head("concat")
class ConcatHead(_Projected):
    """Early (feature-level) fusion: project, concatenate, MLP."""

    def __init__(self, dims, num_classes, hidden_dim=256, dropout=0.2):
        super().__init__(dims, num_classes, hidden_dim, dropout)
        self.classifier = build_classifier(hidden_dim * len(self.modalities), hidden_dim, num_classes, dropout)

    def forward(self, embeddings, present=None) -> FusionOutput:
        present = self.presence(embeddings, present)
        toks = self.tokens(embeddings, present)
        return FusionOutput(logits=self.classifier(toks.flatten(1)), present=present)


@register_head("weighted_sum")
class WeightedSumHead(_Projected):
    """Feature pooling with lambda weights: sum of projected tokens, weights fixed or a learned softmax.

    `weights` ({modality: float}) fixes the lambdas; empty learns them. Either way they are
    renormalised over the modalities a sample has.
    """

    missing_token = False

    def __init__(self, dims, num_classes, hidden_dim=256, dropout=0.2, weights: dict[str, float] | None = None):
        weights = {str(k): float(v) for k, v in (weights or {}).items()}
        super().__init__(dims, num_classes, hidden_dim, dropout, weights=weights)
        if weights:
            unknown = sorted(set(weights) - set(self.modalities))
            if unknown or any(v < 0 for v in weights.values()) or sum(weights.values()) <= 0:
                raise UserError(f"weighted_sum weights must be >= 0 over {list(self.modalities)}, got {weights}")
            self.register_buffer("fixed", torch.tensor([weights.get(m, 0.0) for m in self.modalities]))
            self.lambdas = None
        else:
            self.fixed = None
            self.lambdas = nn.Parameter(torch.zeros(len(self.modalities)))
        self.classifier = build_classifier(hidden_dim, hidden_dim, num_classes, dropout)

    def forward(self, embeddings, present=None) -> FusionOutput:
        present = self.presence(embeddings, present)
        toks = self.tokens(embeddings, present)
        if self.lambdas is not None:
            w = masked_softmax(self.lambdas.expand(present.shape), present)
        else:
            w = self.fixed.expand(present.shape) * present
            w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        fused = (w.unsqueeze(-1) * toks).sum(dim=1)
        return FusionOutput(logits=self.classifier(fused), present=present, weights=w)


@register_head("gated")
class GatedHead(_Projected):
    """Gated multimodal unit (Arevalo et al. 2017), generalised to N modalities.

    h_m = tanh(W_m x_m); z = softmax over modalities of W_z [x_1; ...; x_M] (per hidden unit);
    fused = sum_m z_m * h_m. The per-sample modality weight reported is z_m averaged over units.
    """

    missing_token = False  # a missing modality's gate is masked to 0, and it enters the gate input as zeros

    def __init__(self, dims, num_classes, hidden_dim=256, dropout=0.2):
        super().__init__(dims, num_classes, hidden_dim, dropout)
        self.transforms = nn.ModuleDict({m: nn.Linear(hidden_dim, hidden_dim) for m in self.modalities})
        self.gate = nn.Linear(hidden_dim * len(self.modalities), hidden_dim * len(self.modalities))
        self.classifier = build_classifier(hidden_dim, hidden_dim, num_classes, dropout)

    def forward(self, embeddings, present=None) -> FusionOutput:
        present = self.presence(embeddings, present)
        toks = self.tokens(embeddings, present)
        h = torch.stack([torch.tanh(self.transforms[m](toks[:, i])) for i, m in enumerate(self.modalities)], dim=1)
        z = self.gate(toks.flatten(1)).view_as(h)
        z = masked_softmax(z, present.unsqueeze(-1).expand_as(z), dim=1)
        fused = (z * h).sum(dim=1)
        return FusionOutput(logits=self.classifier(fused), present=present, weights=z.mean(dim=-1))


@register_head("attention")
class AttentionHead(_Projected):
    """Modality-level attention: a learned query scores each modality token (scaled dot product)."""

    missing_token = False

    def __init__(self, dims, num_classes, hidden_dim=256, dropout=0.2):
        super().__init__(dims, num_classes, hidden_dim, dropout)
        self.kind = nn.Parameter(torch.randn(len(self.modalities), hidden_dim) * 0.02)  # modality-type embedding
        self.query = nn.Parameter(torch.randn(hidden_dim) * 0.02)
        self.key = nn.Linear(hidden_dim, hidden_dim)
        self.value = nn.Linear(hidden_dim, hidden_dim)
        self.classifier = build_classifier(hidden_dim, hidden_dim, num_classes, dropout)

    def forward(self, embeddings, present=None) -> FusionOutput:
        present = self.presence(embeddings, present)
        toks = self.tokens(embeddings, present) + self.kind
        scores = self.key(toks) @ self.query / math.sqrt(self.hidden_dim)  # [B, M]
        w = masked_softmax(scores, present)
        fused = (w.unsqueeze(-1) * self.value(toks)).sum(dim=1)
        return FusionOutput(logits=self.classifier(fused), present=present, weights=w)


class _Block(nn.Module):
    """Pre-norm transformer block that also returns its attention weights (averaged over heads)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        h = self.norm1(x)
        out, attn = self.attn(h, h, h, key_padding_mask=padding, need_weights=True, average_attn_weights=True)
        x = x + out
        return x + self.mlp(self.norm2(x)), attn


@register_head("cross_attention")
class CrossAttentionHead(_Projected):
    """A small transformer over [CLS] + modality tokens: every modality attends to every other.

    Missing modalities are masked out of attention (key padding). The reported weights are the
    [CLS] token's last-layer attention over the modality tokens, renormalised.
    """

    missing_token = False

    def __init__(self, dims, num_classes, hidden_dim=256, dropout=0.2, layers: int = 1, heads: int = 4):
        super().__init__(dims, num_classes, hidden_dim, dropout, layers=int(layers), heads=int(heads))
        if hidden_dim % heads:
            raise UserError(f"cross_attention: hidden_dim {hidden_dim} is not divisible by heads {heads}")
        self.cls = nn.Parameter(torch.randn(hidden_dim) * 0.02)
        self.kind = nn.Parameter(torch.randn(len(self.modalities), hidden_dim) * 0.02)
        self.blocks = nn.ModuleList([_Block(hidden_dim, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = build_classifier(hidden_dim, hidden_dim, num_classes, dropout)

    def forward(self, embeddings, present=None) -> FusionOutput:
        present = self.presence(embeddings, present)
        toks = self.tokens(embeddings, present) + self.kind
        x = torch.cat([self.cls.expand(toks.shape[0], 1, -1), toks], dim=1)
        padding = torch.cat([present.new_zeros(present.shape[0], 1), ~present], dim=1)
        attn = None
        for block in self.blocks:
            x, attn = block(x, padding)
        w = attn[:, 0, 1:] * present
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return FusionOutput(logits=self.classifier(self.norm(x[:, 0])), present=present, weights=w)


class _LateBase(FusionHead):
    """Decision-level fusion: a full classifier per modality, each also trained on its own (aux) loss."""

    def __init__(self, dims, num_classes, hidden_dim=256, dropout=0.2, **options):
        super().__init__(dims, num_classes, hidden_dim, dropout, **options)
        self.experts = nn.ModuleDict(
            {
                m: nn.Sequential(build_projector(d, hidden_dim, dropout), build_classifier(hidden_dim, hidden_dim, num_classes, dropout))
                for m, d in self.dims.items()
            }
        )

    def expert_logits(self, embeddings, present) -> dict[str, Tensor]:
        x = self.inputs(embeddings, present.shape[0])
        return {m: self.experts[m](x[m]) for m in self.modalities}


@register_head("late")
class LateHead(_LateBase):
    """Average of per-modality log-probabilities (`combine: mean`) or a learned softmax weighting (`learned`)."""

    def __init__(self, dims, num_classes, hidden_dim=256, dropout=0.2, combine: str = "mean"):
        if combine not in ("mean", "learned"):
            raise UserError(f"late: combine must be mean or learned, got {combine!r}")
        super().__init__(dims, num_classes, hidden_dim, dropout, combine=combine)
        if combine == "learned":
            self.lambdas = nn.Parameter(torch.zeros(len(self.modalities)))
        else:
            self.register_buffer("lambdas", torch.zeros(len(self.modalities)))

    def forward(self, embeddings, present=None) -> FusionOutput:
        present = self.presence(embeddings, present)
        experts = self.expert_logits(embeddings, present)
        logp = torch.stack([torch.log_softmax(experts[m], dim=-1) for m in self.modalities], dim=1)  # [B, M, C]
        w = masked_softmax(self.lambdas.expand(present.shape), present)
        logits = (w.unsqueeze(-1) * logp).sum(dim=1)
        return FusionOutput(logits=logits, present=present, weights=w, aux_logits=experts)


@register_head("late_stacking")
class StackingHead(_LateBase):
    """Stacking: a linear meta-classifier over the experts' (detached) log-probabilities and presence flags.

    The experts learn only from their own losses; the meta-classifier learns how far to trust each.
    """

    def __init__(self, dims, num_classes, hidden_dim=256, dropout=0.2):
        super().__init__(dims, num_classes, hidden_dim, dropout)
        m = len(self.modalities)
        self.meta = nn.Linear(m * num_classes + m, num_classes)
        # Start as the plain average of the experts' log-probabilities; training learns the departures.
        with torch.no_grad():
            self.meta.weight.zero_()
            self.meta.bias.zero_()
            for i in range(m):
                self.meta.weight[:, i * num_classes : (i + 1) * num_classes] = torch.eye(num_classes) / m

    def forward(self, embeddings, present=None) -> FusionOutput:
        present = self.presence(embeddings, present)
        experts = self.expert_logits(embeddings, present)
        logp = torch.stack([torch.log_softmax(experts[m], dim=-1).detach() for m in self.modalities], dim=1)
        logp = logp * present.unsqueeze(-1)
        features = torch.cat([logp.flatten(1), present.to(logp.dtype)], dim=1)
        return FusionOutput(logits=self.meta(features), present=present, aux_logits=experts)

"""Missing modalities in the data itself, through the train loop.

`training.loop.train_head` feeds each head an all-present mask (then hides one modality in
`train.modality_dropout` of the rows). For data whose rows lack a modality, the mask must say
so. The loop takes no mask, so the data carries it in: `mark_missing` puts NaN in the rows of a
missing modality, and `presence_from_nan` (a forward pre-hook on the head) turns those rows
back into zeros with their presence column False before the head sees them. The head still
learns from the mask only, exactly as it is fed at serving time (zeros + mask).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mmfusion.fusion import FusionHead
from mmfusion.training.data import FeatureSet


def mark_missing(data: FeatureSet) -> FeatureSet:
    """A copy of `data` whose missing-modality rows are NaN (unchanged when every row is complete)."""
    if data.complete:
        return data
    present = data.presence()
    x = {}
    for j, (m, a) in enumerate(data.x.items()):
        a = a.clone()
        a[~present[:, j]] = float("nan")
        x[m] = a
    return FeatureSet(x=x, y=data.y, ids=data.ids, present=data.present, groups=data.groups)


def _pre_hook(head: FusionHead, args: tuple) -> tuple:
    embeddings, present = args[0], (args[1] if len(args) > 1 else None)
    mask = head.presence(embeddings, present).clone()
    first = next(iter(embeddings.values()))
    has = torch.stack(
        [
            ~torch.isnan(embeddings[m]).any(dim=1) if m in embeddings else torch.zeros(len(first), dtype=torch.bool, device=first.device)
            for m in head.modalities
        ],
        dim=1,
    )
    mask &= has
    # a row keeps at least one modality: if modality dropout hid the only one it has, undo that
    empty = ~mask.any(dim=1)
    mask[empty] = has[empty]
    cleaned = {m: torch.nan_to_num(e, nan=0.0) for m, e in embeddings.items()}
    return (cleaned, mask, *args[2:])


@contextmanager
def presence_from_nan(head: FusionHead) -> Iterator[None]:
    """While active, NaN rows in the head's inputs are missing modalities (see `mark_missing`)."""
    handle = head.register_forward_pre_hook(_pre_hook)
    try:
        yield
    finally:
        handle.remove()

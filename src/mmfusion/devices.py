"""The torch device a `device` param names: one rule for featurize, train, evaluate and serving."""

from __future__ import annotations

import torch

from mmfusion.errors import UserError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error, not a silent CPU run."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available here; use device: auto or cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"unknown device {name!r}; expected auto, cpu or cuda[:N]")
    return torch.device(name)

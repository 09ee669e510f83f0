"""name -> fusion head class; `create_head` fails loudly on an unknown name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmfusion.fusion.base import FusionHead

_HEADS: dict[str, Callable[..., FusionHead]] = {}


def register_head(name: str) -> Callable[[type[FusionHead]], type[FusionHead]]:
    """Class decorator: make a head available to params.yaml under `name`."""

    def wrap(cls: type[FusionHead]) -> type[FusionHead]:
        if name in _HEADS:
            raise ValueError(f"fusion head {name!r} is already registered")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return wrap


def list_heads() -> list[str]:
    """Every registered fusion strategy name (unimodal baselines included)."""
    return sorted(_HEADS)


def create_head(name: str, dims: dict[str, int], num_classes: int, **options: Any) -> FusionHead:
    """Build the head registered as `name` over modalities `dims` ({modality: embedding dim})."""
    if name not in _HEADS:
        raise ValueError(f"unknown fusion head {name!r}; registered: {', '.join(list_heads())}")
    return _HEADS[name](dims=dims, num_classes=num_classes, **options)

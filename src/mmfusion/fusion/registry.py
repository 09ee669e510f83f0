"""Fusion strategies by name: `create_head` builds the head a strategy name stands for, and fails
loudly on an unknown name.

Two kinds of names: the fusion heads registered with `register_head` (`concat`, `gated`, ...),
which take every modality they are given, and the unimodal baselines `<modality>_only`, one for
each modality of the features (`image_only`, `text_only`; `audio_only` once there is audio).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from mmfusion.errors import UserError
from mmfusion.fusion.base import FusionHead

_HEADS: dict[str, Callable[..., FusionHead]] = {}
TUNED_PREFIX = "tuned_"  # tuned_<strategy>: that head trained with the top of its encoders (training.finetune)
_UNIMODAL: list[type[FusionHead]] = []  # the baseline class behind every `<modality>_only`
UNIMODAL_SUFFIX = "_only"


def register_head(name: str) -> Callable[[type[FusionHead]], type[FusionHead]]:
    """Class decorator: make a fusion head available to `train.strategies` under `name`."""

    def wrap(cls: type[FusionHead]) -> type[FusionHead]:
        if name in _HEADS or name.endswith(UNIMODAL_SUFFIX):
            raise ValueError(f"fusion strategy {name!r} is already registered or ends with {UNIMODAL_SUFFIX!r}")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return wrap


def register_unimodal(cls: type[FusionHead]) -> type[FusionHead]:
    """Class decorator: the baseline built for `<modality>_only`; its constructor takes `modality`."""
    _UNIMODAL[:] = [cls]
    return cls


def unimodal_name(modality: str) -> str:
    """The strategy name of the baseline that looks at `modality` only."""
    return f"{modality}{UNIMODAL_SUFFIX}"


def is_tuned(name: str) -> bool:
    """Strategy `name` fine-tunes its encoders' tops (`tuned_<strategy>`)."""
    return name.startswith(TUNED_PREFIX)


def base_strategy(name: str) -> str:
    """The head a strategy name builds: tuned_weighted_sum -> weighted_sum (others: themselves)."""
    return name[len(TUNED_PREFIX) :] if is_tuned(name) else name


def list_heads(modalities: Iterable[str] = ()) -> list[str]:
    """Every strategy name for features with `modalities`: the fusion heads plus one `<modality>_only`
    baseline per modality (with no modalities, only the fusion heads)."""
    return sorted(set(_HEADS) | {unimodal_name(m) for m in modalities})


def create_head(name: str, dims: dict[str, int], num_classes: int, **options: Any) -> FusionHead:
    """Build the head of strategy `name` over modalities `dims` ({modality: embedding dim})."""
    if name in _HEADS:
        return _HEADS[name](dims=dims, num_classes=num_classes, **options)
    if name.endswith(UNIMODAL_SUFFIX) and _UNIMODAL and name[: -len(UNIMODAL_SUFFIX)] in dims:
        return _UNIMODAL[0](dims=dims, num_classes=num_classes, modality=name[: -len(UNIMODAL_SUFFIX)], **options)
    raise UserError(f"unknown fusion strategy {name!r}; registered: {', '.join(list_heads(dims))}")

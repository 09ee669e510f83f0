"""The encoder registry: name -> factory. Unknown names fail loudly and list what exists.

A modality is just the `modality` attribute of an encoder: a third modality (audio, tabular)
is a new `register_encoder` entry, not a rewrite. Names with a prefix (`hf:<model id>`,
`torchvision:<model>`) go to a prefix factory; they need a model hub and fail fast offline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmfusion.encoders.base import Encoder
from mmfusion.errors import UserError

Factory = Callable[..., Encoder]


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    modality: str
    factory: Factory
    offline: bool  # True: weights ship with an installed package; tests run every such entry


_ENCODERS: dict[str, EncoderEntry] = {}
_PREFIXES: dict[str, tuple[str, Factory]] = {}


def register_encoder(name: str, modality: str, factory: Factory, offline: bool = True) -> None:
    """Add a named encoder; `factory(device=..., batch_size=...)` must return an Encoder."""
    if name in _ENCODERS:
        raise ValueError(f"encoder {name!r} is already registered")
    _ENCODERS[name] = EncoderEntry(name, modality, factory, offline)


def unregister_encoder(name: str) -> None:
    """Remove a named encoder (plugins and tests that register their own)."""
    _ENCODERS.pop(name, None)


def register_prefix(prefix: str, modality: str, factory: Factory) -> None:
    """Add a family of hub encoders: `<prefix>:<id>` calls `factory(id, device=..., batch_size=...)`."""
    _PREFIXES[prefix] = (modality, factory)


def list_encoders(modality: str | None = None, offline_only: bool = False) -> list[str]:
    """Registered encoder names (optionally of one modality, or only those usable offline)."""
    return sorted(
        e.name
        for e in _ENCODERS.values()
        if (modality is None or e.modality == modality) and (e.offline or not offline_only)
    )


def encoder_modality(name: str) -> str:
    """The modality an encoder name produces, without building it."""
    if name in _ENCODERS:
        return _ENCODERS[name].modality
    prefix = name.split(":", 1)[0]
    if ":" in name and prefix in _PREFIXES:
        return _PREFIXES[prefix][0]
    raise UserError(_unknown(name))


def create_encoder(name: str, device: str = "auto", batch_size: int | None = None) -> Encoder:
    """Build an encoder by name (weights load lazily on the first encode).

    Example:
        >>> enc = create_encoder("minilm_l6", device="cpu")
        >>> enc.encode(["a red apple"]).shape
        torch.Size([1, 384])
    """
    if name in _ENCODERS:
        return _ENCODERS[name].factory(device=device, batch_size=batch_size)
    prefix, _, ident = name.partition(":")
    if ident and prefix in _PREFIXES:
        return _PREFIXES[prefix][1](ident, device=device, batch_size=batch_size)
    raise UserError(_unknown(name))


def _unknown(name: str) -> str:
    prefixes = ", ".join(f"{p}:<id>" for p in sorted(_PREFIXES))
    return f"unknown encoder {name!r}; available: {', '.join(list_encoders())} (online only: {prefixes})"

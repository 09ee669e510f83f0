"""Typed params: params.yaml is loaded once into frozen dataclasses.

An unknown or misspelled key is an error that names the key and the allowed ones
(a silent default would make `dvc exp run -S clean.min_txt_chars=3` a no-op).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """params.yaml (or an override) does not match the schema."""


@dataclass(frozen=True)
class ManifestSourceParams:
    path: str = ""  # CSV or Parquet, relative to the repo root or absolute
    image_root: str = ""  # image paths in the manifest are relative to this
    id_column: str = "id"
    image_column: str = "image"
    text_column: str = "text"
    label_column: str = "label"
    group_column: str = ""  # optional: rows sharing a group never straddle splits


@dataclass(frozen=True)
class IngestParams:
    source: str = "emoji"  # emoji | manifest
    label_field: str = "category"  # emoji source: category (9 classes) | subcategory
    min_class_count: int = 10  # emoji source: labels with fewer samples are dropped
    text_fields: tuple[str, ...] = ("name", "short_names")
    limit: int = 0  # 0 = every sample; N = a stratified subset of N (quick runs)
    manifest: ManifestSourceParams = field(default_factory=ManifestSourceParams)


@dataclass(frozen=True)
class CleanParams:
    min_image_size: int = 16  # px, shorter side
    min_text_chars: int = 1  # after normalisation
    max_text_chars: int = 2000  # longer texts are dropped, not truncated
    lowercase: bool = True
    allowed_labels: tuple[str, ...] = ()  # empty: every label in the data
    label_aliases: dict[str, str] = field(default_factory=dict)  # raw -> canonical
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is flattened onto it


@dataclass(frozen=True)
class ValidateParams:
    text_length: tuple[int, int] = (1, 2000)
    image_size: tuple[int, int] = (16, 4096)
    min_per_class: int = 5
    max_imbalance: float = 25.0  # largest class / smallest class
    warn_imbalance: float = 10.0  # above this: a warning, the pipeline goes on


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42


@dataclass(frozen=True)
class AugmentParams:
    views: int = 2  # K views per training image; 0 disables augmentation
    seed: int = 0
    crop_scale: tuple[float, float] = (0.75, 1.0)
    rotation: float = 10.0  # degrees
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    hflip: bool = False  # emoji are not all mirror-symmetric (arrows, text)
    word_dropout: float = 0.15
    word_swap: bool = True  # swap one pair of neighbouring words per view


@dataclass(frozen=True)
class Params:
    ingest: IngestParams = field(default_factory=IngestParams)
    clean: CleanParams = field(default_factory=CleanParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    split: SplitParams = field(default_factory=SplitParams)
    augment: AugmentParams = field(default_factory=AugmentParams)


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, recursively and strictly."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where or 'params'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ParamsError(
            f"unknown params key {where + '.' if where else ''}{unknown[0]!s}; "
            f"allowed keys{' in ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ParamsError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def parse_params(data: dict[str, Any]) -> Params:
    """Validate a params mapping (as read from YAML) into `Params`."""
    return _build(Params, data, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml once into frozen dataclasses; unknown keys are errors."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    with path.open() as fh:
        data = yaml.safe_load(fh) or {}
    return parse_params(data)


def params_to_dict(params: Any) -> dict[str, Any]:
    """The params as plain YAML-friendly values (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(params))

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
    allow_missing_modality: bool = True  # keep rows with only an image (empty text) or only a text (no image path)


@dataclass(frozen=True)
class ValidateParams:
    text_length: tuple[int, int] = (1, 2000)
    image_size: tuple[int, int] = (16, 4096)
    min_per_class: int = 5
    max_imbalance: float = 25.0  # largest class / smallest class
    warn_imbalance: float = 10.0  # above this: a warning, the pipeline goes on
    max_missing_modality_share: float = 0.5  # critical: share of rows with only an image or only a text


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
class FeaturizeParams:
    """Owned by the featurize stage (issue 3)."""

    # modality -> encoder name (mmfusion.encoders.list_encoders()); a new modality is a new entry
    encoders: dict[str, str] = field(default_factory=lambda: {"image": "efficientnet_lite0", "text": "minilm_l6"})
    device: str = "auto"  # auto | cpu | cuda[:N]
    batch_size: int = 0  # 0 = each encoder's measured default for the device
    num_workers: int = -1  # image-decoding DataLoader processes; -1 = auto (0 on CPU, up to 8 on CUDA)
    cpu_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default (one per core)
    storage_dtype: str = "float16"  # float16 | float32: dtype of features/*.safetensors
    cache_dir: str = ".cache/features"  # content-addressed embedding cache, relative to the project root
    on_bad_input: str = "skip"  # skip (drop the row, report it) | fail (stop after caching the rest)


@dataclass(frozen=True)
class FusionOptions:
    """Per-strategy options of the fusion heads (mmfusion.fusion); used by train."""

    weighted_sum_weights: dict[str, str] = field(default_factory=dict)  # modality -> lambda; empty: learned
    late_combine: str = "mean"  # mean (averaged log-probs) | learned (softmax weights)
    cross_attention_layers: int = 1
    cross_attention_heads: int = 4


@dataclass(frozen=True)
class TrainParams:
    """Owned by the train stage (issue 4)."""

    strategies: tuple[str, ...] = (
        "image_only",
        "text_only",
        "concat",
        "weighted_sum",
        "gated",
        "attention",
        "cross_attention",
        "late",
        "late_stacking",
    )
    hidden_dim: int = 256
    dropout: float = 0.2
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 2
    patience: int = 10  # epochs without a better val macro-F1 before stopping
    modality_dropout: float = 0.2  # per-sample chance of hiding one modality (never all)
    label_smoothing: float = 0.0
    class_weights: bool = False  # inverse-frequency weights in the loss
    aux_weight: float = 1.0  # late fusion: weight of each expert's own loss
    use_augmented: bool = False  # train on the augmented views too (lowered val macro-F1 on the emoji data)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # CPU threads for training (0 = torch's default). These matmuls are small: one thread avoids
    # OpenMP stalls when other processes share the cores (24x faster measured under load).
    threads: int = 1
    fusion: FusionOptions = field(default_factory=FusionOptions)


@dataclass(frozen=True)
class EvaluateParams:
    """Owned by the evaluate stage (issue 4)."""

    selection_metric: str = "macro_f1"  # on val: accuracy | macro_f1 | auroc
    ece_bins: int = 15
    bootstrap: int = 1000  # resamples for test-accuracy intervals and the paired comparison
    seed: int = 0
    raw_check: int = 64  # test samples re-predicted from raw files through Predictor; 0 disables
    device: str = "auto"  # for the raw check's encoders
    selection: str = "auto"  # auto (cv when train+val has fewer than cv_max_rows rows) | cv | holdout
    cv_folds: int = 5  # grouped, stratified folds over train+val
    cv_max_rows: int = 5000  # auto: below this many train+val rows, select by cross-validation
    ensemble_size: int = 25  # greedy ensemble selection rounds (the `ensemble` strategy)


@dataclass(frozen=True)
class ServeLimits:
    """Input safety: a request over any limit gets a 4xx JSON error, never a 500."""

    max_upload_bytes: int = 10_000_000  # whole request body (413 above it)
    max_pixels: int = 16_000_000  # width x height, checked before decoding (decompression bombs)
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # PIL format names (415 otherwise)
    max_text_chars: int = 2000  # raw characters, before normalisation (the clean stage drops longer texts)
    max_batch_items: int = 64  # items in one classify_batch request


@dataclass(frozen=True)
class ServeBatching:
    """Adaptive batching of the model call, in each service process (`mmfusion.serving.batcher.MicroBatcher`):
    requests that arrive while the model is busy share its next call, up to `max_batch_size` items."""

    enabled: str = "true"  # true | false | auto (on with CUDA, off on CPU); bench/serve.py: on wins on CPU too
    max_batch_size: int = 32
    max_latency_ms: int = 10_000  # an item that has queued longer than this before its model call gets a 503


@dataclass(frozen=True)
class InferenceLogParams:
    """What the service records per answered request (read by drift monitoring)."""

    path: str = "logs/inference.sqlite"  # relative paths are resolved against the project root at package time
    log_text: bool = True  # the raw text (text drift needs it); off: only its length
    log_images: bool = False  # the raw image bytes: off by default (size, privacy)
    queue_size: int = 10_000  # records waiting for the writer thread; beyond it records are dropped and counted


@dataclass(frozen=True)
class PackageParams:
    """The package stage (BentoML model + Bento) and the settings the served Bento runs with (issue 5)."""

    model_name: str = "mmfusion"  # BentoML model name; its version is the Predictor's version
    smoke_test: bool = True  # load models/best and classify one item before packaging
    device: str = "auto"  # serving device: auto | cpu | cuda
    workers: int = 2  # service processes, each with its own Predictor (encoders) and in-process batcher
    torch_threads: int = 1  # CPU intra-op threads per process; 0 = torch's default (all cores).
    # 2 workers x 1 thread beat 1 worker x 2 threads on a 2-core CPU (53 vs 40 req/s at concurrency 32,
    # bench/serve.py): no OpenMP barrier stalls when the HTTP side preempts a model thread
    timeout_s: int = 30  # per request
    limits: ServeLimits = field(default_factory=ServeLimits)
    batching: ServeBatching = field(default_factory=ServeBatching)
    log: InferenceLogParams = field(default_factory=InferenceLogParams)


@dataclass(frozen=True)
class Params:
    ingest: IngestParams = field(default_factory=IngestParams)
    clean: CleanParams = field(default_factory=CleanParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    split: SplitParams = field(default_factory=SplitParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    featurize: FeaturizeParams = field(default_factory=FeaturizeParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    package: PackageParams = field(default_factory=PackageParams)


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

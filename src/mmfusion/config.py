"""Typed params: params.yaml is loaded once into frozen dataclasses.

An unknown or misspelled key is an error that names the key and the allowed ones
(a silent default would make `dvc exp run -S clean.min_txt_chars=3` a no-op).
"""

from __future__ import annotations

import dataclasses
import posixpath
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmfusion.errors import UserError


class ParamsError(UserError):
    """params.yaml (or an override) does not match the schema."""


@dataclass(frozen=True)
class ManifestSourceParams:
    path: str = ""  # CSV or Parquet, relative to the repo root or absolute
    files_root: str = ""  # file modalities' paths in the manifest are relative to this; "" = the manifest's folder
    # {modality: the manifest's column for it}; a modality not named here uses its own column (image, text).
    # The data's modalities are those whose column the manifest has.
    columns: dict[str, str] = field(default_factory=dict)
    id_column: str = "id"
    label_column: str = "label"
    group_column: str = ""  # optional: rows sharing a group never straddle splits


@dataclass(frozen=True)
class IngestParams:
    source: str = "emoji"  # emoji | manifest
    label_field: str = "category"  # emoji source: category (9 classes) | subcategory
    min_class_count: int = 10  # emoji source: labels with fewer samples are dropped
    text_fields: tuple[str, ...] = ("name", "short_names")
    limit: int = 0  # 0 = every sample; N = a stratified subset of N (quick runs)
    # exported labelled feedback (a manifest + images, `python -m mmfusion.monitoring.export`) added to the
    # source's samples; "" = none. Its rows always go to the train split.
    feedback_dir: str = "feedback/train"
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
    # val/test: the most rows one group may hold; larger groups stay in train, a split still above it is a warning
    max_group_share: float = 0.25


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
class Int8Params:
    """Static int8 quantisation of onnx-int8 encoders (mmfusion.encoders.runtime.Int8Settings)."""

    calibration_size: int = 64  # distinct training inputs (originals, not augmented views) per encoder
    seed: int = 0
    per_channel: bool = True
    # auto: full 8-bit weights on VNNI/AMX/ARM, 7-bit on AVX2-only CPUs (int16 saturation in VPMADDUBSW) | true | false
    reduce_range: bool | str = "auto"
    calibrate_method: str = "minmax"  # minmax | entropy | percentile
    # fidelity guard: int8 against torch on this many held-out training inputs; below either cosine -> fp32 ONNX
    fidelity_size: int = 64  # 0 = no check
    min_mean_cosine: float = 0.985
    min_p05_cosine: float = 0.95


@dataclass(frozen=True)
class FeaturizeParams:
    """The featurize stage: encoders, their runtime, batching and the feature cache."""

    # modality -> encoder name (mmfusion.encoders.list_encoders()); a new modality is a new entry
    encoders: dict[str, str] = field(default_factory=lambda: {"image": "efficientnet_lite0", "text": "minilm_l6"})
    device: str = "auto"  # auto | cpu | cuda[:N]
    batch_size: int = 0  # 0 = each encoder's measured default for the device
    num_workers: int = -1  # image-decoding DataLoader processes; -1 = auto (0 on CPU, up to 8 on CUDA)
    cpu_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default (one per core)
    storage_dtype: str = "float16"  # float16 | float32: dtype of features/*.safetensors
    cache_dir: str = ".cache/features"  # content-addressed embedding cache, relative to the project root
    on_bad_input: str = "skip"  # skip (drop the row, report it) | fail (stop after caching the rest)
    # encoder runtime for every modality: auto (each encoder's measured default per device) | torch | onnx | onnx-int8
    runtime: str = "auto"  # auto: onnx-int8 images + onnx texts on CPU, torch on CUDA (docs/encoders.md)
    runtimes: dict[str, str] = field(default_factory=dict)  # modality -> runtime, overrides `runtime`
    onnx_threads: int = 0  # ONNX Runtime intra-op threads; 0 = cpu_threads, else one per core
    onnx_cache_dir: str = ".cache/onnx"  # exported ONNX files, content-addressed by encoder fingerprint
    int8: Int8Params = field(default_factory=Int8Params)


@dataclass(frozen=True)
class FusionOptions:
    """Per-strategy options of the fusion heads (mmfusion.fusion); used by train."""

    weighted_sum_weights: dict[str, float] = field(default_factory=dict)  # modality -> lambda; empty: learned
    late_combine: str = "mean"  # mean (averaged log-probs) | learned (softmax weights)
    cross_attention_layers: int = 1
    cross_attention_heads: int = 4


@dataclass(frozen=True)
class FinetuneParams:
    """Strategies named `tuned_<strategy>` (mmfusion.training.finetune): the top blocks of encoders trained with the head."""

    blocks: dict[str, int] = field(default_factory=lambda: {"image": 2})  # modality -> top blocks trained
    encoder_lr: float = 1e-4  # the tuned blocks' learning rate (the head keeps train.lr)
    epochs: int = 15
    patience: int = 5
    batch_size: int = 32


@dataclass(frozen=True)
class TrainParams:
    """The train stage: the fusion strategies and how each head is trained."""

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
    cpu_threads: int = 1
    fusion: FusionOptions = field(default_factory=FusionOptions)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)


@dataclass(frozen=True)
class EvaluateParams:
    """The evaluate stage: how the winner is selected, calibrated and checked."""

    selection_metric: str = "macro_f1"  # on val: accuracy | macro_f1 | auroc
    ece_bins: int = 15
    bootstrap: int = 1000  # resamples for test-accuracy intervals and the paired comparison
    seed: int = 0
    raw_check: int = 64  # test samples re-predicted from raw files through Predictor; 0 disables
    device: str = "auto"  # for the raw check's encoders
    selection: str = "auto"  # auto (cv when train+val has fewer than cv_max_rows rows) | cv | holdout
    cv_folds: int = 5  # grouped, stratified folds over train+val
    cv_max_rows: int = 2000  # auto: below this many train+val rows, select by cross-validation
    ensemble_size: int = 25  # greedy ensemble selection rounds (the `ensemble` strategy)
    # the explanations page (reports/evaluate/explanations/): this many test rows, half the most confident correct
    # ones and half the errors (package.explain's method and limits); 0 = no page
    explain_rows: int = 12
    # the faithfulness check: on this many test rows, removing the most-attributed parts must lower the predicted
    # class's probability more than removing as many random ones (reports/evaluate/faithfulness.json); 0 = off
    faithfulness_rows: int = 24
    faithfulness_steps: int = 4  # removed fractions 0, 1/steps, ..., 1 of each row's parts
    faithfulness_draws: int = 2  # random removal orders per row, averaged (the baseline the attributions must beat)


@dataclass(frozen=True)
class ServeLimits:
    """Input safety: a request over any limit gets a 4xx JSON error, never a 500."""

    max_upload_bytes: int = 10_000_000  # whole request body (413 above it)
    max_pixels: int = 16_000_000  # width x height, checked before decoding (decompression bombs)
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # PIL format names (415 otherwise)
    max_text_chars: int = 2000  # raw characters, before normalisation (the clean stage drops longer texts)
    max_batch_items: int = 64  # items in one classify_batch request


@dataclass(frozen=True)
class ServeAuth:
    """Who may call the service (mmfusion.serving.auth). The token itself is never a param: the service reads
    it from MMFUSION_API_TOKEN or the file MMFUSION_API_TOKEN_FILE names. /feedback always needs it once set."""

    classify: bool = False  # /classify and /classify_batch need the token too (then one must be set)


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

    # A SQLAlchemy URL: sqlite:///<file> (embedded; a relative file is taken from the project root at package
    # time) or postgresql+psycopg://user:password@host/db (one log for many replicas). MMFUSION_INFERENCE_LOG
    # overrides it at serve time; printed with its password masked (mmfusion.logdb)
    url: str = "sqlite:///logs/inference.sqlite"
    # {modality: share of requests whose raw input the log keeps (1.0 all, 0.0 none), drawn per request};
    # a modality not named keeps its spec's default (`keep_share`: text 1.0, image 0.0 for size and privacy).
    # Its statistics are logged either way; feedback can only retrain on requests whose inputs were all kept
    keep: dict[str, float] = field(default_factory=dict)
    # {modality: share of requests whose small preview the log keeps (a 96 px thumbnail, the first 300 characters of
    # a text, a spectrogram picture), drawn per request}: the drift report's examples show them. A modality not named
    # keeps its spec's default (`preview_share`: 1.0 for image, text and audio); 0 switches its previews off
    previews: dict[str, float] = field(default_factory=dict)
    queue_size: int = 10_000  # records waiting for the writer thread; beyond it records are dropped and counted


@dataclass(frozen=True)
class ExplainParams:
    """Explanations (mmfusion.explain): which words, image regions or time segments drove a prediction, measured by
    perturbation through the runtimes the service runs (Captum). The service's `/classify` with `explain` and the
    evaluate stage's explanations page both use these settings, so the page shows what the service would answer."""

    # feature_ablation (each part removed in turn: parts + 1 evaluations) | shapley_sampling (samples x parts + 1)
    # | kernel_shap | lime (samples evaluations, whatever the parts)
    method: str = "feature_ablation"
    samples: int = 64  # perturbations of the sampling methods
    # model evaluations one explanation may cost (a request over it gets a 413 naming the count): the cost bound
    max_evaluations: int = 256
    batch_size: int = 32  # perturbed inputs per model call
    image_grid: int = 6  # image regions: an N x N grid of cells, each removed by filling it with the image's mean colour
    audio_segments: int = 10  # audio: the clip cut into this many equal time segments, each removed by silencing it
    overlay: bool = True  # images: a PNG heatmap over the image in the answer (base64) when the request asks for it
    # explanations one worker takes at a time (running or waiting for its model thread, which they hold for ~0.2 s
    # each on emoji); beyond it a request with `explain` gets a 429 at once, so a burst of them cannot stall the
    # worker's plain requests behind it; 0 = no limit
    max_pending: int = 2


@dataclass(frozen=True)
class PackageParams:
    """The package stage (BentoML model + Bento) and the settings the served Bento runs with."""

    model_name: str = "mmfusion"  # BentoML model name; its version is the Predictor's version
    smoke_test: bool = True  # load models/best and classify one item before packaging
    device: str = "auto"  # serving device: auto | cpu | cuda
    workers: int = 2  # service processes, each with its own Predictor (encoders) and in-process batcher
    head_runtime: str = "auto"  # fusion head: auto (ONNX Runtime on CPU, torch on CUDA) | torch | onnx (mmfusion.inference.head_runtime)
    cpu_threads: int = 1  # torch intra-op threads per process on CPU; 0 = torch's default (all cores).
    # 2 workers x 1 thread beat 1 worker x 2 threads on a 2-core CPU (53 vs 40 req/s at concurrency 32,
    # bench/serve.py): no OpenMP barrier stalls when the HTTP side preempts a model thread
    timeout_s: int = 30  # per request, from its body's arrival to the answer (504 after it)
    body_timeout_s: float = 10.0  # the whole request body must arrive within this (408 after it; slow clients)
    max_concurrency: int = 128  # requests in progress per worker, counted once their body is in (429 beyond)
    # after this many requests a keep-alive connection is closed (the answer says Connection: close), so clients
    # reconnect and spread over the workers again (one that restarted got none before); 0 = never (nginx: 1000).
    # 10, not 100: at 100 a 32-client load kept the split the workers' first accepts made for ~20 s, and
    # c=32 ran at 84-98 req/s in most runs; at 10 (1-10 alike) 124-150 (bench/serve.py, 2 cores)
    keepalive_requests: int = 10
    # BentoML's access log line per request (off: no measurable speed difference at 32 clients on 2 cores)
    access_log: bool = True
    graceful_shutdown_s: float = 20.0  # on SIGTERM: in-flight requests may finish for this long (503 after it)
    limits: ServeLimits = field(default_factory=ServeLimits)
    batching: ServeBatching = field(default_factory=ServeBatching)
    log: InferenceLogParams = field(default_factory=InferenceLogParams)
    auth: ServeAuth = field(default_factory=ServeAuth)
    explain: ExplainParams = field(default_factory=ExplainParams)


# Keys that were renamed: an old key is an error naming the new one (not the generic "unknown key").
RENAMED_KEYS = {
    "train.threads": "train.cpu_threads",
    "package.torch_threads": "package.cpu_threads",
    "package.log.log_text": "package.log.keep (a share per modality: {text: 1.0})",
    "package.log.log_images": "package.log.keep (a share per modality: {image: 1.0})",
    "package.log.image_sample_rate": "package.log.keep (a share per modality: {image: 0.25})",
    "package.log.path": "package.log.url (a SQLAlchemy URL: sqlite:///logs/inference.sqlite)",
    "monitor.log_path": "monitor.log_url (a SQLAlchemy URL or a SQLite file; empty: package.log.url)",
    "ingest.manifest.image_root": "ingest.manifest.files_root",
    "ingest.manifest.image_column": "ingest.manifest.columns (e.g. {image: photo})",
    "ingest.manifest.text_column": "ingest.manifest.columns (e.g. {text: title})",
}


@dataclass(frozen=True)
class MonitorWindow:
    """How the inference log is cut into windows."""

    by: str = "count"  # count (every `size` rows) | time (every `period_minutes`)
    size: int = 200  # rows per window (by: count)
    period_minutes: float = 60.0  # window length (by: time); only closed periods are checked


@dataclass(frozen=True)
class MonitorEmbeddings:
    """Embedding drift per modality of the served model (Evidently's embedding drift methods)."""

    method: str = "model"  # model (domain classifier ROC AUC) | mmd | ratio | distance
    threshold: float = 0.55  # the method's threshold (model: AUC); used when not bootstrapped
    # true: the threshold is this quantile of the AUCs a random classifier gets on the same split sizes
    # (adapts to the window size); false: the fixed `threshold`; auto: true when the reference has < 1,000 rows
    bootstrap: str = "true"
    quantile: float = 0.99  # with bootstrap: 0.99 keeps false alarms near 1% per modality and window
    # and the score must reach this effect size too (model: AUC): a significant but tiny difference
    # (new items of the same kind, e.g. a split's own mix of emoji groups) is not an alarm; 0 disables
    min_score: float = 0.65
    second_method: str = "mmd"  # a second signal, reported beside the first ("" = none); the verdict uses `method`
    second_threshold: float = 0.015
    max_rows: int = 2000  # reference and window are each sampled down to this many rows (seeded)
    severity: str = "critical"


@dataclass(frozen=True)
class MonitorColumnCheck:
    """A drift check of one scalar column (an Evidently stattest: a method and its threshold)."""

    method: str = "jensenshannon"
    threshold: float = 0.1
    severity: str = "warning"


@dataclass(frozen=True)
class MonitorExamples:
    """The "what drifted" section of a window's report, per modality whose embeddings drifted: the window's items a
    domain classifier (window vs reference, cross-validated) finds least like the reference, each beside its nearest
    reference items, with their previews (package.log.previews)."""

    items: int = 6  # window items shown per drifted modality; 0 = no section
    neighbours: int = 2  # nearest reference items (cosine on the same embeddings) beside each
    folds: int = 5  # cross-validation folds: no item is scored by a classifier fitted on it


@dataclass(frozen=True)
class MonitorParams:
    """The `monitor` flow: windows of the inference log against the served model's reference (Evidently)."""

    log_url: str = ""  # the inference log (a SQLAlchemy URL or a SQLite file); empty: package.log.url
    model_dir: str = ""  # the served model's folder (with reference/); empty: the live Bento's model, else models/best
    model_version: str = "served"  # served (only rows of the served model) | any | an explicit version
    reference_splits: tuple[str, ...] = ("val", "test")  # what `evaluate` writes into models/best/reference/
    window: MonitorWindow = field(default_factory=MonitorWindow)
    min_rows: int = 50  # a window with fewer rows gets `insufficient_data`, never a pass
    seed: int = 0
    embeddings: MonitorEmbeddings = field(default_factory=MonitorEmbeddings)
    prediction: MonitorColumnCheck = field(
        default_factory=lambda: MonitorColumnCheck(method="jensenshannon", threshold=0.2, severity="critical")
    )
    confidence: MonitorColumnCheck = field(
        default_factory=lambda: MonitorColumnCheck(method="wasserstein", threshold=0.2, severity="warning")
    )
    inputs: MonitorColumnCheck = field(
        default_factory=lambda: MonitorColumnCheck(method="wasserstein", threshold=0.2, severity="warning")
    )
    missing_share_delta: float = 0.1  # |missing share of a modality - the reference's| above this is flagged
    missing_severity: str = "critical"
    plot_rows: int = 300  # rows per side Evidently's t-SNE embedding picture draws (its cost grows with rows)
    examples: MonitorExamples = field(default_factory=MonitorExamples)
    out_dir: str = "reports/monitor"  # one HTML report + one JSON verdict per window, and latest.json
    history_path: str = "logs/monitor.sqlite"  # verdict history (the monitor never writes the service's log)
    workspace: str = "logs/evidently"  # local Evidently workspace: `make monitor-ui`
    project: str = "mmfusion"  # Evidently project name
    schedule_minutes: int = 60  # `make ui` runs the monitor deployment this often


@dataclass(frozen=True)
class PromotionRule:
    """Champion vs challenger: the challenger is served only if it is not worse on the same data."""

    holdout_metric: str = "macro_f1"  # on the newest labelled feedback held out from training: accuracy | macro_f1
    holdout_tolerance: float = 0.0  # the challenger may be this much lower on the hold-out
    test_metric: str = "accuracy"  # on the fixed test split (the source's rows only): accuracy | macro_f1
    test_tolerance: float = 0.01  # the challenger may be this much lower on the test split
    min_holdout_rows: int = 1  # fewer hold-out rows: only the test rule decides


@dataclass(frozen=True)
class RetrainParams:
    """The `retrain` flow (flows/retrain.py) and the policy by which the monitor starts it."""

    auto: bool = True  # the monitor flow may start a retrain when the policy below says so
    drift_windows: int = 2  # consecutive complete windows with verdict `drift` (of the served model)
    min_feedback: int = 20  # usable labelled feedback rows newer than the last retrain
    cooldown_minutes: float = 360.0  # no automatic start within this long after the last one
    holdout_fraction: float = 0.2  # the newest usable feedback kept out of training, for the comparison
    export_dir: str = "feedback"  # <dir>/train (ingested, = ingest.feedback_dir) and <dir>/holdout
    history_path: str = "logs/retrain.jsonl"  # every start, skip, decision and result, one JSON per line
    live_path: str = "reports/live.json"  # which Bento is live, and the ones before it (`make rollback`)
    report_dir: str = "reports/retrain"  # one promotion report per comparison
    promotion: PromotionRule = field(default_factory=PromotionRule)


@dataclass(frozen=True)
class LocalClusterParams:
    """A temporary Dask LocalCluster, started for one flow run when `compute.address` is empty."""

    workers: int = 2  # 0 = one per visible GPU (worker i takes cuda:i), 2 without a GPU
    threads_per_worker: int = 1  # one task at a time per worker: each holds its encoders and torch threads
    processes: bool = True  # workers are processes (no GIL sharing); false: threads of the flow's process


@dataclass(frozen=True)
class ComputeParams:
    """Where featurize shards and training trials run (mmfusion.compute). Never changes what they produce,
    so no DVC stage depends on it: switching engines does not rerun anything."""

    engine: str = "local"  # local (in the stage's process, as without Dask) | dask (Prefect's DaskTaskRunner)
    # an existing scheduler, e.g. tcp://10.0.0.5:8786; empty: a temporary LocalCluster of `cluster`.
    # The environment variable MMFUSION_DASK_ADDRESS overrides it.
    address: str = ""
    cluster: LocalClusterParams = field(default_factory=LocalClusterParams)
    # featurize: cache misses per shard (one Prefect task), rounded up to a multiple of the encoder batch.
    # Large shards keep the per-task overhead small (bench/scale.py).
    shard_size: int = 512
    # local engine: trials (CV folds) spread over this many processes when that pays; 0 = one per core,
    # 1 = all in the stage's own process. The results are the same either way.
    local_processes: int = 0


# Params sections of Prefect flows that are not DVC stages (flows/<name>.py); every other section is a stage.
FLOW_SECTIONS = ("monitor", "retrain")
# Sections that say how and where the work runs, not what it produces: no DVC stage depends on them.
SETTINGS_SECTIONS = ("compute",)
# Sections of settings per thing rather than per stage: the stages that read them list them in dvc.yaml.
SHARED_SECTIONS = ("modalities",)


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
    monitor: MonitorParams = field(default_factory=MonitorParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    # {modality: its settings}: each registered spec's `defaults` overridden here (audio: sample rate, clip
    # limits, silence level), recorded into the model folder (`inputs`) so serving reads them from the model
    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, recursively and strictly."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where or 'params'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    for key in unknown:
        old = f"{where}.{key}" if where else str(key)
        if old in RENAMED_KEYS:
            raise ParamsError(f"params key {old} was renamed to {RENAMED_KEYS[old]}")
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
        value_type = typing.get_args(tp)[1]
        return {str(k): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}
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
    params = _build(Params, data, "")
    _check_agreement(params)
    _check_modalities(params.modalities)
    return params


def _check_modalities(section: dict[str, dict[str, Any]]) -> None:
    """`modalities.<name>.<setting>`: a registered modality and one of its spec's settings, of its type."""
    from mmfusion.modalities import get_modality, list_modalities  # the registry never imports config

    for name, settings in section.items():
        if name not in list_modalities():
            raise ParamsError(f"modalities.{name}: no such modality; registered: {', '.join(list_modalities())} "
                              "(a plugin's modality needs MMFUSION_PLUGINS)")  # fmt: skip
        if not isinstance(settings, dict):
            raise ParamsError(f"modalities.{name}: expected a mapping of settings, got {settings!r}")
        defaults = get_modality(name).defaults
        for key, value in settings.items():
            if key not in defaults:
                raise ParamsError(f"unknown params key modalities.{name}.{key}; allowed keys in modalities.{name}: "
                                  f"{', '.join(defaults) or '(none)'}")  # fmt: skip
            default = defaults[key]
            number = isinstance(default, (int, float)) and not isinstance(default, bool)
            if number and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ParamsError(f"modalities.{name}.{key}: expected a number, got {value!r}")
            if isinstance(default, list) and not isinstance(value, list):
                raise ParamsError(f"modalities.{name}.{key}: expected a list, got {value!r}")


def _check_agreement(p: Params) -> None:
    """Settings that name one thing in two sections must agree, or a part silently reads nothing."""
    exported = posixpath.normpath(posixpath.join(p.retrain.export_dir, "train"))
    if p.ingest.feedback_dir and posixpath.normpath(p.ingest.feedback_dir) != exported:
        raise ParamsError(
            f"ingest.feedback_dir ({p.ingest.feedback_dir}) must be retrain.export_dir/train ({exported}): "
            "the export writes the feedback there and ingest reads it from there; set both (and the ingest "
            "dep in dvc.yaml), or ingest.feedback_dir: '' to ingest no feedback"
        )


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml once into frozen dataclasses; unknown keys are errors."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    with path.open() as fh:
        data = yaml.safe_load(fh) or {}
    return parse_params(data)


def _check_key(key: str) -> None:
    """A dotted params key must exist in the schema: the same error as an unknown key in params.yaml."""
    cls: Any = Params
    where = ""
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return  # inside a mapping param (featurize.encoders.<modality>): any key
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            _build(cls, {part: None}, where)  # raises, naming the allowed keys (or the new name of a renamed one)
        cls = typing.get_type_hints(cls)[part]
        where = f"{where}.{part}" if where else part


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`data` (a params mapping) with `section.key=value` overrides applied, parsed exactly as
    `dvc exp run -S` parses them (DVC's own Hydra override parser); `data` itself is not changed.

    As in DVC, an override may only set a key that `data` already has; a misspelled key is a
    ParamsError naming the allowed keys.
    """
    if not overrides:
        return data
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r} is not of the form section.key=value")
        _check_key(key.lstrip("+~"))
    with tempfile.TemporaryDirectory(prefix="mmfusion-overrides-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            dvc_apply_overrides(path, list(overrides))
        except InvalidArgumentError as exc:
            raise ParamsError(f"invalid override in {list(overrides)}: {exc.__cause__ or exc}") from exc
        return yaml.safe_load(path.read_text()) or {}


def params_to_dict(params: Any) -> dict[str, Any]:
    """The params as plain YAML-friendly values (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(params))

"""Encoder runtimes: the same frozen torch module run by torch, by ONNX Runtime (fp32), or as int8.

    torch       the module itself (eager; bf16/fp16 autocast on CUDA)
    onnx        exported from that module (opset 17), run by ONNX Runtime in fp32
    onnx-int8   the fp32 export, statically quantised (QDQ, int8 weights per channel, uint8
                activations) with MinMax ranges calibrated on a seeded sample of real training inputs

Exported files live in a content-addressed cache (`featurize.onnx_cache_dir`, default
`.cache/onnx`), one folder per encoder fingerprint, which covers the runtime, the quantisation
settings and the digest of the calibration inputs, so features made under one runtime are never
mixed with another and a model trained under one refuses another. A model folder records its
encoders' runtime and the calibration inputs themselves (see `Encoder.describe`), so a served
model rebuilds its ONNX files offline when the cache does not have them: the fp32 export only
needs the pip-shipped weights, the int8 model the recorded calibration inputs.

`reduce_range` (7-bit weights) is on by default: on x86 CPUs without VNNI (AVX2 only, like the
2-core machines here) ONNX Runtime's u8s8 kernels sum pairs of products in int16 (VPMADDUBSW),
which saturates with full 8-bit weights; measured on EfficientNet-Lite0 over real emoji, mean
cosine to torch 0.84 without it, 0.94 with it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfusion import paths

if TYPE_CHECKING:
    from mmfusion.encoders.base import Encoder

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "onnx-int8")
AUTO = "auto"
OPSET = 17
ONNX_CACHE_ENV = "MMFUSION_ONNX_CACHE"
DEFAULT_ONNX_CACHE = ".cache/onnx"
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Int8Settings:
    """Static int8 quantisation settings (part of the fingerprint of an onnx-int8 encoder)."""

    calibration_size: int = 64  # training inputs whose activation ranges set the scales
    seed: int = 0  # which training inputs (a seeded sample)
    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights: no int16 saturation on AVX2-only CPUs (module docstring)
    calibrate_method: str = "minmax"  # minmax | entropy | percentile

    def ident(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Calibration:
    """The calibration inputs of an int8 encoder: content bytes of real training samples (image file bytes, normalised text)."""

    contents: list[bytes] = field(default_factory=list)
    seed: int = 0

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for c in self.contents:
            h.update(hashlib.sha256(c).digest())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "size": len(self.contents),
            "seed": self.seed,
            "digest": self.digest,
            "contents_b64": [base64.b64encode(c).decode("ascii") for c in self.contents],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        cal = cls([base64.b64decode(c) for c in data.get("contents_b64", [])], int(data.get("seed", 0)))
        if data.get("digest") and cal.digest != data["digest"]:
            raise ValueError("the recorded calibration inputs do not match their digest (a damaged model config)")
        return cal


def check_runtime(runtime: str, where: str = "runtime") -> str:
    runtime = str(runtime).strip().lower()
    if runtime not in (*RUNTIMES, AUTO):
        raise ValueError(f"{where}: unknown runtime {runtime!r}; expected one of {', '.join((AUTO, *RUNTIMES))}")
    return runtime


def resolve_runtime(runtime: str, encoder: Encoder) -> str:
    """`auto` is the measured default of the encoder for its device (docs/encoders.md)."""
    runtime = check_runtime(runtime)
    if runtime == AUTO:
        return encoder.default_runtimes.get(encoder.device.type, "torch") if encoder.exportable else "torch"
    if runtime != "torch" and not encoder.exportable:
        raise ValueError(f"encoder {encoder.name!r} cannot be exported to ONNX; use runtime: torch for it")
    return runtime


def runtime_for(modality: str, runtime: str, per_modality: dict[str, str] | None) -> str:
    """The runtime setting for one modality: its entry in `per_modality`, else the one for all."""
    return check_runtime((per_modality or {}).get(modality, runtime), f"runtime for {modality!r}")


def sample_calibration(values: Sequence[str], content: Callable[[str], bytes], settings: Int8Settings) -> Calibration:
    """A seeded sample of `settings.calibration_size` distinct, readable training inputs (by content)."""
    order = list(range(len(values)))
    random.Random(settings.seed).shuffle(order)
    seen: set[bytes] = set()
    out: list[bytes] = []
    for i in order:
        if len(out) >= settings.calibration_size:
            break
        try:
            data = content(values[i])
        except (OSError, ValueError):
            continue  # an unreadable sample is reported by featurize itself
        key = hashlib.sha256(data).digest()
        if key not in seen:
            seen.add(key)
            out.append(data)
    return Calibration(out, settings.seed)


def default_cache_dir() -> Path:
    """$MMFUSION_ONNX_CACHE, else `.cache/onnx` under the working directory (the project root in every stage)."""
    return Path(os.environ.get(ONNX_CACHE_ENV) or DEFAULT_ONNX_CACHE)


def onnx_threads(threads: int) -> int:
    """ONNX Runtime intra-op threads: `threads`, else torch's current setting (what featurize/serving set)."""
    if threads > 0:
        return threads
    import torch

    return max(1, torch.get_num_threads())


# --- export, quantisation, sessions ----------------------------------------------------------


@dataclass(frozen=True)
class ExportSpec:
    """What `torch.onnx.export` needs: the module, an example batch and the names of the graph's inputs."""

    module: Any  # torch.nn.Module: collated batch inputs -> [B, dim]
    example: dict[str, Any]  # input name -> example torch tensor
    dynamic_axes: dict[str, dict[int, str]]


def export_onnx(spec: ExportSpec, path: Path) -> None:
    """Export the torch module to `path` (fp32, opset 17, dynamic batch and the axes in the spec)."""
    import torch

    import warnings

    names = list(spec.example)
    axes = {**spec.dynamic_axes, "embedding": {0: "batch"}}
    # the TorchScript exporter warns about every traced shape branch and constant-folding pass
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module.eval(),
            tuple(spec.example[n] for n in names),
            str(path),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


class _Reader:
    """onnxruntime CalibrationDataReader over pre-built feed dicts."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_int8(fp32: Path, out: Path, feeds: list[dict[str, np.ndarray]], settings: Int8Settings, op_types=None) -> None:
    """Static QDQ int8 (weights int8 per channel, activations uint8) calibrated on `feeds`."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if settings.calibrate_method not in methods:
        raise ValueError(f"int8 calibrate_method must be one of {', '.join(methods)}, got {settings.calibrate_method!r}")
    if not feeds:
        raise ValueError("int8 quantisation needs calibration inputs (none were readable)")

    class Reader(_Reader, CalibrationDataReader):
        pass

    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    try:
        quantize_static(
            str(pre),
            str(out),
            Reader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            op_types_to_quantize=op_types,
            calibrate_method=methods[settings.calibrate_method],
        )
    finally:
        pre.unlink(missing_ok=True)


def providers_for(device_type: str) -> list[str]:
    """CUDA first when the encoder is on CUDA and this onnxruntime build has it; always CPU as the fallback."""
    import onnxruntime as ort

    if device_type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device_type == "cuda":
        log.warning("onnxruntime has no CUDA provider here (the CPU wheel): the ONNX encoder runs on CPU")
    return ["CPUExecutionProvider"]


def create_session_options(threads: int):
    """`threads` intra-op threads, one inter-op thread, sequential execution, full graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def create_session(path: Path, threads: int, device_type: str = "cpu"):
    """An InferenceSession of the file at `path` with `create_session_options(threads)`."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), create_session_options(threads), providers=providers_for(device_type))


def build_onnx_file(encoder: Encoder, cache_dir: Path) -> Path:
    """The encoder's ONNX file for its runtime, from the cache or built (export, then quantise) into it.

    Layout: <cache_dir>/<fingerprint>/model.onnx (+ encoder.json for people). Built in a temporary
    folder and renamed into place, so concurrent builders (two service workers) never see half a file.
    """
    # the same namespace as the encoder's feature cache
    folder = Path(cache_dir) / re.sub(r"[^A-Za-z0-9._@+-]", "_", f"{encoder.fingerprint}-{encoder.precision}")
    final = folder / "model.onnx"
    if final.exists():
        return final
    with _BUILD_LOCK:
        if final.exists():
            return final
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
        except OSError as exc:
            raise PermissionError(
                f"ONNX cache directory {cache_dir} is not writable ({exc.strerror or exc}); "
                f"set featurize.onnx_cache_dir (or ${ONNX_CACHE_ENV} when serving) to a writable folder"
            ) from exc
        try:
            start = time.perf_counter()
            fp32 = tmp / "fp32.onnx"
            export_onnx(encoder.export_spec(), fp32)
            if encoder.runtime == "onnx-int8":
                feeds = encoder.calibration_feeds()
                quantize_int8(fp32, tmp / "model.onnx", feeds, encoder.int8, encoder.int8_op_types)
                fp32.unlink()
            else:
                fp32.rename(tmp / "model.onnx")
            (tmp / "encoder.json").write_text(json.dumps({**encoder.describe(brief=True), "build_s": round(time.perf_counter() - start, 1)}, indent=2) + "\n")
            try:
                tmp.rename(folder)
            except OSError:  # another process finished first: keep theirs
                if not final.exists():
                    raise
            log.info("built %s (%s) in %.1f s -> %s", encoder.name, encoder.runtime, time.perf_counter() - start, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- featurize's settings --------------------------------------------------------------------


def check_featurize_runtime(p: Any) -> None:
    """Fail before any work on a runtime setting that cannot run (featurize params `p`)."""
    check_runtime(p.runtime, "featurize.runtime")
    for modality, value in p.runtimes.items():
        if modality not in p.encoders:
            raise ValueError(f"featurize.runtimes.{modality}: no such modality in featurize.encoders ({', '.join(p.encoders)})")
        check_runtime(value, f"featurize.runtimes.{modality}")
    settings = Int8Settings(**asdict(p.int8))
    if settings.calibration_size < 1:
        raise ValueError("featurize.int8.calibration_size must be >= 1")
    if settings.calibrate_method not in ("minmax", "entropy", "percentile"):
        raise ValueError(f"featurize.int8.calibrate_method must be minmax, entropy or percentile, got {settings.calibrate_method!r}")
    if p.onnx_threads < 0:
        raise ValueError("featurize.onnx_threads must be >= 0")


def apply_featurize_runtime(
    encoder: Encoder, p: Any, modality: str, root: Path, train_values: Callable[[], Sequence[str]], content: Callable[[str], bytes]
) -> Encoder:
    """Set the runtime featurize params `p` name for `modality`; int8 calibrates on a seeded sample of `train_values()`."""
    settings = Int8Settings(**asdict(p.int8))
    cache = paths.resolve(root, p.onnx_cache_dir)
    return encoder.set_runtime(
        runtime_for(modality, p.runtime, p.runtimes),
        threads=p.onnx_threads or p.cpu_threads,
        cache_dir=cache,
        int8=settings,
        calibration=lambda: sample_calibration(list(train_values()), content, settings),
    )

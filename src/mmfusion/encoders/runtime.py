"""Encoder runtimes: the same frozen torch module run by torch, by ONNX Runtime (fp32), or as int8.

    torch       the module itself (eager; bf16/fp16 autocast on CUDA)
    onnx        exported from that module (opset 17), run by ONNX Runtime in fp32
    onnx-int8   the fp32 export with int8 weights per channel, by the encoder's `int8_scheme`:
                static (CNNs): QDQ, uint8 activations with MinMax ranges calibrated on a seeded
                  sample of real training inputs;
                dynamic (transformers): activations quantised per batch at run time (their
                  outlier features defeat one static range: MiniLM on emoji texts, mean cosine to
                  torch 0.941 static, 0.994 dynamic, 2.4x fp32 ONNX's speed at batch 8)

Exported files live in a content-addressed cache (`featurize.onnx_cache_dir`, default
`.cache/onnx`), one folder per encoder fingerprint, which covers the runtime, the quantisation
settings and the digest of the calibration inputs, so features made under one runtime are never
mixed with another and a model trained under one refuses another. A model folder records its
encoders' runtime and the calibration inputs themselves (see `Encoder.describe`), so a served
model rebuilds its ONNX files offline when the cache does not have them: the fp32 export only
needs the pip-shipped weights, the int8 model the recorded calibration inputs.

`reduce_range: auto` (the default) is resolved from the CPU's int8 instruction set when the
encoder is quantised (`cpu_isa`, from /proc/cpuinfo: ONNX Runtime reports none). On x86 CPUs
without VNNI (AVX2 only) ONNX Runtime's u8s8 kernels sum pairs of products in int16
(VPMADDUBSW), which saturates with full 8-bit weights: they get 7-bit weights (measured on
EfficientNet-Lite0 over real emoji, mean cosine to torch 0.84 without, 0.94 with). VNNI and AMX
(and ARM's dot-product or widening kernels) accumulate in int32, exactly, so they get full 8-bit
weights: 7 bits only cost them fidelity. The resolved value and the ISA class are part of the
fingerprint, so int8 features of one CPU class are never mixed with another's.

Float nodes: an encoder may keep a few graph nodes in float on a CPU class (`Encoder.int8_float_nodes`,
found by bench/int8_sensitivity.py: each node quantised alone, the worst kept in float until the
guard passes). On AVX2, EfficientNet-Lite0's stem conv and first depthwise conv alone cost most of
its fidelity (cosine 0.944 -> 0.985 with both in float; 0.993 with the rest of its 112 x 112 layers too). The list is part
of the fingerprint and of the model record when it is not empty.

The fidelity guard (`guard_int8_fidelity`, featurize only): after quantising, the int8 model and
torch (fp32) encode real held-out training inputs; below `min_mean_cosine` mean or `min_p05_cosine`
5th percentile of the per-item cosine, the encoder falls back to fp32 ONNX with a warning. The
measurement is cached beside the int8 model; the decision is recorded in the model folder as the
runtime actually used (`onnx` after a fallback), so a served model rebuilds it offline without
measuring again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import platform
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
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


# --- the CPU's int8 instruction set ----------------------------------------------------------

# ISA classes whose int8 dot products accumulate in int32 (no int16 saturation): full 8-bit weights
FULL_RANGE_ISAS = ("amx", "vnni", "arm-dot", "arm")


def read_cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (x86 `flags`, ARM `Features`); empty where there is none."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def classify_isa(flags: set[str], machine: str) -> str:
    """A CPU's int8 class from its flags and `platform.machine()`: amx|vnni|avx2|x86|arm-dot|arm|unknown.

    x86 without VNNI (`avx2`, or `x86`: SSE only or flags unknown) multiplies u8 by s8 with
    (V)PMADDUBSW, whose int16 pair sums saturate; VNNI (avx512_vnni, avx_vnni) and AMX accumulate in
    int32. ARM64 uses SDOT/UDOT (`asimddp`) or widening 16-bit products into 32-bit sums: exact too.
    """
    m = machine.lower()
    if m in ("x86_64", "amd64", "i386", "i686", "x86"):
        if "amx_int8" in flags:
            return "amx"
        if flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8"}:
            return "vnni"
        return "avx2" if "avx2" in flags else "x86"
    if m in ("aarch64", "arm64") or m.startswith("arm"):
        return "arm-dot" if "asimddp" in flags else "arm"
    return "unknown"


@lru_cache(maxsize=1)
def cpu_isa() -> str:
    """This CPU's int8 class (`classify_isa` of /proc/cpuinfo and the machine)."""
    return classify_isa(read_cpu_flags(), platform.machine())


def resolve_reduce_range(reduce_range: bool | str, isa: str) -> bool:
    """`auto`: 7-bit weights (True) unless the ISA class accumulates int8 products exactly; true/false as given."""
    if isinstance(reduce_range, bool):
        return reduce_range
    if str(reduce_range).lower() != AUTO:
        raise ValueError(f"featurize.int8.reduce_range must be auto, true or false, got {reduce_range!r}")
    return isa not in FULL_RANGE_ISAS


@dataclass(frozen=True)
class Int8Settings:
    """Static int8 quantisation settings (the model's fields are part of the fingerprint of an onnx-int8 encoder)."""

    calibration_size: int = 64  # training inputs whose activation ranges set the scales
    seed: int = 0  # which training inputs (a seeded sample)
    per_channel: bool = True
    reduce_range: bool | str = AUTO  # auto: by the CPU's ISA class (module docstring); true: 7-bit weights
    calibrate_method: str = "minmax"  # minmax | entropy | percentile
    isa: str = ""  # the ISA class it was resolved on ("" in records made before ISA classes)
    # the fidelity guard (guard_int8_fidelity): not the model's identity, a model that fails it is not used
    fidelity_size: int = 64  # held-out training inputs (after the calibration sample); 0 = no check
    min_mean_cosine: float = 0.985
    min_p05_cosine: float = 0.95
    # static | dynamic: set from the encoder (Encoder.int8_scheme) when "", never a param
    scheme: str = ""
    # graph nodes kept in float (their inputs and weights not quantised): set from the encoder's measured list
    # for the ISA class (Encoder.int8_float_nodes, bench/int8_sensitivity.py) when None, never a param
    float_nodes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.float_nodes is not None:  # a JSON record gives a list
            object.__setattr__(self, "float_nodes", tuple(str(n) for n in self.float_nodes))

    def resolved(self, isa: str | None = None) -> Int8Settings:
        """These settings with `reduce_range` a bool and `isa` set (this CPU's class unless given)."""
        isa = self.isa or isa or cpu_isa()
        return replace(self, reduce_range=resolve_reduce_range(self.reduce_range, isa), isa=isa)

    def ident(self) -> dict[str, Any]:
        """The fields that define the int8 model (hashed into the fingerprint, recorded in model folders)."""
        if not isinstance(self.reduce_range, bool):
            raise ValueError("Int8Settings.ident: resolve reduce_range first (Int8Settings.resolved)")
        if self.scheme not in SCHEMES:
            raise ValueError(f"Int8Settings.ident: scheme must be one of {', '.join(SCHEMES)} (set by the encoder), got {self.scheme!r}")
        if self.float_nodes is None:
            raise ValueError("Int8Settings.ident: float_nodes must be set (by the encoder: Encoder.set_runtime)")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _GUARD_FIELDS}
        if self.float_nodes:
            out["float_nodes"] = sorted(self.float_nodes)  # a set: its order is no part of the model
        else:
            out.pop("float_nodes")  # records made before float nodes (and models with none) keep their fingerprints
        if not self.isa:
            out.pop("isa")  # records made before ISA classes keep their fingerprints
        if self.scheme == "static":
            out.pop("scheme")  # records made before schemes (all static) keep their fingerprints
        else:  # dynamic: no calibration defines the model
            for name in ("calibration_size", "seed", "calibrate_method"):
                out.pop(name)
        return out

    @property
    def calibrated(self) -> bool:
        """True when the calibration inputs define the int8 model (static ranges); dynamic only checks with them."""
        return self.scheme == "static"


_GUARD_FIELDS = ("fidelity_size", "min_mean_cosine", "min_p05_cosine")
SCHEMES = ("static", "dynamic")


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
    return sample_int8_inputs(values, content, settings)[0]


def sample_int8_inputs(
    values: Sequence[str], content: Callable[[str], bytes], settings: Int8Settings, held_out: int = 0
) -> tuple[Calibration, list[bytes]]:
    """The calibration sample and up to `held_out` more distinct readable inputs of the same seeded order
    (not used for calibration: what the fidelity guard measures on)."""
    out = _sample_distinct(values, content, settings.seed, settings.calibration_size + held_out)
    return Calibration(out[: settings.calibration_size], settings.seed), out[settings.calibration_size :]


def _sample_distinct(values: Sequence[str], content: Callable[[str], bytes], seed: int, size: int) -> list[bytes]:
    order = list(range(len(values)))
    random.Random(seed).shuffle(order)
    seen: set[bytes] = set()
    out: list[bytes] = []
    for i in order:
        if len(out) >= size:
            break
        try:
            data = content(values[i])
        except (OSError, ValueError):
            continue  # an unreadable sample is reported by featurize itself
        key = hashlib.sha256(data).digest()
        if key not in seen:
            seen.add(key)
            out.append(data)
    return out


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


@contextlib.contextmanager
def _preprocessed(fp32: Path, out: Path) -> Iterator[Path]:
    """ONNX Runtime's quantisation pre-processing of `fp32` (shape inference, graph optimisation) beside `out`."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    try:
        yield pre
    finally:
        pre.unlink(missing_ok=True)


def float_nodes(pre: Path, settings: Int8Settings) -> list[str]:
    """The settings' float nodes, each checked to be a node of the graph at `pre` (ONNX Runtime ignores unknown names:
    a renamed node after an exporter change would silently be quantised again)."""
    wanted = list(settings.float_nodes or ())
    if wanted:
        import onnx

        names = {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node}
        missing = [n for n in wanted if n not in names]
        if missing:
            raise ValueError(f"int8 float nodes not in the exported graph: {missing} (re-measure them: bench/int8_sensitivity.py)")
    return wanted


def quantize_dynamic_int8(fp32: Path, out: Path, settings: Int8Settings, op_types=None) -> None:
    """Dynamic int8: weights int8 (per channel), activations quantised per batch by ONNX Runtime at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not isinstance(settings.reduce_range, bool):
        raise ValueError("quantize_dynamic_int8: resolve reduce_range first (Int8Settings.resolved)")
    with _preprocessed(fp32, out) as pre:
        quantize_dynamic(
            str(pre),
            str(out),
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_exclude=float_nodes(pre, settings),
        )


def quantize_int8(fp32: Path, out: Path, feeds: list[dict[str, np.ndarray]], settings: Int8Settings, op_types=None) -> None:
    """Static QDQ int8 (weights int8 per channel, activations uint8) calibrated on `feeds`."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if settings.calibrate_method not in methods:
        raise ValueError(f"int8 calibrate_method must be one of {', '.join(methods)}, got {settings.calibrate_method!r}")
    if not feeds:
        raise ValueError("int8 quantisation needs calibration inputs (none were readable)")
    if not isinstance(settings.reduce_range, bool):
        raise ValueError("quantize_int8: resolve reduce_range first (Int8Settings.resolved)")

    class Reader(_Reader, CalibrationDataReader):
        pass

    with _preprocessed(fp32, out) as pre:
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
            nodes_to_exclude=float_nodes(pre, settings),
        )


def providers_for(device_type: str) -> list[str]:
    """CUDA first when the encoder is on CUDA and this onnxruntime build has it; always CPU as the fallback."""
    import onnxruntime as ort

    if device_type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device_type == "cuda":
        log.warning("onnxruntime has no CUDA provider here (the CPU wheel): the ONNX encoder runs on CPU")
    return ["CPUExecutionProvider"]


# Whether ONNX Runtime's intra-op threads spin between ops (its default) or sleep. Featurize runs a session of
# one thread per core beside its decode and cache-writer threads: spinning threads take the cores those need.
# Measured on 2 AVX2 cores (bench/featurize.py --ort-spinning on|off, 8 alternated pairs, 480 emoji, int8 at batch
# 4): the featurize path ran 155.5 img/s not spinning against 143.6 (means, +8%, faster in 8 of 8 pairs); the bare
# compute limit, with nothing beside it, 212 against 221 (-4%, slower in 6 of 8). featurize-spinning-avx2.json.
# A session of one thread (serving's workers) has no pool threads: nothing changes there.
ALLOW_SPINNING = False


def create_session_options(threads: int):
    """`threads` intra-op threads (not spinning: ALLOW_SPINNING), one inter-op thread, sequential execution, full
    graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if ALLOW_SPINNING else "0")
    return so


def create_session(path: Path, threads: int, device_type: str = "cpu"):
    """An InferenceSession of the file at `path` with `create_session_options(threads)`."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), create_session_options(threads), providers=providers_for(device_type))


def onnx_folder(encoder: Encoder, cache_dir: Path) -> Path:
    """<cache_dir>/<fingerprint>-<precision>: the same namespace as the encoder's feature cache."""
    return Path(cache_dir) / re.sub(r"[^A-Za-z0-9._@+-]", "_", f"{encoder.fingerprint}-{encoder.precision}")


def build_onnx_file(encoder: Encoder, cache_dir: Path) -> Path:
    """The encoder's ONNX file for its runtime, from the cache or built (export, then quantise) into it.

    Layout: <cache_dir>/<fingerprint>/model.onnx (+ encoder.json for people). Built in a temporary
    folder and renamed into place, so concurrent builders (two service workers) never see half a file.
    """
    folder = onnx_folder(encoder, cache_dir)
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
            if encoder.runtime == "onnx-int8" and encoder.int8.calibrated:
                feeds = encoder.calibration_feeds()
                quantize_int8(fp32, tmp / "model.onnx", feeds, encoder.int8, encoder.int8_op_types)
                fp32.unlink()
            elif encoder.runtime == "onnx-int8":
                quantize_dynamic_int8(fp32, tmp / "model.onnx", encoder.int8, encoder.int8_op_types)
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


# --- the fidelity guard -------------------------------------------------------------------------


def measure_int8_fidelity(encoder: Encoder, contents: Sequence[bytes]) -> np.ndarray:
    """Per-item cosine of the encoder's int8 embeddings to torch's (fp32, no autocast) on `contents`."""
    import torch

    items = [encoder.prepare(encoder.item_from_content(c)) for c in contents]
    order = list(range(len(items)))
    if encoder.batch_by_length:
        order.sort(key=lambda i: len(items[i]))
    cos = np.empty(len(items), dtype=np.float64)
    for start in range(0, len(order), encoder.batch_size):
        chunk = order[start : start + encoder.batch_size]
        batch = encoder.collate([items[i] for i in chunk])
        int8 = encoder.onnx_forward(batch).double()
        with torch.inference_mode():
            ref = encoder._forward(batch).double().cpu()
        cos[chunk] = torch.nn.functional.cosine_similarity(int8, ref, dim=1, eps=1e-12).numpy()
    return cos


def int8_fidelity(encoder: Encoder, held_out: Sequence[bytes]) -> dict[str, Any]:
    """The int8 model's agreement with torch: mean, p05 and min per-item cosine over `held_out` inputs,
    topped up to `fidelity_size` with calibration inputs when the training data has too few others.

    Cached as fidelity.json beside the int8 model (by the inputs' digest and this CPU's ISA class:
    int8 kernels differ between classes), so a re-run reads it instead of measuring again.
    """
    settings = encoder.int8
    held = list(held_out)[: settings.fidelity_size]
    calibration = encoder.calibration.contents[: max(0, settings.fidelity_size - len(held))]
    contents = held + calibration
    digest = Calibration(contents).digest
    path = build_onnx_file(encoder, encoder.onnx_cache_dir).with_name("fidelity.json")
    try:
        cached = json.loads(path.read_text())
        if cached.get("inputs_digest") == digest and cached.get("cpu") == cpu_isa():
            return {k: v for k, v in cached.items() if k != "inputs_digest"}
    except (OSError, ValueError):
        pass
    start = time.perf_counter()
    cos = measure_int8_fidelity(encoder, contents)
    result = {
        "mean": round(float(cos.mean()), 5),
        "p05": round(float(np.quantile(cos, 0.05)), 5),
        "min": round(float(cos.min()), 5),
        "inputs": {"held_out": len(held), "calibration": len(calibration)},
        "against": "torch fp32",
        "cpu": cpu_isa(),
    }
    tmp = path.with_name(f".fidelity-{os.getpid()}-{threading.get_ident()}.json")
    tmp.write_text(json.dumps({**result, "inputs_digest": digest}, indent=2) + "\n")
    tmp.replace(path)
    log.info("%s int8 fidelity in %.1f s: %s", encoder.name, time.perf_counter() - start, result)
    return result


def guard_int8_fidelity(encoder: Encoder, held_out: Sequence[bytes]) -> Encoder:
    """An onnx-int8 encoder stays int8 when it agrees with torch on real inputs (`int8_fidelity`: mean and
    p05 cosine at least `min_mean_cosine` / `min_p05_cosine`); otherwise it falls back to fp32 ONNX, with
    a warning naming the numbers. Either way `describe()` records the measurement; returns the encoder."""
    settings = encoder.int8
    if encoder.runtime != "onnx-int8" or settings.fidelity_size <= 0:
        return encoder
    result = int8_fidelity(encoder, held_out)
    guard = {"min_mean_cosine": settings.min_mean_cosine, "min_p05_cosine": settings.min_p05_cosine}
    if result["mean"] >= settings.min_mean_cosine and result["p05"] >= settings.min_p05_cosine:
        encoder.int8_fidelity = {**result, **guard}
        return encoder
    n = result["inputs"]["held_out"] + result["inputs"]["calibration"]
    log.warning(
        "encoder %s: int8 (reduce_range %s on a %s CPU, %d nodes in float) agrees with torch at mean cosine %.4f, "
        "p05 %.4f, min %.4f on %d real inputs, below the guard (mean >= %s, p05 >= %s): it runs as fp32 ONNX instead",
        encoder.name, settings.reduce_range, settings.isa, len(settings.float_nodes or ()), result["mean"],
        result["p05"], result["min"], n,
        settings.min_mean_cosine, settings.min_p05_cosine,
    )  # fmt: skip
    failed = {"int8": settings.ident(), **result, **guard}
    encoder.set_runtime("onnx", threads=encoder.runtime_threads, cache_dir=encoder.onnx_cache_dir)
    encoder.int8_fallback = failed
    return encoder


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
    resolve_reduce_range(settings.reduce_range, cpu_isa())  # auto, true or false
    if settings.fidelity_size < 0:
        raise ValueError("featurize.int8.fidelity_size must be >= 0 (0: no fidelity check)")
    for key in ("min_mean_cosine", "min_p05_cosine"):
        if not -1.0 <= getattr(settings, key) <= 1.0:
            raise ValueError(f"featurize.int8.{key} must be a cosine, between -1 and 1")
    if settings.calibrate_method not in ("minmax", "entropy", "percentile"):
        raise ValueError(f"featurize.int8.calibrate_method must be minmax, entropy or percentile, got {settings.calibrate_method!r}")
    if p.onnx_threads < 0:
        raise ValueError("featurize.onnx_threads must be >= 0")


def apply_featurize_runtime(
    encoder: Encoder, p: Any, modality: str, root: Path, train_values: Callable[[], Sequence[str]], content: Callable[[str], bytes]
) -> Encoder:
    """Set the runtime featurize params `p` name for `modality`; int8 calibrates on a seeded sample of
    `train_values()` (reduce_range resolved for this CPU) and must then pass the fidelity guard on the
    next inputs of that sample, or the encoder runs as fp32 ONNX (`guard_int8_fidelity`)."""
    settings = Int8Settings(**asdict(p.int8)).resolved()
    cache = paths.resolve(root, p.onnx_cache_dir)
    held_out: list[bytes] = []

    def calibration() -> Calibration:
        sample, rest = sample_int8_inputs(list(train_values()), content, settings, settings.fidelity_size)
        held_out.extend(rest)
        return sample

    encoder.set_runtime(
        runtime_for(modality, p.runtime, p.runtimes),
        threads=p.onnx_threads or p.cpu_threads,
        cache_dir=cache,
        int8=settings,
        calibration=calibration,
    )
    return guard_int8_fidelity(encoder, held_out)

"""What every encoder is: a frozen pretrained model that owns its preprocessing.

An encoder turns a list of decoded items (PIL RGB images, normalised strings, ...) into a
float32 CPU tensor [N, dim]. It is split into three steps so that featurize can run the first
one in DataLoader workers and training, evaluation and serving still share one code path:

    prepare(item)      per item, CPU, picklable: resize to a uint8 tensor, keep a string, ...
    collate(prepared)  a list of prepared items -> one batch
    forward(batch)     the model: device copy, normalisation, autocast, pooling -> [B, dim] float32 CPU

`encode(items)` chains the three in batches. The model is loaded lazily on the first forward,
so a fully cached featurize run never loads weights.

`forward` runs under the encoder's runtime (mmfusion.encoders.runtime): `torch` (default), or the
same module exported to ONNX (`onnx`, `onnx-int8`), chosen with `set_runtime`. An exportable
encoder implements `export_spec` (the torch module over a collated batch) and `onnx_feed`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
from abc import ABC, abstractmethod
from dataclasses import replace
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfusion.devices import resolve_device
from mmfusion.errors import UserError

log = logging.getLogger(__name__)
_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


class EncoderUnavailableError(UserError):
    """An encoder exists in the registry but cannot be built here (e.g. its weights need a model hub)."""


def file_sha256(path: str | Path) -> str:
    """sha256 of a weights file, memoised per (path, size, mtime) within the process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest.hexdigest()
    return digest.hexdigest()


def require_hub(what: str, host: str, offline: bool) -> None:
    """Fail at once, with a clear message, when `what` needs `host` and this machine cannot reach it."""
    hint = "use an offline encoder (list_encoders(offline_only=True))"
    if offline:
        raise EncoderUnavailableError(f"{what} is not available offline (HF_HUB_OFFLINE=1 or no local copy); {hint}")
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as exc:
        raise EncoderUnavailableError(f"{what} needs {host}, which is unreachable ({exc}); {hint}") from exc


def hub_offline() -> bool:
    """True when the environment says no model hub may be contacted."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bf16 where the GPU has it, else fp16); plain fp32 on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Encoder(ABC):
    """A frozen pretrained encoder for one modality; see the module docstring for the three steps."""

    name: str
    modality: str
    dim: int
    # Batch sizes measured per device type (bench/featurize.py); `batch_size=None` picks from here.
    default_batch_sizes: dict[str, int] = {"cpu": 8, "cuda": 256}
    # Texts batch better sorted by length (less padding); images are all the same size.
    batch_by_length: bool = False
    # Preprocessing may cut an item (texts over the tokenizer limit): see count_truncated.
    may_truncate: bool = False
    # The runtime `auto` picks per device (measured: docs/encoders.md); only for exportable encoders.
    default_runtimes: dict[str, str] = {"cpu": "torch", "cuda": "torch"}
    # Op types int8 quantises (None: every op ONNX Runtime can quantise).
    int8_op_types: tuple[str, ...] | None = None
    # How onnx-int8 quantises activations: static (ranges calibrated on training inputs) | dynamic (per batch)
    int8_scheme: str = "static"
    # onnx-int8: the ONNX graph nodes kept in float, per CPU int8 class (runtime.cpu_isa), where quantising them
    # alone costs the most fidelity on that class: measured by bench/int8_sensitivity.py, not guessed
    int8_float_nodes: dict[str, tuple[str, ...]] = {}

    def __init__(self, device: str | torch.device = "auto", batch_size: int | None = None):
        self.device = resolve_device(device)
        self.batch_size = int(batch_size or self.default_batch_sizes.get(self.device.type, 8))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.amp_dtype = autocast_dtype(self.device)
        self._model: torch.nn.Module | None = None
        self._load_lock = threading.Lock()
        self.runtime = "torch"
        self.runtime_threads = 0
        self.onnx_cache_dir: Path | None = None
        self.int8 = None  # runtime.Int8Settings for onnx-int8
        self.calibration = None  # runtime.Calibration for onnx-int8
        self.int8_fidelity = None  # onnx-int8: its measured agreement with torch (runtime.guard_int8_fidelity)
        self.int8_fallback = None  # onnx after int8 failed that guard: the int8 settings and measurement
        self._session = None
        self._session_lock = threading.Lock()  # not _load_lock: building a session loads the model
        self.tuned_file: Path | None = None  # fine-tuned top weights over the pretrained ones (load_tuned)

    # --- identity -------------------------------------------------------------------------

    @property
    @abstractmethod
    def preprocessing(self) -> dict[str, Any]:
        """The JSON-able preprocessing config (size, resize policy, normalisation, max length)."""

    @abstractmethod
    def weights_files(self) -> list[Path]:
        """The files whose bytes define the weights (hashed into the fingerprint)."""

    @property
    def fingerprint(self) -> str:
        """`<name>@<digest>`: the digest covers the name, the weights files' sha256, the preprocessing
        and, for an ONNX runtime, the runtime, opset, int8 settings and calibration inputs' digest
        (torch adds nothing, so torch fingerprints are those of before runtimes existed)."""
        if not hasattr(self, "_fingerprint"):
            ident = {
                "name": self.name,
                "weights": [file_sha256(p) for p in self.weights_files()]
                + ([file_sha256(self.tuned_file)] if self.tuned_file else []),
                "preprocessing": self.preprocessing,
            }
            if self.runtime != "torch":
                ident["runtime"] = self.runtime_ident()
            digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
            self._fingerprint = f"{self.name}@{digest}"
        return self._fingerprint

    @property
    def precision(self) -> str:
        """The numeric precision of forward: fp32 on CPU, bf16/fp16 under CUDA autocast, int8 for onnx-int8."""
        if self.runtime == "onnx-int8":
            return "int8"
        if self.runtime == "onnx":
            return "fp32"
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def runtime_ident(self) -> dict[str, Any]:
        """What defines the runtime's numerics (hashed into the fingerprint)."""
        from mmfusion.encoders.runtime import OPSET

        ident: dict[str, Any] = {"runtime": self.runtime, "opset": OPSET}
        if self.runtime == "onnx-int8":
            ident["int8"] = self.int8.ident()
            if self.int8.calibrated:
                ident["calibration"] = self.calibration.digest
        return ident

    def describe(self, brief: bool = False) -> dict[str, Any]:
        """The entry written into features/meta.json (and every model's config) for this encoder's modality.

        `runtime` records how to rebuild the runtime offline: for onnx-int8 that includes the
        calibration inputs themselves (base64 content; `brief` leaves them out).
        """
        runtime: dict[str, Any] = {"name": self.runtime}
        if self.runtime != "torch":
            runtime.update(self.runtime_ident())
            runtime.pop("runtime")
        if self.runtime == "onnx-int8":
            runtime["calibration"] = {"size": len(self.calibration.contents), "digest": self.calibration.digest}
            if not brief:
                runtime["calibration"] = self.calibration.to_json()
        # not in the fingerprint: the decision is the runtime itself (onnx after a fallback)
        if self.int8_fidelity:
            runtime["fidelity"] = self.int8_fidelity
        if self.int8_fallback:
            runtime["int8_fallback"] = self.int8_fallback
        return {
            "encoder": self.name,
            "dim": self.dim,
            "fingerprint": self.fingerprint,
            "preprocessing": self.preprocessing,
            "precision": self.precision,
            "runtime": runtime,
        }

    # --- runtimes -------------------------------------------------------------------------

    @property
    def exportable(self) -> bool:
        """True when the encoder can run under onnx / onnx-int8 (it implements export_spec)."""
        return type(self).export_spec is not Encoder.export_spec

    def set_runtime(
        self,
        runtime: str = "torch",
        threads: int = 0,
        cache_dir: str | Path | None = None,
        int8: Any = None,
        calibration: Any = None,
    ) -> Encoder:
        """Run forward under `runtime` (torch | onnx | onnx-int8 | auto); returns self.

        `threads`: ONNX Runtime intra-op threads (0: torch's current thread count). `cache_dir`:
        where exported files live (default: $MMFUSION_ONNX_CACHE or .cache/onnx). onnx-int8 needs
        `int8` (runtime.Int8Settings) and `calibration` (runtime.Calibration, or a zero-argument
        callable returning one: only called for onnx-int8).
        """
        from mmfusion.encoders.runtime import Int8Settings, cpu_isa, default_cache_dir, resolve_runtime

        runtime = resolve_runtime(runtime, self)
        if runtime == "onnx-int8":
            int8 = int8 or Int8Settings()
            if not isinstance(int8.reduce_range, bool):  # auto: by this CPU's ISA class
                int8 = int8.resolved()
            if not int8.scheme:
                int8 = replace(int8, scheme=self.int8_scheme)
            if int8.float_nodes is None:  # the nodes measured to need float on this CPU class (an explicit
                # reduce_range is not resolved above, so its settings may carry no ISA class yet: this CPU's)
                int8 = replace(int8, float_nodes=tuple(self.int8_float_nodes.get(int8.isa or cpu_isa(), ())))
            calibration = calibration() if callable(calibration) else calibration
            if calibration is None or not calibration.contents:
                raise ValueError(f"encoder {self.name!r}: runtime onnx-int8 needs calibration inputs (real training samples)")
        self.runtime = runtime
        self.runtime_threads = int(threads)
        self.onnx_cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.int8 = int8 if runtime == "onnx-int8" else None
        self.calibration = calibration if runtime == "onnx-int8" else None
        self.int8_fidelity = self.int8_fallback = None
        self._session = None
        self.__dict__.pop("_fingerprint", None)
        return self

    def set_runtime_from(self, recorded: dict[str, Any] | None, threads: int = 0, cache_dir: str | Path | None = None) -> Encoder:
        """Set the runtime a model folder recorded (`describe()["runtime"]`); none recorded means torch."""
        from mmfusion.encoders.runtime import FULL_RANGE_ISAS, Calibration, Int8Settings, cpu_isa

        recorded = recorded or {"name": "torch"}
        # a record without a scheme was made when every int8 model was static; without float nodes, it had none
        int8 = Int8Settings(**{"scheme": "static", "float_nodes": (), **recorded["int8"]}) if "int8" in recorded else None
        calibration = Calibration.from_json(recorded["calibration"]) if "calibration" in recorded else None
        # as recorded, never measured again: the same runtime, so the same fingerprint
        self.set_runtime(recorded["name"], threads=threads, cache_dir=cache_dir, int8=int8, calibration=calibration)
        self.int8_fidelity, self.int8_fallback = recorded.get("fidelity"), recorded.get("int8_fallback")
        if int8 is not None and int8.reduce_range is False and cpu_isa() not in FULL_RANGE_ISAS:
            log.warning(
                "encoder %s: its int8 model has full 8-bit weights (quantised on CPU class %s), but this CPU (%s) sums "
                "int8 products in int16, which saturates them: embeddings drift from those the model was trained on; "
                "re-run featurize on this kind of CPU, or with featurize.runtime onnx",
                self.name, int8.isa or "unrecorded", cpu_isa(),
            )  # fmt: skip
        return self

    def export_spec(self) -> Any:
        """runtime.ExportSpec: the torch module over a collated batch, for ONNX export (exportable encoders)."""
        raise NotImplementedError(f"encoder {self.name!r} has no ONNX export")

    def onnx_feed(self, batch: Any) -> dict[str, np.ndarray]:
        """A collated batch as the ONNX graph's inputs (numpy)."""
        raise NotImplementedError(f"encoder {self.name!r} has no ONNX export")

    def onnx_forward(self, batch: Any) -> torch.Tensor:
        """One collated batch through the ONNX session -> [B, dim] float32 CPU (an encoder whose graph is only
        part of its forward, like resemblyzer's LSTM, overrides this)."""
        (out,) = self.session.run(None, self.onnx_feed(batch))
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def item_from_content(self, content: bytes) -> Any:
        """A decoded item from a sample's content bytes (calibration inputs are stored as content)."""
        raise NotImplementedError

    def calibration_feeds(self, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
        """The calibration inputs as ONNX feeds, in batches."""
        items = [self.prepare(self.item_from_content(c)) for c in self.calibration.contents]
        order = list(range(len(items)))
        if self.batch_by_length:
            order.sort(key=lambda i: len(items[i]))
        return [self.onnx_feed(self.collate([items[i] for i in chunk])) for chunk in _chunks(order, batch_size)]

    @property
    def session(self):
        """The ONNX Runtime session (built or loaded from the ONNX cache on first use)."""
        if self._session is None:
            with self._session_lock:
                if self._session is None:
                    from mmfusion.encoders.runtime import build_onnx_file, create_session, onnx_threads

                    path = build_onnx_file(self, self.onnx_cache_dir)
                    self._session = create_session(path, onnx_threads(self.runtime_threads), self.device.type)
        return self._session

    # --- fine-tuning (mmfusion.training.finetune) -----------------------------------------

    tunable: bool = False  # implements bottom() and top(): it can be cut into a frozen bottom and a trainable top

    def bottom(self, batch: Any, blocks: int) -> torch.Tensor:
        """A collated batch -> the float32 activations entering the top `blocks` blocks, flattened [B, n] (no grad)."""
        raise self._not_tunable()

    def top(self, blocks: int) -> torch.nn.Module:
        """The top `blocks` blocks and the pooling, sharing the model's parameters: `bottom`'s flattened activations
        -> embeddings [B, dim], as forward gives them. Trainable; kept in eval mode (frozen norm statistics)."""
        raise self._not_tunable()

    def _not_tunable(self) -> UserError:
        return UserError(
            f"encoder {self.name!r} cannot be fine-tuned (no cut into a frozen bottom and a trainable top); "
            f"drop {self.modality!r} from train.finetune.blocks"
        )

    def load_tuned(self, path: str | Path) -> Encoder:
        """Put the fine-tuned top weights saved at `path` (safetensors, the model's own keys) over the pretrained
        ones. They are hashed into the fingerprint, so features, ONNX files and the model folder's check follow."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"encoder {self.name!r}: tuned weights {path} are missing")
        self.tuned_file = path
        self.__dict__.pop("_fingerprint", None)
        self._session = None
        if self._model is not None:
            self._apply_tuned(self._model, load_file(str(path)))
        return self

    def _apply_tuned(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = model.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ValueError(f"encoder {self.name!r}: tuned weights {self.tuned_file} hold keys it lacks: {unknown[:3]}")
        model.load_state_dict({**own, **{k: v.to(own[k].device, own[k].dtype) for k, v in state.items()}})

    # --- the three steps ------------------------------------------------------------------

    @abstractmethod
    def load_model(self) -> torch.nn.Module:
        """Build the model (eval mode, on self.device); called once, lazily."""

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    model = self.load_model()
                    if self.tuned_file is not None:
                        from safetensors.torch import load_file

                        self._apply_tuned(model, load_file(str(self.tuned_file)))
                    model.eval().requires_grad_(False)
                    self._model = model
        return self._model

    @abstractmethod
    def prepare(self, item: Any) -> Any:
        """Per-item CPU preprocessing (picklable: it runs in DataLoader workers)."""

    @abstractmethod
    def collate(self, prepared: list[Any]) -> Any:
        """Stack prepared items into one batch."""

    @abstractmethod
    def _forward(self, batch: Any) -> torch.Tensor:
        """Model forward on one collated batch; returns [B, dim] on the device."""

    def forward(self, batch: Any) -> torch.Tensor:
        """One collated batch -> [B, dim] float32 on CPU, under inference_mode and autocast (or through ONNX Runtime)."""
        if self.runtime != "torch":
            return self.onnx_forward(batch)
        amp = (
            torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp:
            out = self._forward(batch)
        return out.float().cpu()

    def encode(self, items: Sequence[Any]) -> torch.Tensor:
        """Encode a list of decoded items -> torch.Tensor [N, dim] float32 on CPU (batched inside)."""
        items = list(items)
        if not items:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        order = list(range(len(items)))
        if self.batch_by_length:
            order.sort(key=lambda i: len(items[i]))
        out = torch.empty((len(items), self.dim), dtype=torch.float32)
        for chunk in _chunks(order, self.batch_size):
            out[chunk] = self.forward(self.collate([self.prepare(items[i]) for i in chunk]))
        return out

    def count_truncated(self, items: Sequence[Any]) -> int:
        """How many items preprocessing would cut (texts over the tokenizer limit); 0 by default."""
        return 0

    def count_truncated_values(self, source: Any, values: Sequence[str]) -> int:
        """How many of the manifest `values` (of modality spec `source`) preprocessing would cut: by default
        each is loaded (unreadable ones skipped: featurize reports them) and `count_truncated` counts.
        An encoder whose inputs are costly to load counts from something cheaper (audio: file headers)."""
        from mmfusion.modalities.base import InputDecodeError

        items = []
        for value in values:
            try:
                items.append(source.load(value))
            except InputDecodeError:
                continue
        return self.count_truncated(items)

    @property
    def input_settings(self) -> dict[str, Any]:
        """Modality settings the encoder's inputs must have been decoded with (audio: {"sample_rate": 16000});
        featurize refuses a mismatch with `modalities.<modality>` (see `check_input_settings`)."""
        return {}

    def check_input_settings(self, settings: dict[str, Any]) -> None:
        """UserError when the modality's decode settings differ from what this encoder takes."""
        for key, want in self.input_settings.items():
            if key in settings and settings[key] != want:
                raise UserError(
                    f"encoder {self.name!r} takes {self.modality} with {key}={want!r}, but modalities.{self.modality}."
                    f"{key} is {settings[key]!r}: set modalities.{self.modality}.{key}: {want!r} in params.yaml"
                )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, device={self.device}, batch_size={self.batch_size}, "
            f"runtime={self.runtime!r})"
        )


class ForwardModule(torch.nn.Module):
    """An encoder's `_forward` as an nn.Module over named input tensors (what ONNX export traces)."""

    def __init__(self, encoder: Encoder, names: Sequence[str], as_dict: bool):
        super().__init__()
        self.model = encoder.model  # registered, so the export sees its parameters
        self._encoder, self._names, self._as_dict = encoder, tuple(names), as_dict

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        batch = dict(zip(self._names, tensors)) if self._as_dict else tensors[0]
        return self._encoder._forward(batch).float()


def _chunks(seq: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]

"""What every encoder is: a frozen pretrained model that owns its preprocessing.

An encoder turns a list of decoded items (PIL RGB images, normalised strings, ...) into a
float32 CPU tensor [N, dim]. It is split into three steps so that featurize can run the first
one in DataLoader workers and training, evaluation and serving still share one code path:

    prepare(item)      per item, CPU, picklable: resize to a uint8 tensor, keep a string, ...
    collate(prepared)  a list of prepared items -> one batch
    forward(batch)     the model: device copy, normalisation, autocast, pooling -> [B, dim] float32 CPU

`encode(items)` chains the three in batches. The model is loaded lazily on the first forward,
so a fully cached featurize run never loads weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmfusion.devices import resolve_device
from mmfusion.errors import UserError

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

    def __init__(self, device: str | torch.device = "auto", batch_size: int | None = None):
        self.device = resolve_device(device)
        self.batch_size = int(batch_size or self.default_batch_sizes.get(self.device.type, 8))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.amp_dtype = autocast_dtype(self.device)
        self._model: torch.nn.Module | None = None
        self._load_lock = threading.Lock()

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
        """`<name>@<digest>`: the digest covers the name, the weights files' sha256 and the preprocessing."""
        if not hasattr(self, "_fingerprint"):
            ident = {
                "name": self.name,
                "weights": [file_sha256(p) for p in self.weights_files()],
                "preprocessing": self.preprocessing,
            }
            digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
            self._fingerprint = f"{self.name}@{digest}"
        return self._fingerprint

    @property
    def precision(self) -> str:
        """The numeric precision of forward: fp32 on CPU, bf16/fp16 under CUDA autocast."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def describe(self) -> dict[str, Any]:
        """The entry written into features/meta.json for this encoder's modality."""
        return {
            "encoder": self.name,
            "dim": self.dim,
            "fingerprint": self.fingerprint,
            "preprocessing": self.preprocessing,
            "precision": self.precision,
        }

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
        """One collated batch -> [B, dim] float32 on CPU, under inference_mode and autocast."""
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, batch_size={self.batch_size})"


def _chunks(seq: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]

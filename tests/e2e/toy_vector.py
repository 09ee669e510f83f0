"""A third modality in one module, as docs/adding-a-modality.md says: a fixed-length numeric vector in a
`.npy` file, with its spec (manifest column, files, clean rule, dedup key, expectations, HTTP field, log
statistic, kept input) and a weightless encoder.

tests/e2e/test_toy_modality.py loads it with `MMFUSION_PLUGINS=tests.e2e.toy_vector` into every process
(the DVC stages, `bentoml serve`, the monitor, the export) and edits no other file. Never import it into the
test process itself: the registries are process-wide.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfusion.encoders.base import Encoder
from mmfusion.encoders.registry import register_encoder
from mmfusion.errors import RequestError
from mmfusion.modalities import ModalitySpec, register_modality
from mmfusion.modalities.base import Dropped

DIM = 8


def read_vector(data: bytes) -> np.ndarray:
    """A 1-d float .npy of DIM finite numbers; ValueError otherwise."""
    try:
        vector = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"not a .npy array ({exc})") from exc
    if vector.shape != (DIM,) or vector.dtype.kind != "f" or not np.isfinite(vector).all():
        raise ValueError(f"expected {DIM} finite floats, got shape {vector.shape} of {vector.dtype}")
    return vector.astype(np.float32)


@register_modality
class VectorSpec(ModalitySpec):
    """Vectors: a path to a .npy file in the manifest's `vector` column."""

    name = "vector"
    column = "vector"
    folder = "vectors"
    http = "file"
    stats = ("vector_norm",)
    log_fields = ("vector_bytes",)
    keep_share = 1.0
    clean_fields = {"vector_sha256": ""}
    dedup_key = "vector_sha256"

    def content(self, value: str) -> bytes:
        return (self.root / value).read_bytes()

    def load(self, value: str) -> np.ndarray:
        return read_vector(self.content(value))

    def measure(self, value: str) -> dict[str, float]:
        return {"vector_norm": float(np.linalg.norm(self.load(value)))}

    def check(self, raw: Any, ctx: Any) -> tuple[Any | None, dict[str, Any]]:
        try:
            vector = read_vector(bytes(raw))
        except ValueError as exc:
            raise RequestError(400, "invalid_vector", f"vector: {exc}") from exc
        return vector, {"vector_norm": float(np.linalg.norm(vector)), "vector_bytes": len(raw)}

    def suffix(self, fmt: str | None) -> str:
        return ".npy"

    def example(self) -> np.ndarray:
        return np.zeros(DIM, dtype=np.float32)

    def clean(self, raw: str, data: bytes | None, out_root: Path, params: Any) -> dict[str, Any]:
        try:
            read_vector(data)
        except ValueError as exc:
            raise Dropped("undecodable_vector", str(exc)) from exc
        name = f"{self.folder}/{Path(raw).stem}.npy"
        (out_root / name).write_bytes(data)
        return {self.column: name, "vector_sha256": hashlib.sha256(data).hexdigest()}

    def validation_columns(self, df, root: Path) -> dict[str, Any]:
        return {"vector_exists": [bool(p) and (root / p).is_file() for p in df[self.column]]}

    def expectations(self, gxe: Any, params: Any, where: Any) -> list:
        return [gxe.ExpectColumnValuesToBeInSet(column="vector_exists", value_set=[True], **where)]


class VectorStatsEncoder(Encoder):
    """A weightless encoder: the vector and its squares."""

    name = "vector_stats"
    modality = "vector"
    dim = 2 * DIM

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"dim": DIM}

    def weights_files(self) -> list[Path]:
        return []

    def load_model(self) -> torch.nn.Module:
        return torch.nn.Identity()

    def prepare(self, item: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(item, dtype=np.float32))

    def collate(self, prepared: list[Any]) -> torch.Tensor:
        return torch.stack(prepared)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch, batch * batch], dim=1)


register_encoder("vector_stats", "vector", lambda device="auto", batch_size=None: VectorStatsEncoder(device, batch_size))

"""featurize on a cluster: the cache misses of one modality, cut into shards, encoded by workers into the cache.

The driver (the stage's process) hashes every sample and finds the misses exactly as the local
engine does (mmfusion.features.extract); the misses, in the local engine's order, are cut into
shards of whole encoder batches, so every shard encodes the same batches the local engine would
and the features are byte-identical. Each shard is one Prefect task (mmfusion.compute.map_tasks):
the worker builds the encoder once per process (`worker_encoder`), writes every vector to the
shared content-addressed cache and returns a small summary, never arrays. A shard that fails
leaves the other shards' entries in the cache, so a rerun encodes only what is still missing.

How a worker encodes (device, precision, batch size) is the worker's: the driver asks one worker
(`describe_encoder`) and uses its answer for the cache namespace and features/meta.json.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfusion import paths
from mmfusion.compute import TasksFailedError, map_tasks, worker_device, worker_name
from mmfusion.config import ComputeParams
from mmfusion.encoders import create_encoder
from mmfusion.encoders.base import Encoder
from mmfusion.features.cache import open_cache
from mmfusion.features.extract import build_input, encode_batches


@dataclass(frozen=True)
class EncoderSpec:
    """What a worker needs to rebuild the driver's encoder and input reader (all paths absolute, shared)."""

    modality: str
    name: str
    device: str  # featurize.device: auto / cuda become the worker's own GPU (compute.worker_device)
    batch_size: int  # featurize.batch_size (0 = the encoder's default on the worker's device)
    runtime: dict[str, Any]  # Encoder.describe()["runtime"] of the driver's encoder (int8 calibration included)
    onnx_threads: int
    onnx_cache_dir: str
    cpu_threads: int  # featurize.cpu_threads: torch threads per worker process (0 = torch's default)
    num_workers: int  # image-decoding DataLoader workers inside each Dask worker
    cache_root: str  # a shared folder or an fsspec URL
    input: dict[str, Any] = field(default_factory=dict)  # build_input kwargs: root and the modality's settings

    def ident(self) -> str:
        what = [self.name, self.device, self.batch_size, self.runtime, self.onnx_threads, self.onnx_cache_dir]
        return json.dumps(what, sort_keys=True, default=str)


@dataclass(frozen=True)
class Shard:
    """Consecutive cache misses of one modality: `keys[i]` is the content key of `values[i]`."""

    spec: EncoderSpec
    index: int
    start: int  # position of keys[0] among all misses
    keys: list[str]
    values: list[str]


_ENCODERS: dict[str, Encoder] = {}
_LOCK = threading.Lock()


def worker_encoder(spec: EncoderSpec) -> Encoder:
    """The encoder of `spec`, built once per worker process (weights load on its first forward)."""
    with _LOCK:
        if spec.ident() not in _ENCODERS:
            encoder = create_encoder(spec.name, device=worker_device(spec.device), batch_size=spec.batch_size or None)
            encoder.set_runtime_from(spec.runtime, threads=spec.onnx_threads, cache_dir=spec.onnx_cache_dir)
            _ENCODERS[spec.ident()] = encoder
        return _ENCODERS[spec.ident()]


def cache_namespace(encoder: Encoder) -> str:
    """The cache namespace of an encoder's vectors: fingerprint and numeric precision."""
    return f"{encoder.fingerprint}-{encoder.precision}"


def describe_encoder(spec: EncoderSpec) -> dict[str, Any]:
    """On a worker: how it encodes (cache namespace, meta entry, device, batch size). Loads no weights."""
    encoder = worker_encoder(spec)
    return {
        "namespace": cache_namespace(encoder),
        "describe": encoder.describe(),
        "brief": encoder.describe(brief=True),
        "device": str(encoder.device),
        "batch_size": encoder.batch_size,
        "worker": worker_name(),
    }


def encode_shard(shard: Shard) -> dict[str, Any]:
    """On a worker: encode one shard into the shared cache; a small summary back (counts, failures, seconds)."""
    spec = shard.spec
    start = time.perf_counter()
    encoder = worker_encoder(spec)
    if spec.cpu_threads:
        import torch

        torch.set_num_threads(spec.cpu_threads)
    source = build_input(spec.modality, **spec.input)
    cache = open_cache(spec.cache_root, cache_namespace(encoder), encoder.dim)
    encoded, failed = encode_batches(encoder, source, shard.keys, shard.values, cache, spec.num_workers, progress=False)
    return {
        "index": shard.index,
        "encoded": encoded,
        "failed": {shard.start + i: reason for i, reason in failed.items()},
        "seconds": round(time.perf_counter() - start, 3),
        "worker": worker_name(),
        "pid": os.getpid(),
    }


def make_shards(spec: EncoderSpec, keys: list[str], values: list[str], size: int, batch_size: int) -> list[Shard]:
    """Consecutive shards of about `size` misses, each a whole number of `batch_size` batches."""
    size = max(batch_size, -(-size // batch_size) * batch_size)
    return [
        Shard(spec, i, start, keys[start : start + size], values[start : start + size])
        for i, start in enumerate(range(0, len(keys), size))
    ]


class ShardsFailedError(RuntimeError):
    """Shards that failed on the cluster, each with the misses it held; every other shard is in the cache."""

    def __init__(self, modality: str, failed: list[tuple[Shard, BaseException]], total: int, rows: list[list[int]]):
        self.modality, self.failed, self.total = modality, failed, total
        self.rows = rows  # per failed shard: the positions (in extract_features' values) of the samples it held
        first = failed[0][1]
        super().__init__(
            f"featurize {modality}: {len(failed)} of {total} shard(s) failed "
            f"(first: {type(first).__name__}: {first}); the other shards are cached"
        )


@dataclass
class ClusterEncoder:
    """`extract_features`'s `encode_misses` on the cluster: shards of `shard_size` misses as mapped Prefect tasks."""

    spec: EncoderSpec
    compute: ComputeParams
    batch_size: int
    summaries: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, keys: list[str], values: list[str], rows: list[list[int]]) -> tuple[int, dict[int, str]]:
        shards = make_shards(self.spec, keys, values, self.compute.shard_size, self.batch_size)
        try:
            self.summaries = map_tasks(encode_shard, shards, self.compute, name=f"featurize-{self.spec.modality}")
        except TasksFailedError as exc:
            self.summaries = list(exc.results.values())
            failed = [(shards[i], e) for i, e in sorted(exc.failures.items())]
            held = [[r for miss in rows[s.start : s.start + len(s.keys)] for r in miss] for s, _ in failed]
            raise ShardsFailedError(self.spec.modality, failed, len(shards), held) from exc
        failed: dict[int, str] = {}
        for summary in self.summaries:
            failed.update(summary["failed"])
        return sum(s["encoded"] for s in self.summaries), failed

    def stats(self) -> dict[str, Any]:
        """Per-shard figures for the featurize report."""
        return {
            "shards": len(self.summaries),
            "shard_seconds": [s["seconds"] for s in self.summaries],
            "workers": sorted({s["worker"] for s in self.summaries}),
        }


def describe_on_cluster(spec: EncoderSpec, compute: ComputeParams) -> dict[str, Any]:
    """`describe_encoder` on one worker of the cluster."""
    return map_tasks(describe_encoder, [spec], compute, name=f"featurize-{spec.modality}-describe")[0]


def absolute(path: str | Path, root: Path) -> str:
    """`path` (relative to the project root or absolute) as an absolute path the workers can open."""
    return str(paths.resolve(root, path).resolve())

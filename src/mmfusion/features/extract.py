"""Batched, cached feature extraction: every distinct sample content is encoded at most once.

`extract_features` hashes each sample's content, takes what the cache already holds, and
encodes only the misses: a DataLoader decodes and preprocesses them in worker processes
(pinned memory on CUDA) while the main process runs the encoder, writing each batch to the
cache as soon as it is encoded, so a killed run resumes where it stopped.

What a modality's raw value is and how to read it lives in its spec (`mmfusion.modalities`: image,
a path under the project root decoded by the one `decode_image`; text, normalised by the one
`normalize_text`): a third modality is a new registered spec, nothing here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmfusion.modalities.base import InputDecodeError
from mmfusion.encoders.base import Encoder
from mmfusion.features.cache import FeatureCache
from mmfusion.modalities import ModalitySpec, build_spec

log = logging.getLogger(__name__)


# (miss keys, miss values, rows of each miss) -> (encoded, {miss index: reason}); see extract_features
EncodeMisses = Callable[[list[str], list[str], list[list[int]]], tuple[int, dict[int, str]]]


@dataclass
class ExtractResult:
    """Embeddings aligned with the input values; rows in `failed` are zeros and must be dropped."""

    features: np.ndarray  # [N, dim] float32
    failed: dict[int, str] = field(default_factory=dict)  # row -> reason
    stats: dict[str, Any] = field(default_factory=dict)


class _MissDataset(Dataset):
    def __init__(self, values: list[str], source: ModalitySpec, encoder: Encoder):
        self.values, self.source, self.encoder = values, source, encoder

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> tuple[int, Any, str]:
        try:
            return i, self.encoder.prepare(self.source.load(self.values[i])), ""
        except InputDecodeError as exc:
            return i, None, f"{exc.reason}: {exc}"
        except (OSError, ValueError) as exc:
            return i, None, f"unreadable: {exc}"


class _Collate:
    """Picklable collate: drops items that failed to load, keeps their reasons."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def __call__(self, items: list[tuple[int, Any, str]]) -> tuple[list[int], Any, dict[int, str]]:
        good = [(i, x) for i, x, err in items if not err]
        bad = {i: err for i, _, err in items if err}
        batch = self.encoder.collate([x for _, x in good]) if good else None
        return [i for i, _ in good], batch, bad


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract_features(
    encoder: Encoder,
    source: ModalitySpec,
    values: list[str],
    cache: FeatureCache | None,
    num_workers: int = -1,
    progress: bool = True,
    encode_misses: EncodeMisses | None = None,
) -> ExtractResult:
    """Embeddings for `values` (one manifest column), from the cache where possible, encoding the rest in batches.

    `encode_misses(keys, values, rows)`, when given, encodes the cache misses elsewhere (a cluster) into
    `cache` and returns (encoded count, {miss index: reason} of those that failed); `rows[i]` are the
    positions in `values` of miss `i`.
    """
    start = time.perf_counter()
    n = len(values)
    out = np.zeros((n, encoder.dim), dtype=np.float32)
    failed: dict[int, str] = {}
    rows_by_key: dict[str, list[int]] = {}
    for row, value in enumerate(values):
        try:
            key = content_key(source.content(value))
        except InputDecodeError as exc:
            failed[row] = f"{exc.reason}: {exc}"
            continue
        rows_by_key.setdefault(key, []).append(row)

    cached = cache.get_many(rows_by_key) if cache is not None else {}
    for key, vec in cached.items():
        out[rows_by_key[key]] = vec
    miss_keys = [k for k in rows_by_key if k not in cached]
    miss_values = [values[rows_by_key[k][0]] for k in miss_keys]
    if encoder.batch_by_length:  # less padding; results are put back by key
        order = sorted(range(len(miss_keys)), key=lambda i: len(miss_values[i]))
        miss_keys, miss_values = [miss_keys[i] for i in order], [miss_values[i] for i in order]
    truncated = 0
    if encoder.may_truncate:  # counted over every distinct sample, cached or not (an unreadable one is failed below)
        truncated = encoder.count_truncated_values(source, [values[rows[0]] for rows in rows_by_key.values()])

    t_encode = time.perf_counter()
    encoded = 0
    if miss_keys:
        if encode_misses is None:  # here, in batches, writing each batch to the cache and to `out`

            def keep(keys: list[str], feats: np.ndarray) -> None:
                for key, vec in zip(keys, feats):
                    out[rows_by_key[key]] = vec

            encoded, bad = encode_batches(encoder, source, miss_keys, miss_values, cache, num_workers, progress, keep)
        else:  # elsewhere (mmfusion.features.shards): the vectors come back through the cache
            encoded, bad = encode_misses(miss_keys, miss_values, [rows_by_key[k] for k in miss_keys])
            done = [k for i, k in enumerate(miss_keys) if i not in bad]
            vectors = cache.get_many(done)
            if len(vectors) != len(done):
                lost = [k for k in done if k not in vectors][:3]
                missing = len(done) - len(vectors)
                raise RuntimeError(f"{missing} encoded entries are not in the cache {cache.dir} (e.g. {lost})")
            for key, vec in vectors.items():
                out[rows_by_key[key]] = vec
        for i, reason in bad.items():
            for row in rows_by_key[miss_keys[i]]:
                failed[row] = reason
    encode_s = time.perf_counter() - t_encode

    seconds = time.perf_counter() - start
    stats = {
        "encoder": encoder.name,
        "samples": n,
        "unique": len(rows_by_key),
        "cache_hits": len(cached),
        "encoded": encoded,
        "failed": len(failed),
        "truncated": int(truncated),
        "seconds": round(seconds, 3),
        "samples_per_s": round(n / seconds, 1) if seconds > 0 else None,
        "encode_seconds": round(encode_s, 3),
        "encoded_per_s": round(encoded / encode_s, 1) if encoded and encode_s > 0 else None,
        "device": str(encoder.device),
        "batch_size": encoder.batch_size,
    }
    if cache is not None and cache.corrupt:
        stats["corrupt_entries_replaced"] = cache.corrupt
    return ExtractResult(out, failed, stats)


def encode_batches(
    encoder: Encoder,
    source: ModalitySpec,
    keys: list[str],
    values: list[str],
    cache: FeatureCache | None,
    num_workers: int = -1,
    progress: bool = True,
    on_batch: Callable[[list[str], np.ndarray], Any] | None = None,
) -> tuple[int, dict[int, str]]:
    """Encode `values` (content keys `keys`) in the encoder's batches, in this order, putting each batch into
    `cache` as soon as it is encoded; returns (encoded, {index: reason} of the items that failed to load).

    The one encoding loop: the local engine runs it over every miss, a cluster worker over one shard.
    """
    workers = resolve_workers(num_workers, encoder.device) if source.parallel_load else 0
    loader = DataLoader(
        _MissDataset(values, source, encoder),
        batch_size=encoder.batch_size,
        num_workers=workers,
        collate_fn=_Collate(encoder),
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    bar = tqdm(
        total=len(keys),
        desc=f"featurize {encoder.modality} ({encoder.name})",
        unit=encoder.modality,
        disable=not progress,
        mininterval=2,
    )
    encoded = 0
    failed: dict[int, str] = {}
    with bar:
        for idx, batch, bad in loader:
            failed.update(bad)
            if batch is not None:
                feats = encoder.forward(batch).numpy()
                batch_keys = [keys[i] for i in idx]
                if cache is not None:
                    cache.put_many(batch_keys, feats)
                if on_batch is not None:
                    on_batch(batch_keys, feats)
                encoded += len(idx)
            bar.update(len(idx) + len(bad))
    return encoded, failed


def resolve_workers(num_workers: int, device: torch.device) -> int:
    """-1 = auto: decode in the main process on CPU (a worker would compete with the encoder for the
    same cores, and decoding is ~1 ms of a ~30 ms encode), in up to 8 workers when a GPU does the encoding."""
    if num_workers >= 0:
        return num_workers
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def build_input(modality: str, root: str | Path = ".", **settings: Any) -> ModalitySpec:
    """The reader of `modality`'s manifest values (its spec), rooted at `root`, with its preprocessing settings."""
    return build_spec(modality, root, settings)

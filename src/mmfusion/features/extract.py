"""Batched, cached feature extraction: every distinct sample content is encoded at most once.

`extract_features` hashes each sample's content, takes what the cache already holds, and
encodes only the misses: a DataLoader decodes and preprocesses them in worker processes
(pinned memory on CUDA), or with no workers in a background thread, while the main thread runs
the encoder; a writer thread puts each batch into the cache as soon as it is encoded (in order,
all of it before returning), so a killed run resumes where it stopped.

What a modality's raw value is and how to read it lives in its spec (`mmfusion.modalities`: image,
a path under the project root decoded by the one `decode_image`; text, normalised by the one
`normalize_text`): a third modality is a new registered spec, nothing here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmfusion.forks import dataloader_worker_init
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
    overlap: bool | None = None,
) -> ExtractResult:
    """Embeddings for `values` (one manifest column), from the cache where possible, encoding the rest in batches.

    `encode_misses(keys, values, rows)`, when given, encodes the cache misses elsewhere (a cluster) into
    `cache` and returns (encoded count, {miss index: reason} of those that failed); `rows[i]` are the
    positions in `values` of miss `i`. `overlap`: see `encode_batches` (None = auto).
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

            encoded, bad = encode_batches(encoder, source, miss_keys, miss_values, cache, num_workers, progress, keep, overlap)
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
    overlap: bool | None = None,
) -> tuple[int, dict[int, str]]:
    """Encode `values` (content keys `keys`) in the encoder's batches, in this order, putting each batch into
    `cache` as soon as it is encoded; returns (encoded, {index: reason} of the items that failed to load).

    The one encoding loop: the local engine runs it over every miss, a cluster worker over one shard.

    `overlap` (None = auto: on for sources whose loading is decoding files, `parallel_load`) takes the
    per-item work off the encoder's critical path: with no DataLoader workers, a background thread
    decodes, preprocesses and collates the next batches while this thread runs
    the encoder (PIL and ONNX Runtime / torch release the GIL), and the cache entries are written by another
    thread, batch by batch, in order.
    The batches, their order and the vectors are the same as without it; every entry is in the cache when
    this returns, and an error in either thread is raised here.
    """
    workers = resolve_workers(num_workers, encoder.device) if source.parallel_load else 0
    if overlap is None:
        overlap = source.parallel_load
    # DataLoader workers already load ahead in their own processes; with none, a thread does
    prefetch = overlap and workers == 0
    loader = DataLoader(
        _MissDataset(values, source, encoder),
        batch_size=encoder.batch_size,
        num_workers=workers,
        collate_fn=_Collate(encoder),
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=dataloader_worker_init if workers else None,  # forked from a stage's flow run
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
    batches = _Prefetch(loader, _PREFETCH_BATCHES) if prefetch else _Inline(loader)
    writer = _CacheWriter(cache, _WRITE_QUEUE) if overlap and cache is not None else None
    try:
        with bar:
            for idx, batch, bad in batches:
                failed.update(bad)
                if batch is not None:
                    feats = encoder.forward(batch).numpy()
                    batch_keys = [keys[i] for i in idx]
                    if writer is not None:
                        writer.put(batch_keys, feats)
                    elif cache is not None:
                        cache.put_many(batch_keys, feats)
                    if on_batch is not None:
                        on_batch(batch_keys, feats)
                    encoded += len(idx)
                bar.update(len(idx) + len(bad))
    except BaseException:
        if writer is not None:
            writer.close(raise_error=False)  # what was encoded still lands in the cache (a rerun resumes)
        raise
    finally:
        batches.close()
    if writer is not None:
        writer.close()
    return encoded, failed


_PREFETCH_BATCHES = 2  # batches decoded ahead of the encoder (memory: a few batches of uint8 tensors)
_WRITE_QUEUE = 8  # encoded batches waiting for the cache writer before the encoder waits for it
_END = object()


class _Inline:
    """The loader's batches in this thread (DataLoader workers, or no overlap)."""

    def __init__(self, loader: DataLoader):
        self._it = iter(loader)

    def __iter__(self):
        return self._it

    def close(self) -> None:  # DataLoader workers stop with the iterator, as they always did
        pass


class _Prefetch:
    """The loader's batches, produced by a background thread up to `depth` batches ahead, in order.

    An exception in the thread (anything `_MissDataset` does not turn into a per-row reason) is raised
    in the consumer at the batch where it happened; `close` stops the thread early.
    """

    def __init__(self, loader: DataLoader, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(loader,), name="featurize-prefetch", daemon=True)
        self._thread.start()

    def _run(self, loader: DataLoader) -> None:
        try:
            for item in loader:
                if not self._offer((item, None)):
                    return
            self._offer((_END, None))
        except BaseException as exc:  # handed to the consumer
            self._offer((_END, exc))

    def _offer(self, entry: tuple[Any, BaseException | None]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            item, exc = self._queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _CacheWriter:
    """Writes encoded batches into the cache from a background thread, in the order they were put.

    The first error (a full disk, an unwritable folder) stops the writing and is raised by the next `put`
    or by `close`; `close` waits until every batch put before it is in the cache.
    """

    def __init__(self, cache: FeatureCache, depth: int):
        self.cache = cache
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="featurize-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is _END:
                return
            if self._error is None:
                try:
                    self.cache.put_many(*entry)
                except BaseException as exc:  # raised in the encoding thread
                    self._error = exc

    def put(self, keys: list[str], vectors: np.ndarray) -> None:
        if self._error is not None:
            self.close()
        self._queue.put((keys, vectors))

    def close(self, raise_error: bool = True) -> None:
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()
        if raise_error and self._error is not None:
            raise self._error


def resolve_workers(num_workers: int, device: torch.device) -> int:
    """-1 = auto: decode in the main process on CPU (a worker would compete with the encoder for the
    same cores, and decoding is ~1 ms of a ~30 ms encode), in up to 8 workers when a GPU does the encoding."""
    if num_workers >= 0:
        return num_workers
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def build_input(modality: str, root: str | Path = ".", **settings: Any) -> ModalitySpec:
    """The reader of `modality`'s manifest values (its spec), rooted at `root`, with its preprocessing settings."""
    return build_spec(modality, root, settings)

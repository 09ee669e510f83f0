"""A content-addressed embedding cache on disk: one small file per (encoder, content) pair.

Layout:  <cache_dir>/<namespace>/<key[:2]>/<key>.f32   raw little-endian float32, `dim` values
(`cache_dir` is a local folder or any fsspec URL, e.g. s3://bucket/features: `open_cache`)
         <cache_dir>/<namespace>/encoder.json         what made the entries (for people)

The namespace is the encoder fingerprint (name + weights hash + preprocessing) plus its numeric
precision, the key is the sha256 of the sample's content (image bytes after cleaning, the
normalised text). So a new sample is a miss, an unchanged one a hit whatever its id or split,
and a changed encoder or preprocessing lands in a fresh namespace: old entries stay valid for
the old encoder and are never overwritten. Each entry is written to a temporary file and
renamed into place, so a run killed mid-way leaves complete entries or none, and the next run
resumes from what is there. An entry of the wrong size (a disk that filled up) or that cannot be
read is a miss.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

_STALE_TMP_S = 300  # a temporary file this old belongs to a run that died


class CacheNotWritableError(PermissionError):
    """The cache directory cannot be created or written."""


class FeatureCache:
    """Embeddings of one encoder (namespace), keyed by content hash."""

    def __init__(self, root: str | Path, namespace: str, dim: int, describe: dict[str, Any] | None = None):
        self.root = Path(root)
        self.namespace = re.sub(r"[^A-Za-z0-9._@+-]", "_", namespace)
        self.dir = self.root / self.namespace
        self.dim = int(dim)
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.corrupt = 0
        self._made_dirs: set[Path] = set()  # folders this instance has made (or found) already
        self._ensure_writable()
        self._describe(describe)
        self._remove_stale_tmp()

    def _describe(self, describe: dict[str, Any] | None) -> None:
        if describe is not None and not (self.dir / "encoder.json").exists():
            self._atomic_write(self.dir / "encoder.json", (json.dumps(describe, indent=2) + "\n").encode())

    def _ensure_writable(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{uuid.uuid4().hex}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CacheNotWritableError(
                f"feature cache directory {self.dir} is not writable ({exc.strerror or exc}); "
                "set featurize.cache_dir to a writable folder (nothing already cached was touched)"
            ) from exc

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for tmp in self.dir.glob("*/.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.f32"

    def get(self, key: str) -> np.ndarray | None:
        """The cached float32 vector for `key`, or None (a missing or damaged entry)."""
        try:
            data = self._read(self.path(key))
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError:  # an entry that cannot be read (a directory in its place, an I/O error) is a miss too
            data = b""
        if len(data) != self.dim * 4:
            self.corrupt += 1
            self.misses += 1
            return None
        self.hits += 1
        return np.frombuffer(data, dtype="<f4")

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """{key: vector} for every key that is cached."""
        found = {}
        for key in keys:
            vec = self.get(key)
            if vec is not None:
                found[key] = vec
        return found

    def put(self, key: str, vector: np.ndarray) -> None:
        vec = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
        if vec.shape[0] != self.dim:
            raise ValueError(f"cache {self.namespace}: expected a {self.dim}-d vector, got {vec.shape[0]}")
        self._atomic_write(self.path(key), vec.tobytes())
        self.writes += 1

    def put_many(self, keys: Iterable[str], vectors: np.ndarray) -> None:
        for key, vec in zip(keys, vectors):
            self.put(key, vec)

    def __contains__(self, key: str) -> bool:
        path = self.path(key)
        return path.exists() and path.stat().st_size == self.dim * 4

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.f32"))

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes, "corrupt": self.corrupt}

    @staticmethod
    def _read(path: Any) -> bytes:
        return Path(path).read_bytes()

    def _atomic_write(self, path: Path, data: bytes) -> None:
        # mkdir once per folder, not per entry: a syscall that cost 0.6 ms a call on these VMs, a third
        # of the featurize path's time per image under onnx-int8; a folder removed since is made again
        if path.parent not in self._made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(path.parent)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            try:
                fh = open(tmp, "wb")
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                fh = open(tmp, "wb")
            with fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def is_url(location: str | Path) -> bool:
    """True for an fsspec URL (s3://bucket/cache, gs://..., file:///mnt/cache), False for a plain path."""
    return isinstance(location, str) and "://" in location


class FsspecFeatureCache(FeatureCache):
    """The same cache on any fsspec filesystem (an object store, a network filesystem): one object per entry,
    written whole in one put (atomic on object stores, so a killed run leaves whole entries or none)."""

    def __init__(self, url: str, namespace: str, dim: int, describe: dict[str, Any] | None = None):
        import fsspec

        self.fs, base = fsspec.core.url_to_fs(url)
        self.url = url
        super().__init__(base, namespace, dim, describe)  # self.dir: a posix key prefix, not a local Path

    def _ensure_writable(self) -> None:
        self.dir = f"{str(self.root).rstrip('/')}/{self.namespace}"
        probe = f"{self.dir}/.probe-{uuid.uuid4().hex}.tmp"
        try:
            self.fs.makedirs(self.dir, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except OSError as exc:
            raise CacheNotWritableError(
                f"feature cache {self.url} is not writable ({exc}); set featurize.cache_dir to a writable location"
            ) from exc

    def _describe(self, describe: dict[str, Any] | None) -> None:
        if describe is not None and not self.fs.exists(f"{self.dir}/encoder.json"):
            self.fs.pipe_file(f"{self.dir}/encoder.json", (json.dumps(describe, indent=2) + "\n").encode())

    def _remove_stale_tmp(self) -> None:  # whole-object puts leave no temporary files
        pass

    def path(self, key: str) -> str:  # type: ignore[override]
        return f"{self.dir}/{key[:2]}/{key}.f32"

    def _read(self, path: str) -> bytes:  # type: ignore[override]
        return self.fs.cat_file(path)

    def _atomic_write(self, path: str, data: bytes) -> None:  # type: ignore[override]
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)

    def __contains__(self, key: str) -> bool:
        try:
            return self.fs.size(self.path(key)) == self.dim * 4
        except FileNotFoundError:
            return False

    def __len__(self) -> int:
        return len(self.fs.glob(f"{self.dir}/*/*.f32"))


def open_cache(location: str | Path, namespace: str, dim: int, describe: dict[str, Any] | None = None) -> FeatureCache:
    """The cache at `location`: a local folder, or any fsspec URL (featurize.cache_dir)."""
    if is_url(location):
        return FsspecFeatureCache(str(location), namespace, dim, describe)
    return FeatureCache(location, namespace, dim, describe)

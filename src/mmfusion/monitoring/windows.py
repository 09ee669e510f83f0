"""Windows of the inference log: what the served model saw, in the `MonitorData` layout of the reference.

The log is opened read-only (SQLite `mode=ro`: in WAL mode a reader never blocks the service's writer;
PostgreSQL readers never block writers either). Rows of every replica are read. Rows can be restricted to one model version; every version seen is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

import sqlalchemy as sa
from sqlalchemy.engine import URL

from mmfusion import logdb
from mmfusion.monitoring.inference_log import read_embeddings, read_inference_log
from mmfusion.modalities import stats_of
from mmfusion.monitoring.reference import MonitorData, MonitorError

LOG_COLUMNS = ("request_id", "item", "ts", "model_version", "label", "confidence", "modalities")


def load_log(
    url: str | Path | URL, modalities: list[str], since: float | None = None, dims: dict[str, int] | None = None
) -> MonitorData:
    """Every logged item (oldest first) with its embeddings; MonitorError with one clear line if unreadable.

    `dims` ({modality: width}, from the served model's reference) shapes the embeddings: a modality the
    log has never seen still gets [rows, width] zeros. Without it the widths come from the log itself.
    """
    url = logdb.resolve_url(url)
    name = logdb.describe(url)
    try:
        if not logdb.exists(url):
            raise MonitorError(f"no inference log at {name}: serve the model (`make serve`) and send it requests first")
        df = read_inference_log(url, since=since)
        embeddings = {}
        for m in modalities:
            try:
                embeddings[m] = read_embeddings(url, m, since=since)
            except ValueError as exc:  # vectors of several widths cannot be stacked: rows of models with other encoders
                raise MonitorError(f"the inference log holds {m} embeddings of different widths ({exc}): "
                                   "point monitor.log_url at a log of the served model") from exc  # fmt: skip
    except logdb.LogUnavailable as exc:
        raise MonitorError(str(exc)) from exc
    except sa.exc.OperationalError as exc:
        raise MonitorError(f"cannot read the inference log {name}: {logdb.first_line(exc)}") from exc
    except (sa.exc.DatabaseError, pd.errors.DatabaseError) as exc:
        raise MonitorError(f"{name} is not a readable inference log: {logdb.first_line(exc)}") from exc
    rows = pd.DataFrame(
        {
            "request_id": df["request_id"].astype(str),
            "item": df["item"].astype(int),
            "ts": df["ts"].astype(float),
            "model_version": df["model_version"].astype(str),
            "prediction": df["label"].astype(str),
            "confidence": df["confidence"].astype(float),
            "client_request_id": df["client_request_id"] if "client_request_id" in df else None,
        }
    )
    # the replica that answered (rows written before the log recorded it have none)
    if "host" in df:
        rows["replica"] = [f"{h}:{int(p)}" if isinstance(h, str) and pd.notna(p) else "" for h, p in zip(df["host"], df["pid"])]
    else:
        rows["replica"] = ""
    present_sets = df["modalities"].fillna("").str.split(",")
    for m in modalities:
        rows[f"present_{m}"] = present_sets.map(lambda ms, m=m: m in ms).astype(bool)
    for m in modalities:
        for col in stats_of(m):
            rows[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
            rows.loc[~rows[f"present_{m}"], col] = np.nan
    position = {(r, i): n for n, (r, i) in enumerate(zip(rows["request_id"], rows["item"]))}
    arrays = {}
    for m, (keys, arr) in embeddings.items():
        dim = (dims or {}).get(m, arr.shape[1] if arr.size else 0)
        if arr.size and arr.shape[1] != dim:
            raise MonitorError(
                f"the inference log's {m} embeddings have {arr.shape[1]} dimensions, the served model's {dim}: "
                "the log is another model's (set monitor.log_url or monitor.model_dir)"
            )
        out = np.zeros((len(rows), dim), dtype=np.float32)
        for k, (r, i) in enumerate(zip(keys["request_id"].astype(str), keys["item"].astype(int))):
            n = position.get((r, i))
            if n is not None:
                out[n] = arr[k]
        arrays[m] = out
    return MonitorData(rows, arrays)


def select_version(data: MonitorData, version: str) -> tuple[MonitorData, dict[str, int]]:
    """Rows of model `version` ("any" keeps all); also {version: rows} of everything in the log."""
    seen = {str(k): int(v) for k, v in data.rows["model_version"].value_counts().items()}
    if version == "any":
        return data, seen
    keep = np.flatnonzero(data.rows["model_version"].to_numpy() == version)
    if len(data.rows) and not len(keep):
        listed = ", ".join(f"{v} ({n} rows)" for v, n in seen.items())
        raise MonitorError(
            f"the inference log has no rows of the served model version {version}; it has: {listed}. "
            "Serve the current model, or set monitor.model_version to one of these (or `any`)"
        )
    return data.take(keep), seen


@dataclass
class Window:
    """One window of the log: its position, time range and data."""

    index: int
    data: MonitorData
    start_ts: float
    end_ts: float
    complete: bool  # a full count window or a closed time period; an open one is checked again next run

    @property
    def id(self) -> str:
        stamp = datetime.fromtimestamp(self.start_ts, timezone.utc).strftime("%Y%m%dT%H%M%S")
        return f"w{self.index:05d}-{stamp}"

    def describe(self) -> dict:
        iso = lambda ts: datetime.fromtimestamp(ts, timezone.utc).isoformat()  # noqa: E731
        return {
            "id": self.id,
            "index": self.index,
            "rows": len(self.data),
            "start": iso(self.start_ts),
            "end": iso(self.end_ts),
            "start_ts": self.start_ts,
            "end_ts": self.end_ts,
            "complete": self.complete,
            "replicas": self.replicas(),
        }

    def replicas(self) -> dict[str, int]:
        """{host:pid: rows} of the processes that answered this window's requests (every replica sharing the log)."""
        if "replica" not in self.data.rows:
            return {}
        counts = self.data.rows["replica"].replace("", "unknown").value_counts()
        return {str(k): int(v) for k, v in sorted(counts.items())}


def cut_windows(
    data: MonitorData, by: str, size: int, period_minutes: float, now: float, first_index: int = 0
) -> list[Window]:
    """Consecutive windows: every `size` rows (by count), or every period (by time, aligned to the epoch).

    The last, incomplete window (fewer than `size` rows, or a period not yet over) is included
    with `complete=False`: it is checked, and checked again with more rows on the next run.
    """
    n = len(data)
    if n == 0:
        return []
    ts = data.rows["ts"].to_numpy(dtype=float)
    windows: list[Window] = []
    if by == "count":
        if size < 1:
            raise MonitorError(f"monitor.window.size must be at least 1, got {size}")
        for k, start in enumerate(range(0, n, size)):
            idx = np.arange(start, min(start + size, n))
            windows.append(Window(first_index + k, data.take(idx), ts[idx[0]], ts[idx[-1]], len(idx) == size))
    elif by == "time":
        period = period_minutes * 60.0
        if period <= 0:
            raise MonitorError(f"monitor.window.period_minutes must be positive, got {period_minutes}")
        buckets = np.floor(ts / period).astype(np.int64)
        for k, b in enumerate(np.unique(buckets)):
            idx = np.flatnonzero(buckets == b)
            start, end = float(b) * period, float(b + 1) * period
            windows.append(Window(first_index + k, data.take(idx), start, min(end, ts[idx[-1]]), end <= now))
    else:
        raise MonitorError(f"monitor.window.by must be count or time, got {by!r}")
    return windows

"""The inference log: what the served model saw and answered, one row per classified item.

A local SQLite database in WAL mode (readers never block the writer; several server
processes may append to one file). Drift monitoring reads it with `read_inference_log`
and `read_embeddings`. Tables:

  predictions  request_id, item, ts, time, endpoint, model_version, label, confidence,
               probabilities (JSON), contributions (JSON), modalities (the present ones, comma-separated),
               latency_ms, client_request_id (the client's own x-request-id, not unique),
               then one column per input statistic and log field of each modality (`stats`, `log_fields`
               of its spec: image_width, image_height, image_format, image_bytes, text_chars, ...),
               added when a modality first appears (columns are only ever added)
  embeddings   request_id, item, modality, dim, vector (float32 little-endian BLOB)
  inputs       request_id, item, modality, format, data: the raw inputs kept (`package.log.keep`, a
               share per modality): what feedback needs to retrain on a request

Logs written before `inputs` existed kept images in a table `images` and texts in a column
`predictions.text`; `read_kept` reads those too, so an old log's feedback stays usable.

The service never waits on the disk: `InferenceLogWriter` queues records for one writer
thread, and a failure to log is counted and logged, never raised into a request.

Rows are only ever inserted, never replaced: (request_id, item) is the key, and the service
makes every request_id itself (uuid4), so each answered item keeps its own row. A record whose
key is already there is refused and counted as a failure (the rows of its batch are still
written); it never overwrites the earlier row.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmfusion.modalities import get_modality, list_modalities

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id    TEXT NOT NULL,
    item          INTEGER NOT NULL,
    ts            REAL NOT NULL,
    time          TEXT NOT NULL,
    endpoint      TEXT NOT NULL,
    model_version TEXT NOT NULL,
    label         TEXT NOT NULL,
    confidence    REAL NOT NULL,
    probabilities TEXT NOT NULL,
    contributions TEXT NOT NULL,
    modalities    TEXT NOT NULL,
    latency_ms    REAL,
    client_request_id TEXT,
    PRIMARY KEY (request_id, item)
);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
CREATE TABLE IF NOT EXISTS embeddings (
    request_id TEXT NOT NULL,
    item       INTEGER NOT NULL,
    modality   TEXT NOT NULL,
    dim        INTEGER NOT NULL,
    vector     BLOB NOT NULL,
    PRIMARY KEY (request_id, item, modality)
);
CREATE TABLE IF NOT EXISTS inputs (
    request_id TEXT NOT NULL,
    item       INTEGER NOT NULL,
    modality   TEXT NOT NULL,
    format     TEXT,
    data       BLOB NOT NULL,
    PRIMARY KEY (request_id, item, modality)
);
"""

CORE_COLUMNS = (
    "request_id", "item", "ts", "time", "endpoint", "model_version", "label", "confidence",
    "probabilities", "contributions", "modalities", "latency_ms", "client_request_id",
)  # fmt: skip
_COLUMN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass
class InferenceRecord:
    """One classified item as the log stores it.

    `fields`: the inputs' log columns ({column: value}, from each modality spec's `check`);
    `kept`: the raw inputs kept ({modality: (format, bytes)}); `modalities`: the present ones
    (default: those with an embedding)."""

    request_id: str
    item: int
    endpoint: str
    model_version: str
    label: str
    probabilities: dict[str, float]
    contributions: dict[str, float] = field(default_factory=dict)
    embeddings: dict[str, list[float]] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, tuple[str | None, bytes]] = field(default_factory=dict)
    latency_ms: float | None = None
    client_request_id: str | None = None
    ts: float = field(default_factory=time.time)


def modality_columns(modalities: Iterable[str] | None = None) -> list[str]:
    """The log columns of `modalities` (default: every registered one): each spec's stats, then its log fields."""
    cols: list[str] = []
    for m in list_modalities() if modalities is None else modalities:
        spec = get_modality(m)
        cols += [c for c in (*spec.stats, *spec.log_fields) if c not in cols]
    return cols


def connect(path: str | Path, timeout: float = 10.0) -> sqlite3.Connection:
    """A connection to the log at `path` in WAL mode, with the schema created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=timeout, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL keeps it consistent
    conn.executescript(SCHEMA)
    _migrate(conn)
    add_columns(conn, modality_columns())
    return conn


def _columns(conn: sqlite3.Connection, table: str = "predictions") -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a log written by an older service up to the current schema (columns are only added)."""
    if "client_request_id" not in _columns(conn):
        with conn:
            conn.execute("ALTER TABLE predictions ADD COLUMN client_request_id TEXT")
    conn.execute("CREATE INDEX IF NOT EXISTS predictions_client_request_id ON predictions (client_request_id)")


def add_columns(conn: sqlite3.Connection, columns: Iterable[str]) -> None:
    """Add the modality log columns the predictions table lacks (a modality registered since it was made)."""
    have = _columns(conn)
    new = [c for c in columns if c not in have]
    for c in new:
        if not _COLUMN_NAME.match(c) or c in CORE_COLUMNS:
            raise ValueError(f"inference log: {c!r} cannot be a log column (lowercase letters, digits, _; not a core one)")
    if new:
        with conn:
            for c in new:
                try:
                    conn.execute(f"ALTER TABLE predictions ADD COLUMN {c}")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise


class InferenceLog:
    """Synchronous appends to the SQLite inference log (used by the writer thread and by tests)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._conn = connect(self.path)
        self._have = _columns(self._conn)

    def append(self, records: list[InferenceRecord]) -> int:
        """Write `records` in one transaction; returns how many were written.

        A record whose (request_id, item) is already in the log is not written (and never
        replaces the row there); the others are. So written < len(records) means duplicates."""
        try:
            return self._insert(records)
        except sqlite3.IntegrityError:
            if len(records) == 1:
                log.warning("inference log: row %s/%s is already there; not overwritten", records[0].request_id, records[0].item)
                return 0
        return sum(self.append([r]) for r in records)  # find the duplicates one by one

    def _insert(self, records: list[InferenceRecord]) -> int:
        extra = sorted({c for r in records for c in r.fields})
        if not set(extra) <= self._have:
            add_columns(self._conn, extra)
            self._have = _columns(self._conn)
        columns = (*CORE_COLUMNS, *extra)
        rows, emb_rows, kept_rows = [], [], []
        for r in records:
            conf = max(r.probabilities.values()) if r.probabilities else 0.0
            present = r.modalities or sorted(r.embeddings)
            rows.append(
                (
                    r.request_id, r.item, r.ts, datetime.fromtimestamp(r.ts, timezone.utc).isoformat(),
                    r.endpoint, r.model_version, r.label, float(conf),
                    json.dumps(r.probabilities), json.dumps(r.contributions), ",".join(present),
                    r.latency_ms, r.client_request_id, *(r.fields.get(c) for c in extra),
                )
            )  # fmt: skip
            for modality, vec in r.embeddings.items():
                arr = np.asarray(vec, dtype="<f4").ravel()
                emb_rows.append((r.request_id, r.item, modality, int(arr.size), arr.tobytes()))
            for modality, (fmt, data) in r.kept.items():
                kept_rows.append((r.request_id, r.item, modality, fmt, bytes(data)))
        insert = f"INSERT INTO predictions ({', '.join(columns)}) VALUES ({','.join('?' * len(columns))})"
        with self._conn:  # one transaction
            self._conn.executemany(insert, rows)
            self._conn.executemany("INSERT INTO embeddings VALUES (?,?,?,?,?)", emb_rows)
            if kept_rows:
                self._conn.executemany("INSERT INTO inputs VALUES (?,?,?,?,?)", kept_rows)
        return len(rows)

    def close(self) -> None:
        self._conn.close()


def read_kept(conn: sqlite3.Connection, keys: Iterable[tuple[str, int]] | None = None
              ) -> dict[tuple[str, int], dict[str, tuple[str | None, bytes]]]:  # fmt: skip
    """{(request_id, item): {modality: (format, raw bytes)}} of the kept inputs (of `keys`, default all).

    Reads the `inputs` table and, in a log written before it existed, the `images` table and the
    `predictions.text` column (the old places of kept images and texts)."""
    parts = []
    if has_table(conn, "inputs"):
        parts.append("SELECT request_id, item, modality, format, data FROM inputs")
    if has_table(conn, "images"):
        parts.append("SELECT request_id, item, 'image', format, data FROM images")
    if "text" in _columns(conn):
        parts.append("SELECT request_id, item, 'text', 'text', CAST(text AS BLOB) FROM predictions WHERE text IS NOT NULL")
    out: dict[tuple[str, int], dict[str, tuple[str | None, bytes]]] = {}
    if not parts:
        return out
    query = f"SELECT * FROM ({' UNION ALL '.join(parts)})"
    if keys is None:
        rows = conn.execute(query).fetchall()
    else:  # one indexed lookup per key: feedback reads a few rows of a log that may hold many images
        query += " WHERE request_id = ? AND item = ?"
        rows = [row for r, i in dict.fromkeys((str(r), int(i)) for r, i in keys) for row in conn.execute(query, (r, i))]
    for rid, item, modality, fmt, data in rows:
        out.setdefault((str(rid), int(item)), {}).setdefault(str(modality), (fmt, bytes(data)))
    return out


class InferenceLogWriter:
    """A background writer over `InferenceLog`: `submit` never blocks on disk and never raises.

    Records that cannot be written (a full queue, a disk error, a locked database past the
    timeout) are dropped, counted in `failures`, and logged with the reason.

    A log that cannot be opened at start (SQLite answers "database is locked" while it recovers a WAL
    that a worker killed with -9 left mid-write, and another process holds it open) is opened again by
    the writer thread before each batch, for up to `open_retry_s`: the records wait in the queue
    meanwhile, so a transient lock loses nothing.
    """

    def __init__(
        self,
        path: str | Path,
        queue_size: int = 10_000,
        max_batch: int = 256,
        open_retry_s: float = 30.0,
    ):
        self.path = Path(path)
        self.written = 0
        self.failures = 0
        self._max_batch = max_batch
        self._queue: queue.Queue[InferenceRecord | None] = queue.Queue(maxsize=queue_size)
        self._open_retry_s = open_retry_s
        self._log: InferenceLog | None = None
        self._open()
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._log is not None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, records: list[InferenceRecord]) -> None:
        """Queue records for writing; never raises."""
        for record in records:
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self._fail(1, "queue full")

    def _open(self, retry_s: float = 0.0) -> bool:
        """Open the log (again), trying for up to `retry_s`; False (logged) when it cannot be opened."""
        deadline = time.monotonic() + retry_s
        while True:
            try:
                self._log = InferenceLog(self.path)
                return True
            except Exception as exc:  # the service still answers without a log; failures are counted
                if time.monotonic() >= deadline:
                    log.error("inference log %s cannot be opened: %s; answers go unlogged until it can", self.path, exc)
                    return False
                time.sleep(0.2)

    def _fail(self, n: int, reason: object) -> None:
        self.failures += n
        log.warning("inference log: %d record(s) not written (%s); %d failures so far", n, reason, self.failures)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(r is None for r in batch)
            records = [r for r in batch if r is not None]
            if records:
                if self._log is None and not self._open(self._open_retry_s):
                    self._fail(len(records), "log not open")
                else:
                    try:
                        n = self._log.append(records)
                        self.written += n
                        if n < len(records):
                            self._fail(len(records) - n, "request id already in the log (not overwritten)")
                    except Exception as exc:
                        self._fail(len(records), exc)
            for _ in batch:
                self._queue.task_done()
            if stop:
                return

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the thread, close the database."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
        if self._log is not None:
            self._log.close()


def read_inference_log(path: str | Path, since: float | None = None) -> pd.DataFrame:
    """The predictions table as a DataFrame (probabilities/contributions parsed), oldest first."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=10.0)
    try:
        query = "SELECT * FROM predictions" + (" WHERE ts >= ?" if since is not None else "") + " ORDER BY ts, item"
        df = pd.read_sql_query(query, conn, params=(since,) if since is not None else None)
    finally:
        conn.close()
    for col in ("probabilities", "contributions"):
        df[col] = df[col].map(json.loads)
    return df


def read_embeddings(path: str | Path, modality: str, since: float | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """(keys DataFrame with request_id, item, ts; float32 array [N, dim]) for one modality, oldest first."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=10.0)
    try:
        query = (
            "SELECT e.request_id, e.item, p.ts, e.dim, e.vector FROM embeddings e "
            "JOIN predictions p USING (request_id, item) WHERE e.modality = ?"
            + (" AND p.ts >= ?" if since is not None else "")
            + " ORDER BY p.ts, e.item"
        )
        rows = conn.execute(query, (modality, since) if since is not None else (modality,)).fetchall()
    finally:
        conn.close()
    keys = pd.DataFrame([r[:3] for r in rows], columns=["request_id", "item", "ts"])
    if not rows:
        return keys, np.zeros((0, 0), dtype=np.float32)
    return keys, np.stack([np.frombuffer(r[4], dtype="<f4") for r in rows]).astype(np.float32)

"""The inference log: what the served model saw and answered, one row per classified item.

A database at a SQLAlchemy URL (`mmfusion.logdb`): a local SQLite file in WAL mode by
default (readers never block the writer; several server processes may append to one file), or a
PostgreSQL server that several replicas share. Its schema is versioned by Alembic
(`logdb/migrations`). Drift monitoring reads it with `read_inference_log` and `read_embeddings`.
Tables:

  predictions  request_id, item, ts, time, endpoint, model_version, label, confidence,
               probabilities (JSON), contributions (JSON), modalities (the present ones, comma-separated),
               latency_ms, client_request_id (the client's own x-request-id, not unique),
               host, pid (the replica and process that answered),
               then one column per input statistic and log field of each modality (`stats`, `log_fields`
               of its spec: image_width, image_height, image_format, image_bytes, text_chars, ...),
               added when a modality first appears (columns are only ever added)
  embeddings   request_id, item, modality, dim, vector (float32 little-endian bytes)
  inputs       request_id, item, modality, format, data: the raw inputs kept (`package.log.keep`, a
               share per modality): what feedback needs to retrain on a request
  previews     request_id, item, modality, format (a MIME type), data: a small preview per modality
               (`package.log.previews`, a share per modality; each spec's `preview`): what the drift report
               shows of the items that drifted; read for those few items only (`read_previews`)
  feedback     see `mmfusion.monitoring.feedback`

Logs written before `inputs` existed kept images in a table `images` and texts in a column
`predictions.text`; `read_kept` reads those too, so an old log's feedback stays usable.

The service never waits on the database: `InferenceLogWriter` queues records for one writer
thread, which inserts them in batches, and a failure to log is counted and logged, never raised
into a request.

Rows are only ever inserted, never replaced: (request_id, item) is the key, and the service
makes every request_id itself (uuid4), so each answered item keeps its own row. A record whose
key is already there is refused and counted as a failure (the rows of its batch are still
written); it never overwrites the earlier row.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection

from mmfusion import logdb
from mmfusion.modalities import get_modality, list_modalities

log = logging.getLogger(__name__)

CORE_COLUMNS = (
    "request_id", "item", "ts", "time", "endpoint", "model_version", "label", "confidence",
    "probabilities", "contributions", "modalities", "latency_ms", "client_request_id", "host", "pid",
)  # fmt: skip
COLUMN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
HOST = socket.gethostname()
_OPENED: set[tuple] = set()  # logs open_log has migrated and given every registered modality's columns


@dataclass
class InferenceRecord:
    """One classified item as the log stores it.

    `fields`: the inputs' log columns ({column: value}, from each modality spec's `check`);
    `kept`: the raw inputs kept ({modality: (format, bytes)}); `previews`: their small previews
    ({modality: (MIME type, bytes)}, each spec's `preview`); `modalities`: the present ones
    (default: those with an embedding); `host`, `pid`: the replica and process that answered."""

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
    previews: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    latency_ms: float | None = None
    client_request_id: str | None = None
    ts: float = field(default_factory=time.time)
    host: str = HOST
    pid: int = field(default_factory=os.getpid)


def modality_columns(modalities: Iterable[str] | None = None) -> dict[str, str]:
    """{column: float|int|text} of `modalities` (default: every registered one): each spec's stats (float
    unless its `column_types` says otherwise), then its log fields (text unless it says otherwise)."""
    cols: dict[str, str] = {}
    for m in list_modalities() if modalities is None else modalities:
        spec = get_modality(m)
        for c in spec.stats:
            cols.setdefault(c, spec.column_types.get(c, "float"))
        for c in spec.log_fields:
            cols.setdefault(c, spec.column_types.get(c, "text"))
    return cols


def add_columns(conn: Connection, wanted: dict[str, str]) -> None:
    """Add the modality log columns ({name: float|int|text}) the predictions table lacks (columns are
    only ever added; another process adding the same one meanwhile is fine)."""
    have = logdb.columns(conn)
    new = {c: k for c, k in wanted.items() if c not in have}
    for c in new:
        if not COLUMN_NAME.match(c) or c in CORE_COLUMNS:
            raise ValueError(f"inference log: {c!r} cannot be a log column (lowercase letters, digits, _; not a core one)")
    if not new:
        return
    pg = conn.dialect.name == "postgresql"
    for c, kind in new.items():
        ddl = logdb.SQL_TYPES[kind].compile(dialect=conn.dialect)
        try:
            conn.execute(sa.text(f"ALTER TABLE predictions ADD COLUMN {'IF NOT EXISTS ' if pg else ''}{c} {ddl}"))
            conn.commit()
        except sa.exc.OperationalError as exc:  # SQLite: another process added it meanwhile
            conn.rollback()
            if "duplicate column" not in str(exc):
                raise


def open_log(url: str | Path | URL, root: Path | None = None) -> URL:
    """The log at `url` (a URL or a SQLite file path) with its schema created or migrated (Alembic) and
    every registered modality's columns; its resolved URL. logdb.LogUnavailable when unreachable."""
    url = logdb.resolve_url(url, root)
    wanted = modality_columns()
    key = (url.render_as_string(hide_password=False), tuple(wanted), os.getpid())
    if key not in _OPENED:  # once per process: /feedback opens the log on every call
        logdb.upgrade(url)
        with logdb.engine(url).connect() as conn:
            add_columns(conn, wanted)
        _OPENED.add(key)
    return url


class InferenceLog:
    """Synchronous batched appends to the inference log (used by the writer thread and by tests)."""

    def __init__(self, url: str | Path | URL):
        self.url = open_log(url)
        self._engine = logdb.engine(self.url)
        with self._engine.connect() as conn:
            self._have = logdb.columns(conn)
        self._types = modality_columns()

    @property
    def path(self) -> Path | None:
        """The SQLite file (None for a server)."""
        return logdb.sqlite_path(self.url)

    def append(self, records: list[InferenceRecord]) -> int:
        """Write `records` in one transaction; returns how many were written.

        A record whose (request_id, item) is already in the log is not written (and never
        replaces the row there); the others are. So written < len(records) means duplicates."""
        try:
            return self._insert(records)
        except sa.exc.IntegrityError:
            if len(records) == 1:
                log.warning("inference log: row %s/%s is already there; not overwritten", records[0].request_id, records[0].item)
                return 0
        return sum(self.append([r]) for r in records)  # find the duplicates one by one

    def _insert(self, records: list[InferenceRecord]) -> int:
        extra = sorted({c for r in records for c in r.fields})
        if not set(extra) <= self._have:
            with self._engine.connect() as conn:
                add_columns(conn, {c: self._types.get(c, "text") for c in extra})
                self._have = logdb.columns(conn)
        rows, emb_rows, kept_rows, preview_rows = [], [], [], []
        for r in records:
            conf = max(r.probabilities.values()) if r.probabilities else 0.0
            present = r.modalities or sorted(r.embeddings)
            row = {
                "request_id": r.request_id, "item": int(r.item), "ts": float(r.ts),
                "time": datetime.fromtimestamp(r.ts, timezone.utc).isoformat(), "endpoint": r.endpoint,
                "model_version": r.model_version, "label": r.label, "confidence": float(conf),
                "probabilities": json.dumps(r.probabilities), "contributions": json.dumps(r.contributions),
                "modalities": ",".join(present), "latency_ms": r.latency_ms, "client_request_id": r.client_request_id,
                "host": r.host, "pid": r.pid,
            }  # fmt: skip
            for c in extra:
                row[c] = logdb.coerce(r.fields.get(c), self._types.get(c, "text"))
            rows.append(row)
            for modality, vec in r.embeddings.items():
                arr = np.asarray(vec, dtype="<f4").ravel()
                emb_rows.append({"request_id": r.request_id, "item": int(r.item), "modality": modality,
                                 "dim": int(arr.size), "vector": arr.tobytes()})  # fmt: skip
            for rows_of, blobs in ((kept_rows, r.kept), (preview_rows, r.previews)):
                rows_of.extend({"request_id": r.request_id, "item": int(r.item), "modality": modality,
                                "format": fmt, "data": bytes(data)} for modality, (fmt, data) in blobs.items())  # fmt: skip
        columns = (*CORE_COLUMNS, *extra)
        insert = sa.text(f"INSERT INTO predictions ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})")
        with self._engine.begin() as conn:  # one transaction; executemany (psycopg: pipelined)
            conn.execute(insert, rows)
            if emb_rows:
                conn.execute(sa.text("INSERT INTO embeddings (request_id, item, modality, dim, vector) "
                                     "VALUES (:request_id, :item, :modality, :dim, :vector)"), emb_rows)  # fmt: skip
            for table, blob_rows in (("inputs", kept_rows), ("previews", preview_rows)):
                if blob_rows:
                    conn.execute(sa.text(f"INSERT INTO {table} (request_id, item, modality, format, data) "
                                         "VALUES (:request_id, :item, :modality, :format, :data)"), blob_rows)  # fmt: skip
        return len(rows)

    def close(self) -> None:
        """Nothing to release: the engine's pool is per process and URL (logdb.dispose closes it)."""


def read_kept(conn: Connection, keys: Iterable[tuple[str, int]] | None = None
              ) -> dict[tuple[str, int], dict[str, tuple[str | None, bytes]]]:  # fmt: skip
    """{(request_id, item): {modality: (format, raw bytes)}} of the kept inputs (of `keys`, default all).

    Reads the `inputs` table and, in a SQLite log written before it existed, the `images` table and
    the `predictions.text` column (the old places of kept images and texts)."""
    parts = []
    if logdb.has_table(conn, "inputs"):
        parts.append("SELECT request_id, item, modality, format, data FROM inputs")
    if logdb.has_table(conn, "images"):
        parts.append("SELECT request_id, item, 'image' AS modality, format, data FROM images")
    if "text" in logdb.columns(conn):
        parts.append("SELECT request_id, item, 'text' AS modality, 'text' AS format, CAST(text AS BLOB) AS data "
                     "FROM predictions WHERE text IS NOT NULL")  # fmt: skip
    out: dict[tuple[str, int], dict[str, tuple[str | None, bytes]]] = {}
    if not parts:
        return out
    query = f"SELECT * FROM ({' UNION ALL '.join(parts)}) AS kept"
    if keys is None:
        rows = conn.execute(sa.text(query)).fetchall()
    else:  # one indexed lookup per key: feedback reads a few rows of a log that may hold many images
        q = sa.text(query + " WHERE request_id = :r AND item = :i")
        rows = [row for r, i in dict.fromkeys((str(r), int(i)) for r, i in keys) for row in conn.execute(q, {"r": r, "i": i})]
    for rid, item, modality, fmt, data in rows:
        out.setdefault((str(rid), int(item)), {}).setdefault(str(modality), (fmt, bytes(data)))
    return out


def read_previews(conn: Connection, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], dict[str, tuple[str, bytes]]]:
    """{(request_id, item): {modality: (MIME type, bytes)}} of the previews of `keys`: one indexed lookup per key,
    never the whole table (the drift report shows a few items of a log that may hold a preview of every request).
    A log from before previews existed (the monitor reads it without migrating it) has none."""
    out: dict[tuple[str, int], dict[str, tuple[str, bytes]]] = {}
    if not logdb.has_table(conn, "previews"):
        return out
    q = sa.text("SELECT modality, format, data FROM previews WHERE request_id = :r AND item = :i")
    for r, i in dict.fromkeys((str(r), int(i)) for r, i in keys):
        for modality, fmt, data in conn.execute(q, {"r": r, "i": i}):
            out.setdefault((r, i), {})[str(modality)] = (str(fmt), bytes(data))
    return out


class InferenceLogWriter:
    """A background writer over `InferenceLog`: `submit` never blocks on the database and never raises.

    Records that cannot be written (a full queue, a disk error, a locked database or a server that
    stays unreachable past `open_retry_s`) are dropped, counted in `failures`, and logged with the reason.

    A log that cannot be opened at start (SQLite answers "database is locked" while it recovers a WAL
    that a worker killed with -9 left mid-write, and another process holds it open; a server restarting)
    is opened again by the writer thread before each batch, for up to `open_retry_s`; a batch that
    fails because the connection dropped is tried again for as long. The records wait in the queue
    meanwhile, so a transient outage loses nothing.
    """

    def __init__(
        self,
        url: str | Path | URL,
        queue_size: int = 10_000,
        max_batch: int = 256,
        open_retry_s: float = 30.0,
    ):
        self.url = logdb.resolve_url(url)
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
    def path(self) -> Path | None:
        return logdb.sqlite_path(self.url)

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
                self._log = InferenceLog(self.url)
                return True
            except Exception as exc:  # the service still answers without a log; failures are counted
                if time.monotonic() >= deadline:
                    log.error("inference log %s cannot be opened: %s; answers go unlogged until it can",
                              logdb.describe(self.url), logdb.first_line(exc))  # fmt: skip
                    return False
                time.sleep(0.2)

    def _fail(self, n: int, reason: object) -> None:
        self.failures += n
        log.warning("inference log: %d record(s) not written (%s); %d failures so far", n, reason, self.failures)

    def _write(self, records: list[InferenceRecord]) -> None:
        """One batch: written, or retried while the database is unreachable (up to open_retry_s), else failed."""
        deadline = time.monotonic() + self._open_retry_s
        while True:
            if self._log is None and not self._open(max(0.0, deadline - time.monotonic())):
                self._fail(len(records), "log not open")
                return
            try:
                n = self._log.append(records)
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:  # connection lost, locked: try again
                if time.monotonic() >= deadline:
                    self._fail(len(records), logdb.first_line(exc))
                    return
                log.warning("inference log: %s; trying the batch again", logdb.first_line(exc))
                time.sleep(0.5)
                continue
            except Exception as exc:
                self._fail(len(records), logdb.first_line(exc))
                return
            self.written += n
            if n < len(records):
                self._fail(len(records) - n, "request id already in the log (not overwritten)")
            return

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
                self._write(records)
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


def read_inference_log(url: str | Path | URL, since: float | None = None) -> pd.DataFrame:
    """The predictions table as a DataFrame (probabilities/contributions parsed), oldest first."""
    url = logdb.resolve_url(url)
    query = "SELECT * FROM predictions" + (" WHERE ts >= :since" if since is not None else "") + " ORDER BY ts, item"
    with logdb.reading(url) as conn:
        df = pd.read_sql_query(sa.text(query), conn, params={"since": since} if since is not None else None)
    for col in ("probabilities", "contributions"):
        df[col] = df[col].map(json.loads)
    return df


def read_embeddings(url: str | Path | URL, modality: str, since: float | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """(keys DataFrame with request_id, item, ts; float32 array [N, dim]) for one modality, oldest first."""
    url = logdb.resolve_url(url)
    query = (
        "SELECT e.request_id, e.item, p.ts, e.dim, e.vector FROM embeddings e "
        "JOIN predictions p ON p.request_id = e.request_id AND p.item = e.item WHERE e.modality = :m"
        + (" AND p.ts >= :since" if since is not None else "")
        + " ORDER BY p.ts, e.item"
    )
    with logdb.reading(url) as conn:
        rows = conn.execute(sa.text(query), {"m": modality, "since": since}).fetchall()
    keys = pd.DataFrame([tuple(r[:3]) for r in rows], columns=["request_id", "item", "ts"])
    if not rows:
        return keys, np.zeros((0, 0), dtype=np.float32)
    return keys, np.stack([np.frombuffer(bytes(r[4]), dtype="<f4") for r in rows]).astype(np.float32)


def log_totals(url: str | Path | URL) -> dict:
    """Rows in the whole log (every worker and replica writes to it) and the time of the last one."""
    url = logdb.resolve_url(url)
    with logdb.reading(url) as conn:
        rows, last = conn.execute(sa.text("SELECT COUNT(*), MAX(ts) FROM predictions")).one()
    return {"rows": int(rows), "last_ts": last}

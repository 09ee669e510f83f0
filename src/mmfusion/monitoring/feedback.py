"""Labelled feedback: the true label of an answered request, stored next to the log rows it labels.

Table `feedback` in the inference log's SQLite file (created here if missing; the log's own
tables are only read):

  feedback  request_id, item, label, ts, time, predicted, model_version, usable, reason

A feedback row is keyed to (request_id, item) of a `predictions` row. It is *usable* for
retraining when the raw input of every modality the request had was kept (`package.log.keep`);
otherwise it is stored, counted, and the answer says why not (`<modality>_not_kept`).
Client mistakes raise `FeedbackError` (an HTTP status, a reason, a message): unknown request id
404, unknown item 404, unknown label 400, a second label for the same item 409.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from mmfusion.monitoring.inference_log import has_table, read_kept

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    request_id    TEXT NOT NULL,
    item          INTEGER NOT NULL,
    label         TEXT NOT NULL,
    ts            REAL NOT NULL,
    time          TEXT NOT NULL,
    predicted     TEXT,
    model_version TEXT,
    usable        INTEGER NOT NULL,
    reason        TEXT,           -- why not usable: <modality>_not_kept
    PRIMARY KEY (request_id, item)
);
CREATE INDEX IF NOT EXISTS feedback_ts ON feedback (ts);
"""


class FeedbackError(Exception):
    """A client mistake in a feedback request: HTTP `status`, machine-readable `reason`, a message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Feedback:
    request_id: str
    item: int
    label: str
    predicted: str
    model_version: str
    usable: bool
    reason: str | None
    ts: float

    def to_json(self) -> dict:
        return {
            "request_id": self.request_id,
            "item": self.item,
            "label": self.label,
            "predicted": self.predicted,
            "correct": self.label == self.predicted,
            "model_version": self.model_version,
            "usable_for_retraining": self.usable,
            "not_usable_reason": self.reason,
        }


def connect(path: str | Path, timeout: float = 10.0) -> sqlite3.Connection:
    """A WAL connection to the inference log file with the feedback table created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=timeout)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    return conn


def add_feedback(path: str | Path, request_id: str, item: int, label: str, labels: list[str] | tuple[str, ...],
                 now: float | None = None) -> Feedback:
    """Validate and store one label for (request_id, item); FeedbackError on a client mistake."""
    if not isinstance(request_id, str) or not request_id.strip():
        raise FeedbackError(400, "no_request_id", "request_id is required (the x-request-id of the classify answer)")
    if isinstance(item, bool) or not isinstance(item, int) or item < 0:
        raise FeedbackError(400, "invalid_item", f"item must be a non-negative integer, got {item!r}")
    if label not in labels:
        raise FeedbackError(400, "unknown_label", f"label {label!r} is not one of the model's labels: {', '.join(labels)}")
    conn = connect(path)
    try:
        if not has_table(conn, "predictions"):
            raise FeedbackError(404, "unknown_request", f"no request {request_id!r} in the inference log")
        items = conn.execute(
            "SELECT item, label, model_version, modalities FROM predictions WHERE request_id = ?", (request_id,)
        ).fetchall()
        if not items:
            raise FeedbackError(404, "unknown_request", f"no request {request_id!r} in the inference log")
        row = next((r for r in items if r[0] == item), None)
        if row is None:
            raise FeedbackError(404, "unknown_item", f"request {request_id!r} has items 0..{len(items) - 1}, not {item}")
        _, predicted, version, present = row
        kept = read_kept(conn, [(request_id, item)]).get((request_id, item), {})
        reason = next((f"{m}_not_kept" for m in str(present).split(",") if m and m not in kept), None)
        ts = time.time() if now is None else now
        fb = Feedback(request_id, item, label, predicted, version, reason is None, reason, ts)
        try:
            with conn:
                conn.execute(
                    "INSERT INTO feedback VALUES (?,?,?,?,?,?,?,?,?)",
                    (request_id, item, label, ts, datetime.fromtimestamp(ts, timezone.utc).isoformat(),
                     predicted, version, int(fb.usable), reason),
                )  # fmt: skip
        except sqlite3.IntegrityError:
            (old,) = conn.execute(
                "SELECT label FROM feedback WHERE request_id = ? AND item = ?", (request_id, item)
            ).fetchone()
            raise FeedbackError(
                409, "duplicate_feedback", f"request {request_id!r} item {item} already has feedback (label {old!r})"
            ) from None
        return fb
    finally:
        conn.close()


def read_feedback(path: str | Path, since: float | None = None) -> pd.DataFrame:
    """Every feedback row with what was logged for it, oldest first: `modalities` (the present ones) and
    `inputs` ({modality: (format, raw bytes)} of those kept)."""
    path = Path(path)
    cols = ["request_id", "item", "label", "ts", "time", "predicted", "model_version", "usable", "reason",
            "modalities", "inputs"]  # fmt: skip
    if not path.exists():
        return pd.DataFrame(columns=cols)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)  # readers never write the log
    try:
        if not (has_table(conn, "predictions") and has_table(conn, "feedback")):
            return pd.DataFrame(columns=cols)
        query = (
            "SELECT f.request_id, f.item, f.label, f.ts, f.time, f.predicted, f.model_version, f.usable, f.reason, "
            "p.modalities FROM feedback f JOIN predictions p USING (request_id, item) "
            + ("WHERE f.ts >= ? " if since is not None else "")
            + "ORDER BY f.ts, f.request_id, f.item"
        )
        df = pd.read_sql_query(query, conn, params=(since,) if since is not None else None)
        kept = read_kept(conn, zip(df["request_id"], df["item"]))
    finally:
        conn.close()
    df["usable"] = df["usable"].astype(bool)
    df["inputs"] = [kept.get((str(r), int(i)), {}) for r, i in zip(df["request_id"], df["item"])]
    return df


def feedback_counts(path: str | Path, since: float | None = None) -> dict:
    """{total, usable, not_usable: {reason: n}} of the feedback rows (newer than `since`)."""
    df = read_feedback(path, since)
    return {
        "total": int(len(df)),
        "usable": int(df["usable"].sum()) if len(df) else 0,
        "not_usable": {str(k): int(v) for k, v in df.loc[~df["usable"], "reason"].value_counts().items()} if len(df) else {},
    }

"""Labelled feedback: the true label of an answered request, stored next to the log rows it labels.

Table `feedback` in the inference log's database (its schema: `logdb/migrations`; the log's
own tables are only read):

  feedback  request_id, item, label, ts, time, predicted, model_version, usable, reason

A feedback row is keyed to (request_id, item) of a `predictions` row. It is *usable* for
retraining when the raw input of every modality the request had was kept (`package.log.keep`);
otherwise it is stored, counted, and the answer says why not (`<modality>_not_kept`).
Client mistakes raise `FeedbackError` (an HTTP status, a reason, a message): unknown request id
404, unknown item 404, unknown label 400, a second label for the same item 409.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import URL

from mmfusion import logdb
from mmfusion.monitoring.inference_log import open_log, read_kept


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


def add_feedback(url: str | Path | URL, request_id: str, item: int, label: str, labels: list[str] | tuple[str, ...],
                 now: float | None = None) -> Feedback:
    """Validate and store one label for (request_id, item); FeedbackError on a client mistake."""
    if not isinstance(request_id, str) or not request_id.strip():
        raise FeedbackError(400, "no_request_id", "request_id is required (the x-request-id of the classify answer)")
    if isinstance(item, bool) or not isinstance(item, int) or item < 0:
        raise FeedbackError(400, "invalid_item", f"item must be a non-negative integer, got {item!r}")
    if label not in labels:
        raise FeedbackError(400, "unknown_label", f"label {label!r} is not one of the model's labels: {', '.join(labels)}")
    url = open_log(url)
    with logdb.engine(url).connect() as conn:
        items = conn.execute(
            sa.text("SELECT item, label, model_version, modalities FROM predictions WHERE request_id = :r"), {"r": request_id}
        ).fetchall()
        if not items:
            raise FeedbackError(404, "unknown_request", f"no request {request_id!r} in the inference log")
        row = next((r for r in items if r[0] == item), None)
        if row is None:
            raise FeedbackError(404, "unknown_item", f"request {request_id!r} has items 0..{len(items) - 1}, not {item}")
        _, predicted, version, present = row
        kept = read_kept(conn, [(request_id, item)]).get((request_id, item), {})
        conn.rollback()  # end the read; the insert is its own transaction
        reason = next((f"{m}_not_kept" for m in str(present).split(",") if m and m not in kept), None)
        ts = time.time() if now is None else now
        fb = Feedback(request_id, item, label, predicted, version, reason is None, reason, ts)
        try:
            with conn.begin():
                conn.execute(
                    sa.text("INSERT INTO feedback (request_id, item, label, ts, time, predicted, model_version, usable, reason) "
                            "VALUES (:r, :i, :label, :ts, :time, :predicted, :version, :usable, :reason)"),
                    {"r": request_id, "i": item, "label": label, "ts": ts,
                     "time": datetime.fromtimestamp(ts, timezone.utc).isoformat(), "predicted": predicted,
                     "version": version, "usable": int(fb.usable), "reason": reason},
                )  # fmt: skip
        except sa.exc.IntegrityError:
            (old,) = conn.execute(
                sa.text("SELECT label FROM feedback WHERE request_id = :r AND item = :i"), {"r": request_id, "i": item}
            ).one()
            raise FeedbackError(
                409, "duplicate_feedback", f"request {request_id!r} item {item} already has feedback (label {old!r})"
            ) from None
        return fb


def read_feedback(url: str | Path | URL, since: float | None = None) -> pd.DataFrame:
    """Every feedback row with what was logged for it, oldest first: `modalities` (the present ones) and
    `inputs` ({modality: (format, raw bytes)} of those kept)."""
    url = logdb.resolve_url(url)
    cols = ["request_id", "item", "label", "ts", "time", "predicted", "model_version", "usable", "reason",
            "modalities", "inputs"]  # fmt: skip
    if not logdb.exists(url):
        return pd.DataFrame(columns=cols)
    with logdb.reading(url) as conn:  # readers never write the log
        if not (logdb.has_table(conn, "predictions") and logdb.has_table(conn, "feedback")):
            return pd.DataFrame(columns=cols)
        query = (
            "SELECT f.request_id, f.item, f.label, f.ts, f.time, f.predicted, f.model_version, f.usable, f.reason, "
            "p.modalities FROM feedback f JOIN predictions p ON p.request_id = f.request_id AND p.item = f.item "
            + ("WHERE f.ts >= :since " if since is not None else "")
            + "ORDER BY f.ts, f.request_id, f.item"
        )
        df = pd.read_sql_query(sa.text(query), conn, params={"since": since} if since is not None else None)
        kept = read_kept(conn, zip(df["request_id"], df["item"]))
    df["usable"] = df["usable"].astype(bool)
    df["inputs"] = [kept.get((str(r), int(i)), {}) for r, i in zip(df["request_id"], df["item"])]
    return df


def feedback_counts(url: str | Path | URL, since: float | None = None) -> dict:
    """{total, usable, not_usable: {reason: n}} of the feedback rows (newer than `since`)."""
    df = read_feedback(url, since)
    return {
        "total": int(len(df)),
        "usable": int(df["usable"].sum()) if len(df) else 0,
        "not_usable": {str(k): int(v) for k, v in df.loc[~df["usable"], "reason"].value_counts().items()} if len(df) else {},
    }

"""When the monitor starts a retrain: the `retrain:` policy over the verdict history and the feedback.

Every decision (start or skip, with its reason and the facts it used) and every retrain's result is
one JSON line in `retrain.history_path`: the cooldown and the "feedback since the last retrain" count
read it back.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from mmfusion import paths
from mmfusion.config import Params
from mmfusion.monitoring.feedback import feedback_counts
from mmfusion.monitoring import monitor


def read_events(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def append_event(path: Path, event: dict) -> dict:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    event = {"ts": time.time(), **event}
    with path.open("a") as fh:
        fh.write(json.dumps(event, default=str) + "\n")
    return event


def last_start(events: list[dict]) -> float | None:
    starts = [e["ts"] for e in events if e.get("event") == "start"]
    return max(starts) if starts else None


def drift_streak(history_path: Path, version: str, window_key: str) -> int:
    """How many of the newest complete windows of `version` in a row have verdict `drift`."""
    if not Path(history_path).exists():
        return 0
    conn = sqlite3.connect(f"file:{history_path}?mode=ro", uri=True, timeout=10.0)
    try:
        rows = conn.execute(
            "SELECT verdict FROM verdicts WHERE model_version = ? AND window_key = ? AND complete = 1 ORDER BY idx DESC",
            (version, window_key),
        ).fetchall()
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()
    streak = 0
    for (verdict,) in rows:
        if verdict != "drift":
            break
        streak += 1
    return streak


def decide(params: Params, streak: int, usable_feedback: int, last_start_ts: float | None, now: float) -> tuple[bool, str]:
    """(start?, reason) from the policy: auto, N drifted windows in a row, enough new feedback, cooldown."""
    p = params.retrain
    if not p.auto:
        return False, "retrain.auto is false"
    if streak < p.drift_windows:
        return False, f"{streak} consecutive drifted window(s), policy needs {p.drift_windows}"
    if usable_feedback < p.min_feedback:
        return False, f"{usable_feedback} usable feedback row(s) since the last retrain, policy needs {p.min_feedback}"
    if last_start_ts is not None and now - last_start_ts < p.cooldown_minutes * 60:
        left = p.cooldown_minutes - (now - last_start_ts) / 60
        return False, f"cooldown: last retrain started {(now - last_start_ts) / 60:.1f} min ago ({left:.1f} min left)"
    return True, (f"{streak} consecutive drifted windows (>= {p.drift_windows}) and {usable_feedback} usable "
                  f"feedback rows (>= {p.min_feedback}); no retrain in the last {p.cooldown_minutes:g} min")  # fmt: skip


def evaluate_policy(params: Params, root: Path, model_version: str, now: float | None = None) -> dict:
    """The facts and the decision for the served `model_version`; recorded in the retrain history."""
    root = Path(root)
    now = time.time() if now is None else now
    history = paths.resolve(root, params.retrain.history_path)
    events = read_events(history)
    since = last_start(events)
    verdicts = paths.resolve(root, params.monitor.history_path)
    streak = drift_streak(verdicts, model_version, monitor.window_key(params.monitor))
    counts = feedback_counts(monitor.log_url(params, root), since=since)
    start, reason = decide(params, streak, counts["usable"], since, now)
    return {
        "event": "start" if start else "skip",
        "trigger": "monitor",
        "reason": reason,
        "model_version": model_version,
        "drift_streak": streak,
        "usable_feedback_since_last": counts["usable"],
        "last_start": since,
    }

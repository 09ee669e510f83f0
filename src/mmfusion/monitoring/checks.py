"""Drift checks of one window against the reference: each a method, a score, a threshold and a yes/no.

Checks, per modality of the served model (never a fixed image/text list):
  embedding_drift   Evidently's embedding drift method on the modality's embeddings (default: a domain
                    classifier's ROC AUC), plus a second signal (default MMD) reported beside it
  input_<stat>      Evidently stattests on the input statistics of the modality (its spec's `stats`)
  missing_<m>       the share of requests without the modality, against the reference's share
and once per window:
  prediction_drift  the predicted label distribution (Jensen-Shannon by default)
  confidence_drift  the max-probability distribution (Wasserstein by default)

A window under `min_rows` gets the verdict `insufficient_data`. Otherwise the verdict is `drift`
when a check of severity `critical` is flagged, `warning` when only warning checks are, else `ok`.
The methods are Evidently's own (the HTML report draws the same numbers).

A check without enough values (a modality absent from the window, an all-null column) is left out
with its reason, never a crash and never a pass: the window still gets a verdict, `missing_<m>`
speaks for a modality that stopped arriving, and `notes` says so in plain sentences.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pandas as pd

from mmfusion import compat
from mmfusion.config import MonitorParams
from mmfusion.modalities import stats_of
from mmfusion.monitoring.reference import MonitorData

SEVERITIES = ("critical", "warning")
VERDICTS = ("ok", "warning", "drift", "insufficient_data")
SCHEMA = "mmfusion.drift-verdict/v1"

log = logging.getLogger(__name__)


def bootstrap_on(setting: str, reference_rows: int) -> bool:
    """`auto` bootstraps the embedding test when the reference is small (Evidently's own rule: < 1,000 rows)."""
    value = str(setting).strip().lower()
    if value == "auto":
        return reference_rows < 1000
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"monitor.embeddings.bootstrap: expected auto, true or false, got {setting!r}")


def embedding_method(name: str, threshold: float, bootstrap: bool, quantile: float = 0.95):
    """An Evidently embedding drift method by name: model | mmd | ratio | distance."""
    from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod, RatioDriftMethod

    if name == "model":
        return ModelDriftMethod(threshold=threshold, bootstrap=bootstrap, quantile_probability=quantile)
    if name == "mmd":
        return MMDDriftMethod(threshold=threshold)  # its bootstrap builds an (m+n)^2 kernel per resample
    if name == "distance":
        return DistanceDriftMethod(threshold=threshold, bootstrap=bootstrap, quantile_probability=quantile)
    if name == "ratio":
        return RatioDriftMethod(threshold=threshold)
    raise ValueError(f"unknown embedding drift method {name!r}; methods: model, mmd, ratio, distance")


def _sample(arr: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    if len(arr) <= cap:
        return arr
    return arr[np.sort(rng.choice(len(arr), size=cap, replace=False))]


def bootstrap_auc_threshold(n_cur: int, n_ref: int, quantile: float) -> float:
    """The AUC a bootstrapped `model` method compares with: `quantile` of 100 random classifiers' AUCs
    on the same held-out half (Evidently's own split and seeds), so the verdict JSON shows the real bar."""
    from sklearn.model_selection import train_test_split

    y = np.array([1] * n_ref + [0] * n_cur)
    _, _, _, y_test = train_test_split(np.zeros((len(y), 1)), y, test_size=0.5, random_state=42, shuffle=True)
    return float(np.percentile([compat.random_classifier_auc(y_test, i) for i in range(100)], 100 * quantile))


def _embedding_score(method, cur: np.ndarray, ref: np.ndarray) -> tuple[float, bool]:
    columns = [f"d{i}" for i in range(cur.shape[1])]
    score, drifted, _ = method(pd.DataFrame(cur, columns=columns), pd.DataFrame(ref, columns=columns))
    return float(score), bool(drifted)


def _check(name: str, kind: str, method: str, score, threshold, drifted, severity: str, reason="", **extra) -> dict:
    if score is not None and not math.isfinite(float(score)):
        score, drifted, reason = None, False, reason or f"{method} gave no finite score"
    status = "insufficient_data" if score is None else ("drifted" if drifted else "ok")
    return {
        "name": name,
        "kind": kind,
        "method": method,
        "score": None if score is None else round(float(score), 6),
        "threshold": None if threshold is None else float(threshold),
        "drifted": bool(drifted),
        "severity": severity,
        "status": status,
        **({"reason": reason} if status == "insufficient_data" else {}),
        **extra,
    }


def too_few(rows: int, ref_rows: int, min_rows: int, what: str) -> str:
    """Why a check is left out: the rows with a value here and in the reference, against `min_rows`."""
    return f"{rows} {what} in this window and {ref_rows} in the reference; at least {min_rows} needed on each side"


def _failed(name: str, kind: str, method: str, threshold, severity: str, exc: Exception, **extra) -> dict:
    """A check whose method raised: left out with the error as its reason (the run goes on)."""
    log.warning("monitor: check %s (%s) failed: %s", name, method, exc)
    return _check(name, kind, method, None, threshold, False, severity, reason=f"{method} failed: {exc}", **extra)


def embedding_checks(cur: MonitorData, ref: MonitorData, p: MonitorParams, rng: np.random.Generator) -> list[dict]:
    """One check per modality (and one for the second method): the window's embeddings vs the reference's."""
    e = p.embeddings
    bootstrap = bootstrap_on(e.bootstrap, len(ref))
    checks = []
    for m in ref.modalities:
        c = cur.embeddings.get(m)
        c = c[cur.present(m)] if c is not None and len(c) else np.zeros((0, 0), np.float32)
        r = _sample(ref.embeddings[m][ref.present(m)], e.max_rows, rng)
        c = _sample(c, e.max_rows, rng)
        methods = [(e.method, e.threshold, e.severity)]
        if e.second_method:
            methods.append((e.second_method, e.second_threshold, "info"))
        for k, (name, threshold, severity) in enumerate(methods):
            check_name = f"embedding_drift[{m}]" if k == 0 else f"embedding_drift[{m}]:{name}"
            if len(c) < p.min_rows or len(r) < p.min_rows:
                reason = too_few(len(c), len(r), p.min_rows, f"rows with {m}")
                checks.append(_check(check_name, "embedding", name, None, threshold, False, severity, reason,
                                     modality=m, rows=len(c)))  # fmt: skip
                continue
            boot = bootstrap and name in ("model", "distance")
            try:
                score, drifted = _embedding_score(embedding_method(name, threshold, boot, e.quantile), c, r)
            except Exception as exc:  # noqa: BLE001  (an odd window must not stop the run)
                checks.append(_failed(check_name, "embedding", name, threshold, severity, exc, modality=m, rows=len(c)))
                continue
            extra = {"modality": m, "rows": int(len(c)), "bootstrap": boot, **({"quantile": e.quantile} if boot else {})}
            if boot and name == "model":
                threshold = round(bootstrap_auc_threshold(len(c), len(r), e.quantile), 6)
            if k == 0 and e.min_score > 0:
                drifted = drifted and score >= e.min_score
                threshold = max(float(threshold), e.min_score)
                extra["min_score"] = e.min_score
            checks.append(_check(check_name, "embedding", name, score, threshold, drifted, severity, **extra))
    return checks


def constant_on_both_sides(ref: pd.Series, cur: pd.Series) -> bool:
    """One value (or none) in the reference and one in the window: stattests need variation (anderson, es raise)."""
    return ref.dropna().nunique() <= 1 and cur.dropna().nunique() <= 1


def _column_check(name: str, kind: str, ref: pd.Series, cur: pd.Series, cfg, min_rows: int, **extra) -> dict:
    ref, cur = ref.dropna(), cur.dropna()
    if len(cur) < min_rows or len(ref) < min_rows:
        reason = too_few(len(cur), len(ref), min_rows, "values")
        return _check(name, kind, cfg.method, None, cfg.threshold, False, cfg.severity, reason, rows=len(cur), **extra)
    col_kind = "cat" if kind == "prediction" else "num"
    if col_kind == "num" and constant_on_both_sides(ref, cur):
        # a constant column (every emoji is 72x72): drifted only if the constant changed
        same = bool(np.isclose(float(ref.iloc[0]), float(cur.iloc[0])))
        return _check(name, kind, "constant", 0.0 if same else 1.0, 0.0, not same, cfg.severity, rows=int(len(cur)), **extra)
    try:
        score, drifted = compat.column_stattest(ref.astype(str) if col_kind == "cat" else ref.astype(float),
                                                cur.astype(str) if col_kind == "cat" else cur.astype(float),
                                                col_kind, cfg.method, cfg.threshold)  # fmt: skip
    except Exception as exc:  # noqa: BLE001  (an odd column must not stop the run)
        return _failed(name, kind, cfg.method, cfg.threshold, cfg.severity, exc, rows=int(len(cur)), **extra)
    return _check(name, kind, cfg.method, score, cfg.threshold, drifted, cfg.severity, rows=int(len(cur)), **extra)


def scalar_checks(cur: MonitorData, ref: MonitorData, p: MonitorParams) -> list[dict]:
    """Prediction, confidence, input statistics and missing-modality share."""
    checks = [
        _column_check("prediction_drift", "prediction", ref.rows["prediction"], cur.rows["prediction"], p.prediction, p.min_rows),
        _column_check("confidence_drift", "confidence", ref.rows["confidence"], cur.rows["confidence"], p.confidence, p.min_rows),
    ]  # fmt: skip
    for m in ref.modalities:
        for col in stats_of(m):
            if col in ref.rows and col in cur.rows:
                checks.append(_column_check(f"input_{col}", "input", ref.rows[col], cur.rows[col], p.inputs, p.min_rows, modality=m))
        ref_missing = float(1 - ref.present(m).mean()) if len(ref) else 0.0
        cur_missing = float(1 - cur.present(m).mean()) if len(cur) else 0.0
        delta = abs(cur_missing - ref_missing)
        checks.append(
            _check(
                f"missing_{m}", "missing", "share_delta", delta, p.missing_share_delta, delta > p.missing_share_delta,
                p.missing_severity, modality=m, current_share=round(cur_missing, 4), reference_share=round(ref_missing, 4),
            )
        )  # fmt: skip
    return checks


def presence_notes(cur: MonitorData, ref: MonitorData, p: MonitorParams) -> list[str]:
    """Plain sentences on modalities the window lacks (wholly, nearly, or far more often than the reference)."""
    notes = []
    n = len(cur)
    for m in ref.modalities:
        have = int(cur.present(m).sum())
        share, ref_share = have / n if n else 0.0, float(ref.present(m).mean()) if len(ref) else 0.0
        if have == 0 and ref_share > 0:
            notes.append(
                f"No {m} arrived in this window: none of its {n} requests carried {m}, while {ref_share:.0%} of the "
                f"reference rows do. Clients may have stopped sending {m}; its drift checks are left out and "
                f"missing_{m} reports the change."
            )
        elif 0 < have < p.min_rows and ref_share > 0:
            notes.append(
                f"Only {have} of {n} requests carried {m} ({share:.0%}; the reference: {ref_share:.0%}): too few "
                f"to test the drift of {m} (at least {p.min_rows} needed)."
            )
        elif abs(share - ref_share) > p.missing_share_delta:
            notes.append(f"{share:.0%} of the requests carried {m}, against {ref_share:.0%} of the reference rows.")
    return notes


def left_out(checks: list[dict]) -> list[dict]:
    """The checks that could not be computed, with why."""
    return [{"name": c["name"], "reason": c.get("reason", "")} for c in checks if c["status"] == "insufficient_data"]


def left_out_note(items: list[dict], what: str) -> list[str]:
    """One sentence listing what was left out of `what` and why (nothing when nothing was)."""
    if not items:
        return []
    return [f"Left out of {what}: " + "; ".join(f"{i['name']} ({i['reason']})" for i in items) + "."]


def summarise(checks: list[dict], rows: int, min_rows: int) -> tuple[str, str]:
    """(verdict, severity) of a window from its checks."""
    if rows < min_rows:
        return "insufficient_data", "none"
    flagged = {c["severity"] for c in checks if c["drifted"]}
    if "critical" in flagged:
        return "drift", "critical"
    if "warning" in flagged:
        return "warning", "warning"
    return "ok", "none"


def check_window(cur: MonitorData, ref: MonitorData, p: MonitorParams) -> dict[str, Any]:
    """Every check of one window; the verdict document of our own schema (without window/report details)."""
    start = time.perf_counter()
    rng = np.random.default_rng(p.seed)
    if len(cur) < p.min_rows:
        checks: list[dict] = []
        notes = [f"Only {len(cur)} requests in this window: at least {p.min_rows} are needed for a verdict."]
    else:
        checks = embedding_checks(cur, ref, p, rng) + scalar_checks(cur, ref, p)
        notes = presence_notes(cur, ref, p) + left_out_note(left_out(checks), "the verdict")
    verdict, severity = summarise(checks, len(cur), p.min_rows)
    return {
        "schema": SCHEMA,
        "verdict": verdict,
        "severity": severity,
        "rows": int(len(cur)),
        "min_rows": p.min_rows,
        "flagged": [c["name"] for c in checks if c["drifted"] and c["severity"] in SEVERITIES],
        "notes": notes,
        "left_out": left_out(checks),
        "checks": checks,
        "check_seconds": round(time.perf_counter() - start, 3),
    }

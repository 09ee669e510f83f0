"""Evidently reports and the local Evidently workspace for drift windows.

One `Report` per window (self-contained HTML, plotly inlined): embedding drift per modality (with
its t-SNE picture, capped at `monitor.plot_rows` rows per side: the picture is most of the cost),
drift of the prediction, confidence and input statistics with the same methods and thresholds as
the verdict (`monitoring/checks.py`), missing-modality shares and the row count. Each snapshot is
also added to a local Evidently workspace whose dashboard draws the trends (`make monitor-ui`).

The metric list is built from what the window holds: a metric Evidently cannot compute (an embedding
with too few rows carrying it, an all-null or too sparse column, a column constant on both sides) is
left out and listed with why; `add_notice` writes that list (and the verdict's notes) at the top of
the saved HTML. If Evidently still fails, the report falls back to counts and means: never an abort.
"""

from __future__ import annotations

import html
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from mmfusion import compat
from mmfusion.config import MonitorParams
from mmfusion.monitoring.checks import bootstrap_on, constant_on_both_sides, embedding_method, too_few
from mmfusion.modalities import stats_of
from mmfusion.monitoring.reference import MonitorData

log = logging.getLogger(__name__)

REPORTS_ROUTE = "/mmfusion/reports"  # where `make monitor-ui` serves monitor.out_dir beside the Evidently UI
TSNE_PERPLEXITY = 30  # sklearn's default in Evidently's embedding picture: it needs more rows than this
DRIFT_METRICS = ("EmbeddingsDrift", "ValueDrift")  # what the fallback report drops when Evidently fails


def _frame(
    data: MonitorData, modalities: list[str], stats: list[str], embedded: list[str]
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """A flat table for Evidently: scalar columns + one column per dimension of the `embedded` modalities."""
    cols = {
        "prediction": data.rows["prediction"].astype(str).to_numpy(),
        "confidence": data.rows["confidence"].astype(float).to_numpy(),
    }
    for col in stats:
        cols[col] = pd.to_numeric(data.rows[col], errors="coerce").to_numpy() if col in data.rows else np.nan
    for m in modalities:
        cols[f"missing_{m}"] = (~data.present(m)).astype(float)
    frames = [pd.DataFrame(cols)]
    emb_cols = {}
    for m in embedded:
        names = [f"{m}_{i}" for i in range(data.embeddings[m].shape[1])]
        emb_cols[m] = names
        frames.append(pd.DataFrame(data.embeddings[m], columns=names))
    return pd.concat(frames, axis=1), emb_cols


def _report_sample(data: MonitorData, cap: int, rng: np.random.Generator) -> MonitorData:
    if len(data) <= cap:
        return data
    return data.take(np.sort(rng.choice(len(data), size=cap, replace=False)))


def _stats(ref: MonitorData) -> list[str]:
    return [c for m in ref.modalities for c in stats_of(m) if c in ref.rows]


def _embedding_gap(cur: MonitorData, ref: MonitorData, m: str, p: MonitorParams) -> str:
    """Why Evidently cannot draw the embedding drift of `m` for this window ("" when it can)."""
    have, ref_have = int(cur.present(m).sum()), int(ref.present(m).sum())
    if have < p.min_rows or ref_have < p.min_rows:
        return too_few(have, ref_have, p.min_rows, f"rows with {m}")
    if cur.embeddings[m].shape[1] != ref.embeddings[m].shape[1]:
        return f"{cur.embeddings[m].shape[1]} dimensions here, {ref.embeddings[m].shape[1]} in the reference"
    cap = max(16, int(p.plot_rows))
    if min(cap, len(cur)) + min(cap, len(ref)) <= TSNE_PERPLEXITY:
        return f"its t-SNE picture needs more than {TSNE_PERPLEXITY} rows in all"
    return ""


def _column_gap(ref: pd.Series, cur: pd.Series, min_rows: int, numeric: bool) -> str:
    """Why Evidently's drift of one column cannot be computed ("" when it can): the verdict's own rules."""
    ref, cur = ref.dropna(), cur.dropna()
    if len(cur) < min_rows or len(ref) < min_rows:
        return too_few(len(cur), len(ref), min_rows, "values")
    if numeric and constant_on_both_sides(ref, cur):
        return (f"constant on both sides ({float(ref.iloc[0]):g} in the reference, {float(cur.iloc[0]):g} here): "
                "stattests need variation; the verdict compares the two values")  # fmt: skip
    return ""


def plan_metrics(cur: MonitorData, ref: MonitorData, p: MonitorParams) -> tuple[list, list[str], list[dict]]:
    """(Evidently metrics this window can feed, modalities with embedding drift, the metrics left out with why)."""
    from evidently.metrics import EmbeddingsDrift, MeanValue, RowCount, UniqueValueCount, ValueDrift

    stats = _stats(ref)
    cur_rows = cur.rows.reindex(columns=["prediction", "confidence", *stats])
    ref_rows = ref.rows.reindex(columns=["prediction", "confidence", *stats])
    left: list[dict] = []
    embedded = []
    bootstrap = bootstrap_on(p.embeddings.bootstrap, len(ref))
    metrics = [RowCount()]
    for m in ref.modalities:
        gap = _embedding_gap(cur, ref, m, p)
        if gap:
            left.append({"name": f"EmbeddingsDrift({m})", "reason": gap})
            continue
        embedded.append(m)
        method = embedding_method(p.embeddings.method, p.embeddings.threshold, bootstrap, p.embeddings.quantile)
        metrics.append(EmbeddingsDrift(embeddings_name=m, drift_method=method))
    for col, cfg in [("prediction", p.prediction), ("confidence", p.confidence), *((c, p.inputs) for c in stats)]:
        numeric = col != "prediction"
        gap = _column_gap(ref_rows[col], cur_rows[col], p.min_rows, numeric)
        if gap:
            left.append({"name": f"ValueDrift({col})", "reason": gap})
        else:
            metrics.append(ValueDrift(column=col, method=cfg.method, threshold=cfg.threshold))
        if not numeric:
            metrics.append(UniqueValueCount(column=col))
        elif cur_rows[col].notna().any():
            metrics.append(MeanValue(column=col))
        else:
            left.append({"name": f"MeanValue({col})", "reason": "no values in this window"})
    metrics += [MeanValue(column=f"missing_{m}") for m in ref.modalities]
    return metrics, embedded, left


def build_snapshot(cur: MonitorData, ref: MonitorData, p: MonitorParams, name: str, timestamp: float,
                   metadata: dict | None = None, tags: list[str] | None = None):  # fmt: skip
    """The Evidently Report of one window: (snapshot, metrics left out with why); no snapshot if Evidently fails.
    `metadata` and `tags` label the snapshot (`report_labels`)."""
    from evidently import DataDefinition, Dataset, Report

    modalities = ref.modalities
    stats = _stats(ref)
    metrics, embedded, left = plan_metrics(cur, ref, p)
    cur_df, emb_cols = _frame(cur, modalities, stats, embedded)
    ref_df, _ = _frame(ref, modalities, stats, embedded)
    definition = DataDefinition(
        numerical_columns=["confidence", *stats, *[f"missing_{m}" for m in modalities]],
        categorical_columns=["prediction"],
        text_columns=[],
        datetime_columns=[],
        unknown_columns=[],
        list_columns=[],
        embeddings=emb_cols,
    )
    # The t-SNE picture of EmbeddingsDrift samples up to this many rows per side.
    compat.set_embeddings_plot_rows(max(16, int(p.plot_rows)))

    def run(chosen: list):
        # an all-null column makes Evidently's column statistics divide 0 by 0: a warning each, nothing wrong
        with np.errstate(invalid="ignore", divide="ignore"):
            return Report(chosen, include_tests=True).run(
                Dataset.from_pandas(cur_df, data_definition=definition),
                Dataset.from_pandas(ref_df, data_definition=definition),
                timestamp=datetime.fromtimestamp(timestamp, timezone.utc).replace(tzinfo=None),
                name=name,
                metadata=metadata,
                tags=tags,
            )

    try:
        return run(metrics), left
    except Exception as exc:  # noqa: BLE001  (a window Evidently cannot handle must not stop the monitor)
        log.warning("monitor: Evidently failed on %s (%s); its report keeps counts and means only", name, exc)
        dropped = ", ".join(_metric_name(m) for m in metrics if type(m).__name__ in DRIFT_METRICS)
        left.append({"name": dropped, "reason": f"Evidently failed: {exc}", "failed": True})
    try:
        return run([m for m in metrics if type(m).__name__ not in DRIFT_METRICS]), left
    except Exception as exc:  # noqa: BLE001
        log.warning("monitor: no Evidently report for %s: %s", name, exc)
        left.append({"name": "the whole report", "reason": f"Evidently failed: {exc}", "failed": True})
        return None, left


def _metric_name(metric) -> str:
    arg = getattr(metric, "embeddings_name", None) or getattr(metric, "column", None)
    return f"{type(metric).__name__}({arg})" if arg else type(metric).__name__


def add_notice(html_path: Path, title: str, lines: list[str]) -> None:
    """A short styled notice right after `<body>` of a saved report (Evidently 0.7's Report has no text widget)."""
    if not lines:
        return
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    add_section(html_path, (
        '<section id="mmfusion-notice" style="margin:16px;padding:12px 16px;border-left:6px solid #d9822b;'
        'background:#fff7e6;color:#1f1f1f;font:14px/1.5 system-ui,sans-serif">'
        f'<strong>{html.escape(title)}</strong><ul style="margin:6px 0 0 18px;padding:0">{items}</ul></section>'
    ))  # fmt: skip


def add_section(html_path: Path, section: str) -> None:
    """Insert an HTML fragment right after `<body>` of a saved report (above what was inserted before)."""
    if not section:
        return
    path = Path(html_path)
    text = path.read_text(encoding="utf-8")
    text, found = re.subn(r"<body[^>]*>", lambda match: match.group(0) + section, text, count=1)
    path.write_text(text if found else section + text, encoding="utf-8")


def report_labels(verdict: dict, report: Path) -> tuple[dict[str, str], list[str]]:
    """(metadata, tags) of a window's workspace snapshot: its HTML report's path and the verdict (the UI's report
    list shows both, as plain text: its JSON viewer makes no link of a string)."""
    flagged = verdict["flagged"]
    metadata = {"report_html": str(report), "verdict": verdict["verdict"], "flagged": ", ".join(flagged) or "-"}
    return metadata, list(dict.fromkeys([verdict["verdict"], *flagged]))


def link_report(snapshot, rel_path: str, verdict: dict) -> None:
    """Open a window's workspace snapshot with a link to its full HTML report (the "what drifted" section and the
    notice, which the UI's copy lacks); `rel_path` is the report's path under monitor.out_dir, which `make monitor-ui`
    serves under REPORTS_ROUTE (the UI's Markdown drops file: links). Call it after the HTML was saved."""
    flagged = ", ".join(verdict["flagged"]) or "nothing flagged"
    compat.add_snapshot_text(
        snapshot,
        title="mmfusion: this window's full report",
        markdown=f"Verdict **{verdict['verdict']}** ({flagged}). [Open the full report]({REPORTS_ROUTE}/{quote(rel_path)}) "
        "(served by `make monitor-ui`): the verdict's notes and, per modality that drifted, the window items least "
        f"like the reference beside their nearest reference items. File: `{verdict.get('report_html', rel_path)}`.",
    )


def dashboard_panels(modalities: list[str]):
    """The workspace dashboard: drift per modality, prediction drift and distribution, volume, missing shares."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel, text_panel

    def metric(name: str, **labels) -> str:
        return f"evidently:metric_v2:{name}"

    return [
        text_panel(
            title="mmfusion: drift of what the served model sees",
            description="one point per monitored window; Reports lists the windows (verdict and flagged checks as tags), "
            "and each window's report opens with a link to its full mmfusion report (what drifted, with previews)",
        ),
        counter_panel(
            title="Requests monitored",
            size="half",
            aggregation="sum",
            values=[PanelMetric(legend="rows", metric=metric("RowCount"), metric_labels={})],
        ),
        counter_panel(
            title="Mean confidence (last window)",
            size="half",
            aggregation="last",
            values=[PanelMetric(legend="confidence", metric=metric("MeanValue"), metric_labels={"column": "confidence"})],
        ),
        line_plot_panel(
            title="Embedding drift score per modality (domain classifier ROC AUC; 0.5 = no drift)",
            values=[
                PanelMetric(legend=m, metric=metric("EmbeddingsDrift"), metric_labels={"embeddings_name": m})
                for m in modalities
            ],
        ),
        line_plot_panel(
            title="Prediction and confidence drift",
            size="half",
            values=[
                PanelMetric(legend="prediction", metric=metric("ValueDrift"), metric_labels={"column": "prediction"}),
                PanelMetric(legend="confidence", metric=metric("ValueDrift"), metric_labels={"column": "confidence"}),
            ],
        ),
        line_plot_panel(
            title="Share of requests missing each modality",
            size="half",
            values=[
                PanelMetric(legend=m, metric=metric("MeanValue"), metric_labels={"column": f"missing_{m}"})
                for m in modalities
            ],
        ),
        bar_plot_panel(
            title="Requests per window",
            values=[PanelMetric(legend="rows", metric=metric("RowCount"), metric_labels={})],
        ),
        bar_plot_panel(
            title="Predicted label share per window",
            stacked=True,
            values=[
                PanelMetric(
                    legend="{{label}}",
                    metric=metric("UniqueValueCount"),
                    metric_labels={"column": "prediction", "value_type": "share"},
                )
            ],
        ),
    ]


def workspace_project(workspace: Path, name: str, modalities: list[str]):
    """(workspace, project): the local Evidently workspace and the project, created with its dashboard if new."""
    from evidently.ui.workspace import Workspace

    ws = Workspace.create(str(workspace))
    found = ws.search_project(name)
    if found:
        return ws, found[0]
    project = ws.create_project(name)
    project.description = f"Drift monitoring of the served mmfusion model (modalities: {', '.join(modalities)})"
    for panel in dashboard_panels(modalities):
        project.dashboard.add_panel(panel)
    project.save()
    return ws, project

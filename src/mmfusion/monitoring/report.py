"""Evidently reports and the local Evidently workspace for drift windows.

One `Report` per window (self-contained HTML, plotly inlined): embedding drift per modality (with
its t-SNE picture, capped at `monitor.plot_rows` rows per side: the picture is most of the cost),
drift of the prediction, confidence and input statistics with the same methods and thresholds as
the verdict (`monitoring/checks.py`), missing-modality shares and the row count. Each snapshot is
also added to a local Evidently workspace whose dashboard draws the trends (`make monitor-ui`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion.config import MonitorParams
from mmfusion.monitoring.checks import bootstrap_on, embedding_method
from mmfusion.monitoring.reference import INPUT_STATS, MonitorData

log = logging.getLogger(__name__)


def _frame(data: MonitorData, modalities: list[str], stats: list[str]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """A flat table for Evidently: scalar columns + one column per embedding dimension."""
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
    for m in modalities:
        names = [f"{m}_{i}" for i in range(data.embeddings[m].shape[1])]
        emb_cols[m] = names
        frames.append(pd.DataFrame(data.embeddings[m], columns=names))
    return pd.concat(frames, axis=1), emb_cols


def _report_sample(data: MonitorData, cap: int, rng: np.random.Generator) -> MonitorData:
    if len(data) <= cap:
        return data
    return data.take(np.sort(rng.choice(len(data), size=cap, replace=False)))


def build_snapshot(cur: MonitorData, ref: MonitorData, p: MonitorParams, name: str, timestamp: float):
    """Run the Evidently Report of one window; returns the snapshot (save_html / save_json / dict)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift import embeddings_drift
    from evidently.metrics import EmbeddingsDrift, MeanValue, RowCount, UniqueValueCount, ValueDrift

    modalities = ref.modalities
    stats = [c for m in modalities for c in INPUT_STATS.get(m, ()) if c in ref.rows]
    cur_df, emb_cols = _frame(cur, modalities, stats)
    ref_df, _ = _frame(ref, modalities, stats)
    numeric = ["confidence", *stats, *[f"missing_{m}" for m in modalities]]
    definition = DataDefinition(
        numerical_columns=numeric,
        categorical_columns=["prediction"],
        text_columns=[],
        datetime_columns=[],
        unknown_columns=[],
        list_columns=[],
        embeddings=emb_cols,
    )
    bootstrap = bootstrap_on(p.embeddings.bootstrap, len(ref))
    metrics = [RowCount()]
    for m in modalities:
        metrics.append(
            EmbeddingsDrift(
                embeddings_name=m, drift_method=embedding_method(
                    p.embeddings.method, p.embeddings.threshold, bootstrap, p.embeddings.quantile
                )
            )
        )
    metrics += [
        ValueDrift(column="prediction", method=p.prediction.method, threshold=p.prediction.threshold),
        UniqueValueCount(column="prediction"),
        ValueDrift(column="confidence", method=p.confidence.method, threshold=p.confidence.threshold),
        MeanValue(column="confidence"),
    ]
    for col in stats:
        if ref_df[col].nunique() > 1 or cur_df[col].nunique() > 1:
            metrics.append(ValueDrift(column=col, method=p.inputs.method, threshold=p.inputs.threshold))
        metrics.append(MeanValue(column=col))
    metrics += [MeanValue(column=f"missing_{m}") for m in modalities]
    # The t-SNE picture of EmbeddingsDrift samples up to this many rows per side (module constant).
    embeddings_drift.SAMPLE_CONSTANT = max(10, int(p.plot_rows))
    report = Report(metrics, include_tests=True)
    return report.run(
        Dataset.from_pandas(cur_df, data_definition=definition),
        Dataset.from_pandas(ref_df, data_definition=definition),
        timestamp=datetime.fromtimestamp(timestamp, timezone.utc).replace(tzinfo=None),
        name=name,
    )


def dashboard_panels(modalities: list[str]):
    """The workspace dashboard: drift per modality, prediction drift and distribution, volume, missing shares."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel, text_panel

    def metric(name: str, **labels) -> str:
        return f"evidently:metric_v2:{name}"

    return [
        text_panel(title="mmfusion: drift of what the served model sees", description="one point per monitored window"),
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

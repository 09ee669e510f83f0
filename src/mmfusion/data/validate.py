"""Validation of the clean manifest with a Great Expectations suite.

The suite holds the checks of any data here (schema, unique ids, label set, presence of the
modalities) and each modality spec's own over the rows that have it (`ModalitySpec.expectations`).
Two batches are checked: the samples themselves and a per-class count table (GX
has no expectation over group counts, so the counts are a small table of their own).
Expectations carry a GX severity: a failed `critical` one fails the stage, a
`warning` one is reported and the pipeline goes on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmfusion.config import ValidateParams
from mmfusion.data.docs_assets import localize_data_docs
from mmfusion.data.manifest import clean_columns
from mmfusion.errors import DataCheckFailed
from mmfusion.modalities.base import ModalitySpec, modalities_in, specs_for

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
log = logging.getLogger(__name__)


class ValidationFailed(DataCheckFailed):
    """A critical expectation failed; the message names it and the offending values."""


def _samples_suite(gxe: Any, labels: list[str], specs: Mapping[str, ModalitySpec], columns: list[str],
                   params: ValidateParams) -> list:  # fmt: skip
    from great_expectations.expectations.row_conditions import Column

    # Rows with some modalities only are real samples (clean.allow_missing_modality): the checks of a
    # modality apply to the rows that have it, and the share of rows missing one is bounded.
    per_modality = [
        e for m, spec in specs.items()
        for e in spec.expectations(gxe, params, {"row_condition": Column(f"has_{m}") == 1})
    ]  # fmt: skip
    sample_columns = ["id", *(spec.column for spec in specs.values()), "label", "group"]
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in sample_columns],
        *[gxe.ExpectColumnValuesToBeOfType(column=c, type_="str") for c in sample_columns],
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels),
        gxe.ExpectColumnValuesToBeBetween(column="modalities", min_value=1),
        gxe.ExpectColumnMeanToBeBetween(column="missing_modality", max_value=params.max_missing_modality_share),
        *per_modality,
    ]


def add_derived_columns(df: pd.DataFrame, root: Path, specs: Mapping[str, ModalitySpec]) -> list[str]:
    """Add what the suite checks besides the manifest: `has_<modality>` (an empty cell is a missing modality),
    each spec's `validation_columns`, `modalities` (how many a row has) and `missing_modality` (fewer than
    all); returns the added columns."""
    has = {m: f"has_{m}" for m in specs}
    for m, spec in specs.items():
        df[has[m]] = (df[spec.column] != "").astype(int)
    own: list[str] = []
    for spec in specs.values():
        for column, values in spec.validation_columns(df, root).items():
            df[column] = values
            own.append(column)
    df["modalities"] = sum((df[c] for c in has.values()), start=0)
    df["missing_modality"] = (df["modalities"] < len(specs)).astype(float)
    return [*own, *has.values(), "modalities", "missing_modality"]


def _counts_suite(gxe: Any, params: ValidateParams) -> list:
    return [
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=params.min_per_class),
        gxe.ExpectColumnValuesToBeBetween(column="ratio_to_smallest", max_value=params.max_imbalance),
        gxe.ExpectColumnValuesToBeBetween(column="ratio_to_smallest", max_value=params.warn_imbalance, severity="warning"),
    ]


def class_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Samples per label and each label's size relative to the smallest class."""
    counts = df["label"].value_counts().rename_axis("label").reset_index(name="count")
    smallest = max(int(counts["count"].min()), 1) if len(counts) else 1
    counts["ratio_to_smallest"] = counts["count"] / smallest
    return counts


def _summarise(result: Any, batch: str, key: str) -> list[dict]:
    rows = []
    for r in result.results:
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
        res = r.result or {}
        rows.append(
            {
                "batch": batch,
                "expectation": cfg.type,
                "kwargs": kwargs,
                "severity": str(getattr(cfg, "severity", "critical")).split(".")[-1].lower(),
                "success": bool(r.success),
                "unexpected_count": res.get("unexpected_count"),
                "unexpected_values": [str(v) for v in (res.get("partial_unexpected_list") or [])[:10]],
                f"unexpected_{key}s": [str(i.get(key)) for i in (res.get("unexpected_index_list") or [])[:20]
                                       if isinstance(i, dict)],
                "observed_value": _jsonable(res.get("observed_value")),
                "error": (r.exception_info or {}).get("exception_message") if not r.success else None,
            }
        )
    return rows


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def validate_manifest(df: pd.DataFrame, root: Path, out_dir: Path, params: ValidateParams,
                      settings: Mapping[str, Mapping[str, Any]] | None = None) -> dict:  # fmt: skip
    """Run the suite over a clean manifest (files relative to `root`); write result.json and Data Docs.

    Raises ValidationFailed, after writing the reports, when a critical expectation fails.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    df = df.copy()
    specs = specs_for(modalities_in(df.columns), root, settings)
    columns = clean_columns(specs) + add_derived_columns(df, root, specs)
    labels = sorted(df["label"].unique().tolist())
    counts = class_counts(df)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    docs_dir = (out_dir / "data_docs").resolve()
    context.add_data_docs_site(
        site_name="mmfusion",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = context.data_sources.add_pandas("mmfusion")
    rows: list[dict] = []
    # COMPLETE results with an index column, so a failure names the offending ids or classes.
    for name, frame, expectations, key in (
        ("samples", df, _samples_suite(gxe, labels, specs, columns, params), "id"),
        ("class_counts", counts, _counts_suite(gxe, params), "label"),
    ):
        asset = source.add_dataframe_asset(name=name)
        batch_def = asset.add_batch_definition_whole_dataframe(f"{name}_all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"clean_{name}"))
        for exp in expectations:
            suite.add_expectation(exp)
        vd = context.validation_definitions.add(gx.ValidationDefinition(name=f"validate_{name}", data=batch_def, suite=suite))
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"checkpoint_{name}",
                validation_definitions=[vd],
                actions=[UpdateDataDocsAction(name="docs", site_names=["mmfusion"])],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key]},
            )
        )
        cp_result = checkpoint.run(batch_parameters={"dataframe": frame})
        for vr in cp_result.run_results.values():
            rows.extend(_summarise(vr, name, key))
    # GX's pages load Bootstrap, jQuery, bootstrap-table... from CDNs: offline they are empty. Serve local copies.
    localize_data_docs(docs_dir)

    failed_critical = [r for r in rows if not r["success"] and r["severity"] == "critical"]
    warnings = [r for r in rows if not r["success"] and r["severity"] != "critical"]
    result = {
        "success": not failed_critical,
        "evaluated": len(rows),
        "failed_critical": len(failed_critical),
        "warnings": len(warnings),
        "rows": int(len(df)),
        "missing_modality_share": round(float(df["missing_modality"].mean()), 4) if len(df) else 0.0,
        "labels": len(labels),
        "class_counts": {r["label"]: int(r["count"]) for _, r in counts.iterrows()},
        "data_docs": str((docs_dir / "index.html").relative_to(out_dir.resolve())),
        "expectations": rows,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    for w in warnings:
        log.warning("validation warning: %s", describe_failure(w))
    if failed_critical:
        lines = "; ".join(describe_failure(r) for r in failed_critical)
        raise ValidationFailed(f"{len(failed_critical)} critical expectation(s) failed: {lines}")
    return result


def describe_failure(row: dict) -> str:
    """One readable line for a failed expectation: which, on what, and the offending values."""
    kw = {k: v for k, v in row["kwargs"].items() if k not in ("column",)}
    col = row["kwargs"].get("column")
    what = f"{row['expectation']}({col + ', ' if col else ''}{', '.join(f'{k}={v}' for k, v in kw.items())}) on {row['batch']}"
    if row.get("unexpected_labels"):
        return f"{what}: classes {row['unexpected_labels'][:10]} (values {row['unexpected_values'][:10]})"
    if row.get("unexpected_ids"):
        return f"{what}: {row['unexpected_count']} unexpected, e.g. ids {row['unexpected_ids'][:5]} values {row['unexpected_values'][:5]}"
    if row["unexpected_values"]:
        return f"{what}: {row['unexpected_count']} unexpected, e.g. {row['unexpected_values'][:5]}"
    if row["observed_value"] is not None:
        return f"{what}: observed {row['observed_value']}"
    return f"{what}: {row['error'] or 'failed'}"

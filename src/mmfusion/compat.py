"""Every private API of BentoML and Evidently that mmfusion uses or patches, each behind one small function.

Nothing else in mmfusion imports `bentoml._internal`, `_bentoml_impl` or `evidently.legacy`.
tests/code/test_compat.py calls each function against the installed versions, so an upgrade that moves
or renames one of these names fails there, naming it, instead of silently patching nothing (written
against bentoml 1.4.39 and evidently 0.7.23, the pins in requirements). Each library is imported inside
the function that needs it: the monitor never loads BentoML, the service never loads Evidently.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import tempfile
from functools import partial
from pathlib import Path
from typing import Any


class CompatError(RuntimeError):
    """A private name mmfusion relies on is gone from the installed library: mmfusion/compat.py needs updating."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _gone(dist: str, what: str, detail: object = "") -> CompatError:
    """The error for a private name that is missing: the name, the installed version, and what to update."""
    why = f" ({detail})" if detail else ""
    return CompatError(f"{what} is gone from {dist} {_version(dist)}: update mmfusion/compat.py{why}")


def _private(dist: str, module: str, name: str = "") -> Any:
    """`module` (and its attribute path `name`), or CompatError naming it with the installed `dist` version."""
    where = f"{module}.{name}" if name else module
    try:
        obj = importlib.import_module(module)
        for part in filter(None, name.split(".")):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise _gone(dist, where, exc) from exc
    return obj


# ---- BentoML ------------------------------------------------------------------------------------


def bentoml_home() -> str:
    """The BentoML home (store) in use: `BentoMLContainer.bentoml_home` (BENTOML_HOME or ~/bentoml)."""
    return str(_private("bentoml", "bentoml._internal.configuration.containers", "BentoMLContainer.bentoml_home").get())


def worker_index() -> int | None:
    """This server worker's index (1-based; None outside a `bentoml serve` worker)."""
    return _private("bentoml", "bentoml._internal.context", "server_context").worker_index


def set_request_tempdir(directory: str | Path, prefix: str = "request-") -> None:
    """Make BentoML create each request's temporary folder (uploads) under `directory`.

    BentoML's `request_tempdir_pool` creates its folders with the `_new` callable it was built with
    (`tempfile.mkdtemp` in the system temp folder); there is no public setting for where."""
    pool = _private("bentoml", "bentoml._internal.context", "request_tempdir_pool")
    if not callable(getattr(pool, "_new", None)):
        raise _gone("bentoml", "bentoml._internal.context.request_tempdir_pool._new")
    pool._new = partial(tempfile.mkdtemp, prefix=prefix, dir=str(directory))


def multipart_serde() -> type:
    """BentoML's serde class for form bodies (multipart and url-encoded), to subclass."""
    return _private("bentoml", "_bentoml_impl.serde", "MultipartSerde")


def use_multipart_serde(serde: type) -> list[str]:
    """Serve every media type BentoML parses with `multipart_serde()` with `serde` instead (process-wide);
    returns those media types. CompatError where there is none: the patch would change nothing."""
    table = _private("bentoml", "_bentoml_impl.serde", "ALL_SERDE")
    base = multipart_serde()
    replaced = [media for media, klass in table.items() if isinstance(klass, type) and issubclass(klass, base)]
    if not replaced:
        raise _gone("bentoml", "_bentoml_impl.serde.ALL_SERDE's MultipartSerde entries")
    for media in replaced:
        table[media] = serde
    return replaced


def http_app_logger() -> logging.Logger:
    """The logger BentoML's HTTP app logs a failed request's traceback on ("Exception on ...")."""
    name = "bentoml._internal.server.http_app"
    if importlib.util.find_spec(name) is None:
        raise _gone("bentoml", name)
    return logging.getLogger(name)


# ---- Evidently ----------------------------------------------------------------------------------


def set_embeddings_plot_rows(rows: int) -> None:
    """How many rows per side EmbeddingsDrift's t-SNE picture samples (a module constant, no parameter)."""
    module = _private("evidently", "evidently.legacy.metrics.data_drift.embeddings_drift")
    if not isinstance(getattr(module, "SAMPLE_CONSTANT", None), int):
        raise _gone("evidently", "evidently.legacy.metrics.data_drift.embeddings_drift.SAMPLE_CONSTANT")
    module.SAMPLE_CONSTANT = int(rows)


def random_classifier_auc(y_test, seed: int) -> float:
    """The ROC AUC of Evidently's random classifier with `seed` on the labels `y_test` (the bootstrapped
    `model` embedding drift method compares with a quantile of these)."""
    calc = _private("evidently", "evidently.legacy.metrics.data_drift.embedding_drift_methods", "calc_roc_auc_random")
    return float(calc(y_test, seed))


def column_stattest(ref, cur, kind: str, method: str, threshold: float) -> tuple[float, bool]:
    """Evidently's stattest `method` on one column, `kind` "num" or "cat": (drift score, drifted)."""
    get_stattest = _private("evidently", "evidently.legacy.calculations.stattests", "get_stattest")
    column_type = _private("evidently", "evidently.legacy.core", "ColumnType")
    col_type = {"num": column_type.Numerical, "cat": column_type.Categorical}[kind]
    result = get_stattest(ref, cur, col_type, method)(ref, cur, col_type, threshold)
    return float(result.drift_score), bool(result.drifted)


def add_snapshot_text(snapshot, title: str, markdown: str) -> None:
    """Put a Markdown text widget first in a snapshot's widgets (the Evidently UI renders it, links included).

    Evidently 0.7's Report has no text metric; the legacy `text_widget` is the widget its UI draws as Markdown,
    and a Snapshot keeps its widgets in `_widgets` with no public way to add one."""
    text_widget = _private("evidently", "evidently.legacy.renderers.html_widgets", "text_widget")
    widgets = getattr(snapshot, "_widgets", None)
    if not isinstance(widgets, list):
        raise _gone("evidently", "evidently.core.report.Snapshot._widgets")
    widgets.insert(0, text_widget(title=title, text=markdown))

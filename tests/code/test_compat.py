"""mmfusion.compat against the installed BentoML and Evidently: an upgrade that moves or renames one of the
private names it uses fails here, with the name, and not in a served Bento or a monitoring run."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfusion import compat
from tests.conftest import REPO

PRIVATE_MODULES = ("bentoml._internal", "_bentoml_impl", "evidently.legacy")


# ---- BentoML ------------------------------------------------------------------------------------


def test_bentoml_home_is_a_folder_path():
    home = compat.bentoml_home()  # BENTOML_HOME, else ~/bentoml
    assert isinstance(home, str) and Path(home).is_absolute()


def test_worker_index_outside_a_server_is_none():
    assert compat.worker_index() is None


def test_set_request_tempdir_moves_request_folders(tmp_path):
    from bentoml._internal.context import request_tempdir_pool

    before = request_tempdir_pool._new
    try:
        compat.set_request_tempdir(tmp_path, prefix="request-")
        made = request_tempdir_pool._new()
        assert made.startswith(str(tmp_path / "request-"))
    finally:
        request_tempdir_pool._new = before


def test_multipart_serde_is_replaced_for_every_form_media_type():
    from _bentoml_impl import serde

    table = dict(serde.ALL_SERDE)
    base = compat.multipart_serde()

    class Mine(base):
        pass

    try:
        replaced = compat.use_multipart_serde(Mine)
        assert set(replaced) == {"multipart/form-data", "application/x-www-form-urlencoded"}
        assert all(serde.ALL_SERDE[m] is Mine for m in replaced)
        assert compat.use_multipart_serde(Mine) == replaced  # again: the same media types
    finally:
        serde.ALL_SERDE.clear()
        serde.ALL_SERDE.update(table)


def test_http_app_logger_is_bentomls():
    import bentoml._internal.server.http_app as http_app

    logger = compat.http_app_logger()
    assert isinstance(logger, logging.Logger) and logger.name == http_app.__name__


# ---- Evidently ----------------------------------------------------------------------------------


def test_set_embeddings_plot_rows():
    from evidently.legacy.metrics.data_drift import embeddings_drift

    before = embeddings_drift.SAMPLE_CONSTANT
    try:
        compat.set_embeddings_plot_rows(123)
        assert embeddings_drift.SAMPLE_CONSTANT == 123
    finally:
        embeddings_drift.SAMPLE_CONSTANT = before


def test_add_snapshot_text_puts_a_markdown_widget_first_that_survives_the_workspace(tmp_path):
    from evidently import Dataset, Report
    from evidently.metrics import RowCount
    from evidently.ui.workspace import Workspace

    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0]})
    snap = Report([RowCount()]).run(Dataset.from_pandas(frame), Dataset.from_pandas(frame))
    compat.add_snapshot_text(snap, title="t", markdown="[a report](/r/w.html)")
    ws = Workspace.create(str(tmp_path))
    project = ws.create_project("p")
    stored = ws.get_run(project.id, ws.add_run(project.id, snap).id)
    assert stored.widgets[0].type == "text" and stored.widgets[0].params == {"text": "[a report](/r/w.html)"}
    assert stored.widgets[0].title == "t" and len(stored.widgets) > 1


def test_random_classifier_auc_is_seeded():
    y = np.array([0, 1] * 20)
    a, b = compat.random_classifier_auc(y, 3), compat.random_classifier_auc(y, 3)
    assert a == b and 0.0 <= a <= 1.0


@pytest.mark.parametrize(
    ("kind", "method", "ref", "cur", "drifted"),
    [
        ("num", "ks", np.arange(50.0), np.arange(50.0) + 100, True),
        ("num", "wasserstein", np.arange(50.0), np.arange(50.0), False),
        ("cat", "jensenshannon", ["a", "b"] * 25, ["a", "b"] * 25, False),
        ("cat", "chisquare", ["a", "b"] * 25, ["a"] * 45 + ["b"] * 5, True),
    ],
)
def test_column_stattest(kind, method, ref, cur, drifted):
    score, got = compat.column_stattest(pd.Series(ref), pd.Series(cur), kind, method, 0.1)
    assert isinstance(score, float) and got is drifted


# ---- the module itself --------------------------------------------------------------------------


def test_a_missing_private_name_fails_with_its_name_and_version():
    with pytest.raises(compat.CompatError, match=r"bentoml\._internal\.context\.no_such_thing is gone from bentoml \d"):
        compat._private("bentoml", "bentoml._internal.context", "no_such_thing")
    with pytest.raises(compat.CompatError, match=r"evidently\.legacy\.no_such_module is gone from evidently \d"):
        compat._private("evidently", "evidently.legacy.no_such_module")


def test_only_compat_imports_private_modules():
    """Everywhere else in src/ and flows/, BentoML and Evidently are used through public names or compat."""
    bad = []
    for path in sorted([*(REPO / "src" / "mmfusion").rglob("*.py"), *(REPO / "flows").glob("*.py")]):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value]  # a logger or module named by string
            hits = [n for n in names if n.startswith(PRIVATE_MODULES)]
            if hits:
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {hits[0]}")
    assert not bad, "private BentoML/Evidently names outside mmfusion/compat.py:\n" + "\n".join(bad)


"""Drift monitoring on synthetic embeddings: checks, windows, the log reader and one whole run with Evidently."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmfusion.config import parse_params
from mmfusion.monitoring.checks import bootstrap_on, check_window
from mmfusion.monitoring.monitor import History, run_monitor
from mmfusion.monitoring.reference import MonitorError
from mmfusion.monitoring.windows import cut_windows, load_log, select_version
from tests.conftest import REPO
from tests.drift_fixtures import DIMS, monitor_params, synthetic, write_log, write_reference_dir


@pytest.fixture
def p():
    return parse_params({"monitor": {"min_rows": 30, "embeddings": {"second_method": ""}}}).monitor


def flagged(verdict: dict) -> set[str]:
    return set(verdict["flagged"])


def test_same_distribution_is_ok(p):
    verdict = check_window(synthetic(200, seed=2), synthetic(600, seed=1), p)
    assert verdict["verdict"] == "ok", verdict["flagged"]
    scores = {c["name"]: c["score"] for c in verdict["checks"]}
    assert scores["embedding_drift[image]"] < 0.55 and scores["embedding_drift[text]"] < 0.55


def test_shifted_image_embeddings_flag_image_only(p):
    verdict = check_window(synthetic(200, seed=3, shift={"image": 0.5}), synthetic(600, seed=1), p)
    assert verdict["verdict"] == "drift" and verdict["severity"] == "critical"
    assert "embedding_drift[image]" in flagged(verdict)
    assert "embedding_drift[text]" not in flagged(verdict)


def test_tiny_and_empty_windows_are_insufficient_data_never_a_pass(p):
    ref = synthetic(600, seed=1)
    for n in (0, 1, 29):
        verdict = check_window(synthetic(n, seed=4, shift={"image": 5.0}), ref, p)
        assert verdict["verdict"] == "insufficient_data" and verdict["checks"] == []


def test_missing_modality_share_and_prediction_drift_are_checked(p):
    ref = synthetic(600, seed=1)
    lost_images = check_window(synthetic(200, seed=5, missing={"image": 0.5}), ref, p)
    assert "missing_image" in flagged(lost_images) and lost_images["verdict"] == "drift"
    one_label = synthetic(200, seed=6)
    one_label.rows["prediction"] = "apple"
    assert "prediction_drift" in flagged(check_window(one_label, ref, p))


def test_a_third_modality_needs_no_change(p):
    dims = {**DIMS, "audio": 8}
    verdict = check_window(synthetic(200, seed=7, dims=dims, shift={"audio": 0.6}), synthetic(600, seed=1, dims=dims), p)
    assert "embedding_drift[audio]" in flagged(verdict)
    assert {"embedding_drift[image]", "embedding_drift[text]"}.isdisjoint(flagged(verdict))


def test_bootstrap_setting():
    assert bootstrap_on("auto", 999) and not bootstrap_on("auto", 1000)
    assert bootstrap_on("true", 5000) and not bootstrap_on("false", 10)
    with pytest.raises(ValueError, match="bootstrap"):
        bootstrap_on("sometimes", 10)


def test_cut_windows_by_count_and_time():
    data = synthetic(450, seed=1)
    by_count = cut_windows(data, "count", 200, 60, now=1e12)
    assert [len(w.data) for w in by_count] == [200, 200, 50]
    assert [w.complete for w in by_count] == [True, True, False]
    data.rows["ts"] = np.arange(450) * 30.0  # 30 s apart: 120 rows per hour
    by_time = cut_windows(data, "time", 0, 60, now=450 * 30.0)
    assert [len(w.data) for w in by_time] == [120, 120, 120, 90]
    assert [w.complete for w in by_time] == [True, True, True, False]
    with pytest.raises(MonitorError, match="count or time"):
        cut_windows(data, "weekly", 1, 1, now=0)


def test_log_reader_restores_rows_presence_and_embeddings(tmp_path):
    data = synthetic(40, seed=8, missing={"text": 0.3})
    write_log(tmp_path / "log.sqlite", data, "v1")
    back = load_log(tmp_path / "log.sqlite", ["image", "text"])
    assert len(back) == 40
    assert (back.present("text") == data.present("text")).all()
    np.testing.assert_allclose(back.embeddings["image"], data.embeddings["image"], atol=1e-6)
    assert np.isnan(back.rows.loc[~back.present("text"), "text_chars"]).all()
    with pytest.raises(MonitorError, match="no rows of the served model version v2.*v1 \\(40 rows\\)"):
        select_version(back, "v2")


def test_unreadable_logs_are_clear_errors(tmp_path):
    with pytest.raises(MonitorError, match="no inference log"):
        load_log(tmp_path / "nope.sqlite", ["image"])
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(MonitorError, match="not a readable inference log|cannot read"):
        load_log(tmp_path / "junk.sqlite", ["image"])


def test_run_monitor_writes_reports_verdicts_history_and_workspace(tmp_path):
    write_reference_dir(tmp_path / "model", synthetic(300, seed=1), "v1")
    clean, shifted = synthetic(100, seed=2), synthetic(100, seed=3, shift={"image": 0.8})
    shifted.rows["ts"] += 1_000
    write_log(tmp_path / "log.sqlite", clean, "v1", prefix="c")
    write_log(tmp_path / "log.sqlite", shifted, "v1", prefix="s")
    write_log(tmp_path / "log.sqlite", synthetic(5, seed=9), "v0-old", prefix="o")
    params = monitor_params(tmp_path)
    summary = run_monitor(params, tmp_path)
    assert [w["verdict"] for w in summary["windows"]] == ["ok", "drift"]
    assert summary["versions_seen"] == {"v1": 200, "v0-old": 5}
    for w in summary["windows"]:
        html = Path(w["report_html"]).read_text()
        assert len(html) > 100_000 and "plotly" in html.lower()  # self-contained Evidently report
        verdict = json.loads(Path(w["verdict_json"]).read_text())
        assert verdict["schema"] == "mmfusion.drift-verdict/v1" and verdict["verdict"] == w["verdict"]
        assert {c["name"] for c in verdict["checks"]} >= {"embedding_drift[image]", "embedding_drift[text]", "prediction_drift"}
    assert "embedding_drift[image]" in summary["windows"][1]["flagged"]

    from evidently.ui.workspace import Workspace

    ws = Workspace.create(str(tmp_path / "workspace"))
    (project,) = ws.search_project("mmfusion")
    assert len(ws.list_runs(project.id)) == 2
    assert json.loads((tmp_path / "monitor" / "latest.json").read_text())["counts"]["drift"] == 1

    # a second run sees nothing new; 60 new rows make an open window that is checked, not yet recorded as complete
    assert run_monitor(params, tmp_path)["windows"] == []
    more = synthetic(60, seed=10)
    more.rows["ts"] += 5_000
    write_log(tmp_path / "log.sqlite", more, "v1", prefix="m")
    (open_window,) = run_monitor(params, tmp_path)["windows"]
    assert open_window["rows"] == 60 and not open_window["complete"] and open_window["verdict"] == "ok"
    history = History(tmp_path / "monitor.sqlite")
    assert [(h["idx"], h["complete"]) for h in sorted(history.recent(), key=lambda h: h["idx"])] == [(0, 1), (1, 1), (2, 0)]
    history.close()
    assert len(ws.list_runs(project.id)) == 2  # open windows are not trend points yet


def test_monitor_never_writes_the_service_log(tmp_path):
    write_reference_dir(tmp_path / "model", synthetic(300, seed=1), "v1")
    write_log(tmp_path / "log.sqlite", synthetic(40, seed=2), "v1")
    before = (tmp_path / "log.sqlite").read_bytes()
    # the service holds a write transaction open while the monitor reads (WAL: readers are not blocked)
    writer = sqlite3.connect(str(tmp_path / "log.sqlite"))
    writer.execute("BEGIN IMMEDIATE")
    summary = run_monitor(monitor_params(tmp_path, min_rows=100), tmp_path)
    writer.rollback()
    writer.close()
    assert summary["windows"][0]["verdict"] == "insufficient_data"
    assert (tmp_path / "log.sqlite").read_bytes() == before


def test_drift_cli_on_a_missing_log_is_one_clear_line(tmp_path):
    write_reference_dir(tmp_path / "model", synthetic(50, seed=1), "v1")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"monitor": {"model_dir": str(tmp_path / "model"), "log_url": str(tmp_path / "none.sqlite")}}))
    proc = subprocess.run(
        ["make", "-s", "drift", f"ARGS=--params {params_file} --root {tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("make")]
    assert lines == [f"monitor: error: no inference log at {tmp_path / 'none.sqlite'}: serve the model (`make serve`) and send it requests first"]
    assert "Traceback" not in proc.stderr + proc.stdout

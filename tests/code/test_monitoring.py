"""Drift monitoring on synthetic embeddings: checks, windows, the log reader and one whole run with Evidently."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmfusion.config import parse_params
from mmfusion.monitoring.checks import bootstrap_on, check_window
from mmfusion.monitoring.monitor import History, run_monitor
from mmfusion.monitoring.reference import MonitorData, MonitorError
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
    clean, (shifted, shifted_rows) = synthetic(100, seed=2), partly_shifted(100, 50, seed=11)
    shifted.rows["ts"] += 1_000
    write_log(tmp_path / "log.sqlite", clean, "v1", prefix="c")
    write_log(tmp_path / "log.sqlite", shifted, "v1", prefix="<s>")  # an id and a text (its preview) to escape
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
    assert 'id="mmfusion-examples"' not in Path(summary["windows"][0]["report_html"]).read_text()  # nothing drifted
    assert_the_report_shows_what_drifted(tmp_path, summary["windows"][1], shifted_rows, "<s>")

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


def partly_shifted(n: int, shifted: int, seed: int) -> tuple[MonitorData, set[int]]:
    """A window of n rows whose image embeddings are shifted in `shifted` random rows only (which are returned)."""
    data = synthetic(n, seed=seed)
    rows = np.random.default_rng(seed).choice(n, shifted, replace=False)
    data.embeddings["image"][rows] += 3.0
    return data, {int(r) for r in rows}


def assert_the_report_shows_what_drifted(tmp_path: Path, w: dict, shifted: set[int], prefix: str) -> None:
    """The drifted window's report: its "what drifted" section (the shifted items, beside their nearest reference
    items, with their previews inline and escaped), its verdict's `examples`, and its workspace snapshot's link,
    which `make monitor-ui` serves."""
    verdict = json.loads(Path(w["verdict_json"]).read_text())
    assert verdict["flagged"] == ["embedding_drift[image]"] and set(verdict["examples"]) == {"image"}
    examples = verdict["examples"]["image"]
    chosen = [int(i["request_id"].removeprefix(prefix)) for i in examples["items"]]
    assert len(chosen) == 6 and set(chosen) <= shifted, (chosen, sorted(shifted))  # half the rows: 1 in 64 by chance
    assert all(len(i["neighbours"]) == 2 and i["neighbours"][0]["id"].startswith("ref") for i in examples["items"])
    assert examples["previews"] == 6 and 0.5 < examples["auc"] <= 1.0
    html = Path(w["report_html"]).read_text()
    section = html[html.index('<section id="mmfusion-examples"') :]
    section = section[: section.index("</section>")]
    assert html.index('id="mmfusion-notice"') < html.index('id="mmfusion-examples"') < html.index("plotly")
    assert section.count('src="data:image/webp;base64,') == 6 * 3  # each item and its two neighbours, inline
    assert f"text of {html_escape(prefix)}{chosen[0]}" in section and prefix not in section  # texts and ids escaped

    from evidently.ui.workspace import Workspace

    ws = Workspace.create(str(tmp_path / "workspace"))
    (project,) = ws.search_project("mmfusion")
    snapshots = [ws.get_run(project.id, run) for run in ws.list_runs(project.id)]  # SnapshotModels
    (snap,) = [s for s in snapshots if s.metadata["report_html"] == w["report_html"]]
    assert snap.tags == ["drift", "embedding_drift[image]"] and snap.metadata["verdict"] == "drift"
    assert snap.widgets[0].type == "text" and f"](/mmfusion/reports/v1/{Path(w['report_html']).name})" in snap.widgets[0].params["text"]

    from litestar.testing import TestClient

    from mmfusion.monitoring.ui import create_ui_app

    with TestClient(create_ui_app(tmp_path / "workspace", tmp_path / "monitor")) as client:
        page = client.get(f"/mmfusion/reports/v1/{Path(w['report_html']).name}")
        assert page.status_code == 200 and 'id="mmfusion-examples"' in page.text
        assert client.get("/api/projects").json()[0]["name"] == "mmfusion"


def test_without_previews_the_section_says_so_and_an_old_log_still_monitors(tmp_path):
    """A log written before the previews table existed (revision 0002), read without migrating it, and a reference
    without previews: the examples are still chosen and listed, and the section says why nothing is shown."""
    from mmfusion import logdb
    from mmfusion.monitoring.examples import build_examples
    from mmfusion.monitoring.reference import load_reference

    write_reference_dir(tmp_path / "model", synthetic(300, seed=1), "v1", previews=False)
    window, shifted = partly_shifted(100, 50, seed=12)
    write_log(tmp_path / "log.sqlite", window, "v1", prefix="o")
    with sqlite3.connect(tmp_path / "log.sqlite") as conn:
        conn.execute("DROP TABLE previews")
        conn.execute("UPDATE mmfusion_log_version SET version_num = '0002'")
    params = monitor_params(tmp_path).monitor
    reference, _ = load_reference(tmp_path / "model")
    data = load_log(tmp_path / "log.sqlite", ["image", "text"])
    verdict = check_window(data, reference, params)
    assert verdict["flagged"] == ["embedding_drift[image]"]
    examples, section = build_examples(data, reference, verdict, params, logdb.resolve_url(tmp_path / "log.sqlite"), tmp_path / "model")
    assert len(examples["image"]["items"]) == 6 and examples["image"]["previews"] == 0
    assert {int(i["request_id"].removeprefix("o")) for i in examples["image"]["items"]} <= shifted
    assert "No previews were kept for these items" in section and "The reference has no previews" in section
    assert "data:image" not in section and section.count("no preview kept") == 6 * 3
    assert build_examples(data, reference, verdict, parse_params({"monitor": {"examples": {"items": 0}}}).monitor,
                          logdb.resolve_url(tmp_path / "log.sqlite"), tmp_path / "model") == ({}, "")  # fmt: skip
    with logdb.reading(logdb.resolve_url(tmp_path / "log.sqlite")) as conn:
        assert logdb.current_revision(conn) == "0002" and not logdb.has_table(conn, "previews")  # read, never migrated

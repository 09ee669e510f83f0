"""A window gets a verdict whatever modalities it holds: every presence pattern of the served model's modalities.

One `run_monitor` per modality set reads a log with one count window per pattern (all present; one
modality gone; one in only 2 rows; each alone) and writes verdicts, history rows, JSON and HTML.
"""

from __future__ import annotations

import html
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from mmfusion.config import parse_params
from mmfusion.monitoring import report
from mmfusion.monitoring.checks import check_window
from mmfusion.monitoring.monitor import run_monitor, verdict_table
from mmfusion.monitoring.reference import MonitorData, MonitorError, load_reference
from mmfusion.monitoring.windows import load_log
from tests.drift_fixtures import DIMS, monitor_params, synthetic, write_log, write_reference_dir

N = 60  # rows per window
SPARSE = 2  # rows that still carry a "sparse" modality
MODALITY_SETS = {"image+text": DIMS, "image+text+audio": {**DIMS, "audio": 8}}


def presence_patterns(modalities: list[str]) -> dict[str, dict[str, int]]:
    """{pattern: {modality: rows carrying it}}: all present, each gone, each sparse, each alone (duplicates dropped)."""
    every = {m: N for m in modalities}
    found = {"all": every}
    for m in modalities:
        found[f"no-{m}"] = {**every, m: 0}
        found[f"sparse-{m}"] = {**every, m: SPARSE}
    for m in modalities:
        found[f"only-{m}"] = {o: N if o == m else 0 for o in modalities}
    unique: dict[tuple, str] = {}
    for name, carrying in found.items():
        unique.setdefault(tuple(carrying.values()), name)
    return {name: found[name] for name in unique.values()}


CASES = [(s, pattern) for s, dims in MODALITY_SETS.items() for pattern in presence_patterns(list(dims))]


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """One BLAS/OpenMP thread: on a busy shared 2-core machine tiny t-SNE pictures spin-wait otherwise (5x slower)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def unit_params():
    """Monitor params of the unit tests: windows of N rows, no second embedding method, no bootstrap."""
    fast = {"min_rows": 30, "plot_rows": 16, "embeddings": {"second_method": "", "bootstrap": "false"}}
    return parse_params({"monitor": fast}).monitor


def fast_params(tmp_path: Path, **extra):
    """Monitor params for small synthetic windows: one count window per N rows, a small t-SNE picture."""
    return monitor_params(tmp_path, window={"by": "count", "size": N}, plot_rows=16,
                          embeddings={"second_method": "", "bootstrap": "false"}, **extra)  # fmt: skip


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """{modality set: one monitor run over a log with one window per presence pattern}, run on first use."""
    runs: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name in runs:
            return runs[name]
        tmp = tmp_path_factory.mktemp(name.replace("+", "-"))
        write_reference_dir(tmp / "model", synthetic(300, seed=1, dims=MODALITY_SETS[name]), "v1")
        reference, _ = load_reference(tmp / "model")
        patterns = presence_patterns(reference.modalities)  # the served model's modalities, not a fixed list
        for k, (pattern, carrying) in enumerate(patterns.items()):
            window = synthetic(N, seed=10 + k, dims=MODALITY_SETS[name], carrying=carrying)
            window.rows["ts"] += 10_000.0 * k
            write_log(tmp / "log.sqlite", window, "v1", prefix=f"{pattern}-")
        summary = run_monitor(fast_params(tmp), tmp)
        assert len(summary["windows"]) == len(patterns)
        runs[name] = {"tmp": tmp, "summary": summary, "patterns": patterns,
                      "windows": dict(zip(patterns, summary["windows"]))}  # fmt: skip
        return runs[name]

    return run


@pytest.mark.parametrize("modalities, pattern", CASES, ids=[f"{s}:{p}" for s, p in CASES])
def test_every_presence_pattern_gets_a_verdict_history_json_and_report(monitored, modalities, pattern):
    run = monitored(modalities)
    window, carrying = run["windows"][pattern], run["patterns"][pattern]
    gone = [m for m, k in carrying.items() if k == 0]
    sparse = [m for m, k in carrying.items() if 0 < k < N]
    lacking = gone + sparse

    assert window["verdict"] == ("drift" if lacking else "ok"), window["flagged"]
    assert window["complete"] and window["rows"] == N
    assert {f"missing_{m}" for m in lacking} <= set(window["flagged"])
    assert not {f"embedding_drift[{m}]" for m in lacking} & set(window["flagged"])

    verdict = json.loads(Path(window["verdict_json"]).read_text())
    assert verdict["verdict"] == window["verdict"] and verdict["notes"] == window["notes"]
    checks = {c["name"]: c for c in verdict["checks"]}
    for m in carrying:
        computed = checks[f"embedding_drift[{m}]"]["status"] != "insufficient_data"
        assert computed == (m not in lacking), checks[f"embedding_drift[{m}]"]
    assert {i["name"] for i in verdict["left_out"]} >= {f"embedding_drift[{m}]" for m in lacking}
    assert {i["name"] for i in verdict["report_left_out"]} >= {f"EmbeddingsDrift({m})" for m in lacking}
    assert all(i["reason"] for i in verdict["left_out"] + verdict["report_left_out"])
    for m in gone:
        assert any(n.startswith(f"No {m} arrived in this window") for n in verdict["notes"]), verdict["notes"]
    for m in sparse:
        expected = f"Only {SPARSE} of {N} requests carried {m}"
        assert any(n.startswith(expected) for n in verdict["notes"]), verdict["notes"]
    if not lacking:
        assert verdict["notes"] == [] and verdict["left_out"] == []

    page = Path(window["report_html"]).read_text()
    assert len(page) > 100_000 and page.count('id="mmfusion-notice"') == 1
    assert page.index('id="mmfusion-notice"') < page.index('<div id="root_')  # right after <body>, before Evidently's
    for line in verdict["notes"] + [i["reason"] for i in verdict["report_left_out"]]:
        assert html.escape(line) in page

    table = verdict_table(run["summary"])
    for note in verdict["notes"]:
        assert f"- {window['id']}: {note}" in table

    with sqlite3.connect(run["tmp"] / "monitor.sqlite") as conn:
        row = conn.execute("SELECT verdict, flagged, verdict_json, report_html, rows FROM verdicts WHERE window_id = ?",
                           (window["id"],)).fetchone()  # fmt: skip
    assert row == (window["verdict"], json.dumps(window["flagged"]), window["verdict_json"], window["report_html"], N)


def test_a_fresh_log_that_never_saw_a_modality_has_the_reference_shape(tmp_path):
    reference = synthetic(300, seed=1)
    write_log(tmp_path / "log.sqlite", synthetic(N, seed=2, carrying={"text": 0}), "v1")
    dims = {m: a.shape[1] for m, a in reference.embeddings.items()}
    data = load_log(tmp_path / "log.sqlite", reference.modalities, dims=dims)
    assert {m: a.shape for m, a in data.embeddings.items()} == {"image": (N, DIMS["image"]), "text": (N, DIMS["text"])}
    assert not data.present("text").any() and not data.embeddings["text"].any()
    assert data.rows["text_chars"].isna().all()

    verdict = check_window(data, reference, unit_params())
    assert verdict["verdict"] == "drift" and verdict["flagged"] == ["missing_text"]
    assert {i["name"] for i in verdict["left_out"]} == {"embedding_drift[text]", "input_text_chars"}

    # a log of another model (other widths) is one clear error, not a broadcast traceback
    write_log(tmp_path / "other.sqlite", synthetic(3, seed=3), "v1")
    with pytest.raises(MonitorError, match="text embeddings have 12 dimensions, the served model's 16"):
        load_log(tmp_path / "other.sqlite", ["image", "text"], dims={"image": 24, "text": 16})
    write_log(tmp_path / "other.sqlite", synthetic(3, seed=4, dims={"image": 24, "text": 16}), "v2", prefix="w")
    with pytest.raises(MonitorError, match="holds text embeddings of different widths"):
        load_log(tmp_path / "other.sqlite", ["image", "text"], dims={"image": 24, "text": 16})


def stats_window(seed: int, **columns) -> MonitorData:
    """A full window whose input statistics columns are replaced by `columns` (scalars or arrays)."""
    data = synthetic(N, seed=seed)
    for col, value in columns.items():
        data.rows[col] = value
    return data


def test_constant_and_all_null_input_columns_give_a_verdict_and_a_report(tmp_path):
    reference = synthetic(300, seed=1)
    reference.rows["image_height"] = np.nan  # a statistic the reference never had
    p = unit_params()

    # text_chars all null (text still arrives), image_width constant on both sides, image_height null in the reference
    window = stats_window(2, text_chars=np.nan)
    verdict = check_window(window, reference, p)
    checks = {c["name"]: c for c in verdict["checks"]}
    assert verdict["verdict"] == "ok", verdict["flagged"]
    assert checks["input_image_width"]["method"] == "constant" and checks["input_image_width"]["status"] == "ok"
    assert checks["input_text_chars"]["status"] == "insufficient_data"
    assert "0 values in this window" in checks["input_text_chars"]["reason"]
    assert "0 in the reference" in checks["input_image_height"]["reason"]
    assert any(n.startswith("Left out of the verdict: ") and "input_text_chars" in n for n in verdict["notes"])

    snapshot, left = report.build_snapshot(window, reference, p, name="stats", timestamp=1_000.0)
    reasons = {i["name"]: i["reason"] for i in left}
    assert snapshot is not None
    assert reasons["ValueDrift(text_chars)"].startswith("0 values in this window")
    assert reasons["MeanValue(text_chars)"] == "no values in this window"
    assert reasons["ValueDrift(image_width)"].startswith("constant on both sides (72 in the reference, 72 here)")
    assert "ValueDrift(image_height)" in reasons
    assert not any(k.startswith("EmbeddingsDrift") for k in reasons)
    names = [m["metric_name"] for m in snapshot.dict()["metrics"]]
    assert "MeanValue(column=image_width)" in names
    assert not any(n.startswith("ValueDrift(column=text_chars") for n in names)

    # a constant that changed (the service now resizes to 64 px) is flagged, not skipped
    changed = check_window(stats_window(3, image_width=64.0), reference, p)
    assert "input_image_width" in changed["flagged"] and changed["verdict"] == "warning"


def test_a_report_evidently_cannot_build_falls_back_to_counts_and_means(monkeypatch):
    reference = synthetic(300, seed=1)
    window = synthetic(N, seed=2, carrying={"text": 0})
    monkeypatch.setattr(report, "_column_gap", lambda *a, **k: "")  # ValueDrift(text_chars) gets in: Evidently raises
    snapshot, left = report.build_snapshot(window, reference, unit_params(), name="fallback", timestamp=1_000.0)
    assert snapshot is not None
    failed = [i for i in left if i["reason"].startswith("Evidently failed")]
    assert len(failed) == 1 and "ValueDrift(text_chars)" in failed[0]["name"] and failed[0]["failed"]
    assert "empty column 'text_chars'" in failed[0]["reason"]
    names = [m["metric_name"] for m in snapshot.dict()["metrics"]]
    assert "RowCount()" in names and not any(n.startswith(("ValueDrift", "EmbeddingsDrift")) for n in names)


def test_the_notice_goes_right_after_body_and_is_escaped(tmp_path):
    page = tmp_path / "r.html"
    page.write_text('<html><head></head><body class="x"><div id="root_1"></div></body></html>')
    report.add_notice(page, "verdict: drift", ["No <text> arrived", "second"])
    text = page.read_text()
    assert text.startswith('<html><head></head><body class="x"><section id="mmfusion-notice"')
    assert "<li>No &lt;text&gt; arrived</li><li>second</li>" in text
    assert text.endswith('<div id="root_1"></div></body></html>')
    before = page.read_text()
    report.add_notice(page, "nothing", [])
    assert page.read_text() == before
    bare = tmp_path / "bare.html"
    bare.write_text("<p>no body tag</p>")
    report.add_notice(bare, "t", ["a"])
    assert bare.read_text().startswith('<section id="mmfusion-notice"')
    assert bare.read_text().endswith("<p>no body tag</p>")


def test_presence_patterns_cover_each_modality_of_the_set():
    two = presence_patterns(["image", "text"])
    assert list(two) == ["all", "no-image", "sparse-image", "no-text", "sparse-text"]  # only-image is no-text
    three = presence_patterns(["image", "text", "audio"])
    assert len(three) == 1 + 3 * 3 and three["only-audio"] == {"image": 0, "text": 0, "audio": N}
    assert len(CASES) == len(two) + len(three)

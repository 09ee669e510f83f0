"""The `monitor` flow under Prefect's test harness: a real flow run, its task and its verdict artifact."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys

import yaml

from flows.monitor import main, monitor
from mmfusion.config import params_to_dict
from tests.conftest import REPO
from tests.drift_fixtures import monitor_params, synthetic, write_log, write_reference_dir


def test_monitor_flow_records_a_run_and_a_verdict_artifact(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    write_reference_dir(tmp_path / "model", synthetic(300, seed=1), "v1")
    shifted = synthetic(100, seed=3, shift={"image": 0.8})
    write_log(tmp_path / "log.sqlite", shifted, "v1")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_to_dict(monitor_params(tmp_path))))

    summary = monitor(params_path=str(params_file), root=str(tmp_path))
    assert [w["verdict"] for w in summary["windows"]] == ["drift"]

    async def recorded():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            artifacts = await client.read_artifacts()
            return runs, artifacts

    runs, artifacts = asyncio.run(recorded())
    assert any(r.name and r.state_name == "Completed" for r in runs)
    (artifact,) = [a for a in artifacts if a.key == "monitor-verdicts"]
    assert "**drift**" in artifact.data and "embedding_drift[image]" in artifact.data

    # the CLI: nothing new since the last run, exit 0; --fail-on-drift after a rescan exits 3
    assert main(["--params", str(params_file), "--root", str(tmp_path)]) == 0
    assert main(["--params", str(params_file), "--root", str(tmp_path), "--rescan", "--fail-on-drift"]) == 3


def test_make_drift_on_a_fresh_log_without_text_prints_a_verdict_not_a_traceback(prefect_harness, tmp_path):
    """`make drift`'s command in a subprocess: the log's only window never carried text (image-only clients)."""
    from mmfusion.compute import prefect_api_url

    write_reference_dir(tmp_path / "model", synthetic(300, seed=1), "v1")
    write_log(tmp_path / "log.sqlite", synthetic(60, seed=2, carrying={"text": 0}), "v1")
    params = monitor_params(tmp_path, window={"by": "count", "size": 60}, plot_rows=16,
                            embeddings={"second_method": "", "bootstrap": "false"})  # fmt: skip
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_to_dict(params)))
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url(), "PREFECT_HOME": str(tmp_path / ".prefect"),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "flows.monitor", "--params", str(params_file), "--root", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "| **drift** | missing_text |" in proc.stdout
    assert "No text arrived in this window: none of its 60 requests carried text" in proc.stdout

    with sqlite3.connect(tmp_path / "monitor.sqlite") as conn:
        verdict, flagged, verdict_json, report_html = conn.execute(
            "SELECT verdict, flagged, verdict_json, report_html FROM verdicts").fetchone()  # fmt: skip
    assert (verdict, json.loads(flagged)) == ("drift", ["missing_text"])
    notes = json.loads(open(verdict_json).read())["notes"]
    assert notes[0].startswith("No text arrived") and 'id="mmfusion-notice"' in open(report_html).read()

    async def verdict_artifacts():
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            return [a.data for a in await client.read_artifacts() if a.key == "monitor-verdicts"]

    assert any(notes[0] in data and "| **drift** | missing_text |" in data for data in asyncio.run(verdict_artifacts()))

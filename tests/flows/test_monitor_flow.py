"""The `monitor` flow under Prefect's test harness: a real flow run, its task and its verdict artifact."""

from __future__ import annotations

import asyncio

import yaml

from flows.monitor import main, monitor
from mmfusion.config import params_to_dict
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

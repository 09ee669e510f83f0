"""Stage flows under Prefect's test harness: real flow and task runs, recorded by a real API."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from flows.stages import build_stage_flow, main
from tests.conftest import tiny_params


@pytest.fixture
def project(tiny_manifest, tmp_path):
    params = tiny_params(tiny_manifest)
    from mmfusion.config import params_to_dict

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_to_dict(params)))
    return tmp_path


def _run(name, project, **kw):
    return build_stage_flow(name)(params_path=str(project / "params.yaml"), root=str(project), **kw)


def test_data_stages_as_flows(prefect_harness, project):
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client

    started = datetime.now(timezone.utc)  # the harness is the session's: other tests' runs (some fail on purpose) are there too
    summaries = {name: _run(name, project) for name in ("ingest", "clean", "validate", "split", "augment")}
    assert summaries["ingest"]["samples"] == 35
    assert summaries["clean"]["kept"] == 31  # 30 + the blank-text row, kept as image-only (clean.allow_missing_modality)
    assert summaries["validate"]["success"] is True
    assert sum(summaries["split"]["sizes"].values()) == 31
    assert summaries["augment"]["views"] == summaries["split"]["sizes"]["train"]

    async def recorded():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            artifacts = await client.read_artifacts()
            return runs, artifacts

    runs, artifacts = asyncio.run(recorded())
    runs = [r for r in runs if r.created >= started]
    assert len(runs) == 5 and {r.state_type.value for r in runs} == {"COMPLETED"}
    assert {"clean-summary", "validate-summary"} <= {a.key for a in artifacts}


def test_failing_stage_fails_the_flow_run_and_cli_exits_nonzero(prefect_harness, project, capsys):
    _run("ingest", project)
    _run("clean", project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"]["min_per_class"] = 99
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    code = main(["validate", "--params", str(project / "params.yaml"), "--root", str(project)])
    assert code == 1
    assert "critical expectation(s) failed" in capsys.readouterr().err


def test_unknown_stage():
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        build_stage_flow("trian")


def test_bad_params_is_one_line_error(prefect_harness, tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("ingest:\n  sorce: emoji\n")
    assert main(["ingest", "--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ingest: error: unknown params key ingest.sorce" in err


def test_a_bug_in_a_stage_keeps_its_traceback(prefect_harness, project, capsys, monkeypatch):
    import mmfusion.stages.ingest as ingest

    def broken(params, root):
        raise ValueError("an internal bug, not a user error")

    monkeypatch.setattr(ingest, "run", broken)
    assert main(["ingest", "--params", str(project / "params.yaml"), "--root", str(project)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == "ingest: failed: ValueError: an internal bug, not a user error"


def test_pipeline_checks_overrides_as_dvc_will_parse_them():
    from flows.pipeline import build_command, check_overrides
    from mmfusion.config import ParamsError
    from tests.conftest import REPO

    check_overrides(["train.lr=1e-3", "train.strategies=[concat,late]"], REPO / "params.yaml")  # 1e-3: a number
    with pytest.raises(ParamsError, match="train.threads was renamed to train.cpu_threads"):
        check_overrides(["train.threads=2"], REPO / "params.yaml")
    with pytest.raises(ParamsError, match="train.lr: expected a number"):
        check_overrides(["train.lr=fast"], REPO / "params.yaml")
    assert build_command(["augment.views=3"], ["validate"], False)[1:] == ["exp", "run", "-S", "augment.views=3", "validate"]


def test_featurize_with_dataloader_workers_runs_as_a_flow(prefect_harness, tiny_manifest, tmp_path):
    """featurize.num_workers > 0 (auto's choice on CUDA) inside a stage's flow run: its forked DataLoader workers
    inherit Prefect's exit hooks, which made every one exit with code 1 and the stage fail (mmfusion.forks)."""
    from mmfusion.config import params_to_dict
    from safetensors.numpy import load_file

    features = {}
    for workers in (2, 0):  # the same data, each with a cache of its own: both encode every row
        params = tiny_params(tiny_manifest, featurize={"num_workers": workers, "runtime": "torch",
                                                      "cache_dir": str(tmp_path / f"cache{workers}")})  # fmt: skip
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_to_dict(params)))
        for name in ("ingest", "clean", "validate", "split", "augment") if workers else ():
            _run(name, tmp_path)
        _run("featurize", tmp_path)
        features[workers] = load_file(tmp_path / "features" / "train.safetensors")
    assert features[2].keys() == features[0].keys() and features[2]["image"].shape[0] > 0
    for key, value in features[0].items():
        assert (features[2][key] == value).all(), key  # the same vectors as decoding in-process


def _fork_after_a_flow_run(drop_hooks: bool) -> int:
    import multiprocessing

    from prefect import flow

    from mmfusion.forks import drop_inherited_prefect_exit_hooks

    @flow(log_prints=True)
    def speaks():
        print("the log and event workers are running now")

    speaks()

    def child():
        if drop_hooks:
            drop_inherited_prefect_exit_hooks()

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    return proc.exitcode


def test_a_child_forked_after_a_flow_run_exits_cleanly_without_prefects_exit_hooks(prefect_harness):
    assert _fork_after_a_flow_run(drop_hooks=True) == 0
    # the Prefect behaviour the shim is for: when this fails, Prefect fixed it and the shim can go
    assert _fork_after_a_flow_run(drop_hooks=False) == 1


def test_stage_flow_runs_send_no_heartbeats_unless_asked(monkeypatch):
    from prefect.settings import get_current_settings

    from flows.stages import stage_heartbeats

    for key in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"):
        monkeypatch.delenv(key, raising=False)
    with stage_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == 180  # Prefect's default, outside a stage
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    with stage_heartbeats():  # asked for: the stage keeps Prefect's setting
        assert get_current_settings().flows.heartbeat_frequency is not None

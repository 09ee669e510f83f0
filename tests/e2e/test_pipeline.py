"""End to end: the real DVC pipeline in a temp copy of the repo on a tiny manifest source,
triggered through the Prefect API on a real server (as the UI's Run button does).

The tests share one project but not an order: each brings the data stages up to date first
(`reproduced`, a no-op when they are) and puts back any param it breaks on purpose."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from mmfusion.procs import stop_process_group
from mmfusion.project import copy_project as _copy_project
from mmfusion.project import project_env as _project_env
from tests.conftest import REPO, write_tiny_dataset

pytestmark = pytest.mark.slow
DVC = str(Path(sys.executable).with_name("dvc"))
DATA_STAGES = ["ingest", "clean", "validate", "split", "augment"]


def copy_project(dest: Path) -> Path:
    """The repo's code (no pipeline outputs) as a fresh git + DVC project: every stage will run."""
    return _copy_project(REPO, dest)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    proj = copy_project(root / "proj")
    manifest = write_tiny_dataset(root / "userdata")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["ingest"].update({"source": "manifest", "min_class_count": 1})
    params["ingest"]["manifest"].update({"path": str(manifest), "group_column": "group"})
    params["validate"]["min_per_class"] = 3
    params["split"].update({"val_fraction": 0.2, "test_fraction": 0.2})
    params["augment"]["views"] = 1
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


def set_param(project: Path, section: str, key: str, value):
    """Set one param in the project's params.yaml; returns the value it had."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    before = params[section][key]
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return before


def project_env(project: Path, server: str) -> dict:
    """The environment of a process in the project: its own copy of the code, reporting to `server`."""
    return _project_env(project, PREFECT_API_URL=server)


def dvc(project: Path, server: str, *args: str) -> subprocess.CompletedProcess:
    """A dvc command in the project, its stage flows reporting to `server`."""
    return subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True, env=project_env(project, server))


@pytest.fixture
def reproduced(project, server) -> Path:
    """The project with its data stages up to date (whatever ran before)."""
    out = dvc(project, server, "repro", "augment")
    assert out.returncode == 0, out.stdout + out.stderr
    return project


def _wait_for_deployment(api_url: str, name: str, timeout: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{api_url}/deployments/name/{name}", timeout=5)
        if r.status_code == 200:
            return
        time.sleep(1)
    raise TimeoutError(f"deployment {name} did not appear")


def test_pipeline_deployment_runs_dvc_repro_and_records_stage_flows(project, server):
    import httpx

    serve = subprocess.Popen([sys.executable, "-m", "flows.ui", "--no-server"], cwd=project,
                             env=project_env(project, server), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        _wait_for_deployment(server, "pipeline/pipeline")
        dep = httpx.get(f"{server}/deployments/name/pipeline/pipeline", timeout=5).json()
        # What the UI's Run button does: create a flow run from the deployment. Forced when another
        # test has run the stages already, so that every stage runs (and is recorded) here.
        force = (project / "dvc.lock").exists()
        for attempt in range(5):  # a busy server's SQLite answers 503 (retry later), as Prefect's own client retries
            created = httpx.post(f"{server}/deployments/{dep['id']}/create_flow_run",
                                 json={"parameters": {"targets": ["augment"], "force": force}}, timeout=30)
            if created.status_code != 503:
                break
            time.sleep(2 * (attempt + 1))
        assert created.status_code in (200, 201), (created.status_code, created.text)
        run = created.json()
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            state = httpx.get(f"{server}/flow_runs/{run['id']}", timeout=5).json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(2)
    finally:
        stop_process_group(serve)
        output = serve.communicate(timeout=30)[0].decode(errors="replace")
    assert state["type"] == "COMPLETED", f"{state.get('message')}\n{output[-3000:]}"

    flows = {f["id"]: f["name"] for f in httpx.post(f"{server}/flows/filter", json={}, timeout=5).json()}
    # newest first: the e2e tests' server (tests/e2e/conftest.py) holds every other e2e test's stage runs too (over
    # 50 of them, unsorted, had left this run out of the first page)
    runs = httpx.post(f"{server}/flow_runs/filter", json={"limit": 200, "sort": "START_TIME_DESC"}, timeout=5).json()
    # only the runs this deployment run started: the other modules' stage runs must not count as its stages
    since = datetime.fromisoformat(run["created"])
    completed = {flows[r["flow_id"]] for r in runs if r["state_type"] == "COMPLETED" and r["start_time"]
                 and datetime.fromisoformat(r["start_time"]) >= since}  # fmt: skip
    assert run["id"] in {r["id"] for r in runs if r["state_type"] == "COMPLETED"}
    assert set(DATA_STAGES) | {"pipeline"} <= completed

    import json

    clean = json.loads((project / "reports" / "clean.json").read_text())
    # the empty-text row is an image-only sample (clean.allow_missing_modality, default on)
    assert clean["dropped_by_reason"] == {"duplicate": 1, "image_too_small": 1, "missing_image": 1, "undecodable_image": 1}
    assert clean["kept_by_presence"]["image_only"] == 1
    assert (project / "reports" / "validation" / "data_docs" / "index.html").exists()
    for split in ("train", "val", "test"):
        assert (project / "data" / "split" / f"{split}.csv").exists()
    assert (project / "data" / "augmented" / "manifest.csv").exists()
    assert (project / "dvc.lock").exists()


def test_second_repro_skips_every_stage(reproduced, server):
    project = reproduced
    start = time.monotonic()
    out = dvc(project, server, "repro", "augment")
    assert out.returncode == 0, out.stderr
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out.stdout
    assert time.monotonic() - start < 30


def test_param_change_reruns_only_downstream(reproduced, server):
    project = reproduced
    views = yaml.safe_load((project / "params.yaml").read_text())["augment"]["views"] % 3 + 1  # a new value
    set_param(project, "augment", "views", views)
    out = dvc(project, server, "repro", "augment")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Running stage 'augment'" in out.stdout
    assert "Running stage 'clean'" not in out.stdout
    import pandas as pd

    aug = pd.read_csv(project / "data" / "augmented" / "manifest.csv")
    train = pd.read_csv(project / "data" / "split" / "train.csv")
    assert len(aug) == views * len(train)


def test_dvc_exp_run_with_a_param_override(reproduced, server):
    project = reproduced
    chars = 39 if yaml.safe_load((project / "params.yaml").read_text())["clean"]["min_text_chars"] != 39 else 40
    out = dvc(project, server, "exp", "run", "-S", f"clean.min_text_chars={chars}", "augment")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Running stage 'clean'" in out.stdout
    assert yaml.safe_load((project / "params.yaml").read_text())["clean"]["min_text_chars"] == chars
    import json

    report = json.loads((project / "reports" / "clean.json").read_text())
    assert report["dropped_by_reason"].get("text_too_short", 0) > 0
    shown = dvc(project, server, "exp", "show", "--json")
    assert shown.returncode == 0 and "min_text_chars" in shown.stdout


def test_failed_validation_stops_the_pipeline(reproduced, server):
    project = reproduced
    before = set_param(project, "validate", "min_per_class", 500)
    try:
        out = dvc(project, server, "repro", "split")
    finally:
        set_param(project, "validate", "min_per_class", before)  # the next test gets a valid project
    assert out.returncode != 0
    assert "critical expectation(s) failed" in out.stderr + out.stdout
    assert "Running stage 'split'" not in out.stdout

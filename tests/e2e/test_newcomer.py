"""A new user's first hour, as the README tells it, in a fresh clone: `make run`, `make serve`, `/classify`,
`/feedback`, `make drift`, `make live`, each through the project's own Makefile, in that order.

The clone is made as a user gets one: a published project (the pipeline run once, its `dvc.lock` and
`reports/` committed, as main holds them) cloned with git, so it has only what git tracks: no DVC cache,
no BentoML store, no Prefect database. Training is deterministic on one machine, so the clone's
`models/best` hashes as the lock says: a product of the package stage that DVC cannot see (the Bento in
the store) would make DVC skip package and leave nothing to serve. That is what this test catches.

The Makefile's install step is skipped (`make -o .venv/.installed`, with `.venv` linked to this
environment): installing the lock is the one thing this test does not repeat.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from mmfusion.procs import free_port, start_until_ready, stop_process_group
from mmfusion.project import copy_project, project_env
from tests.conftest import CLASSES, REPO, draw_sample, write_tiny_dataset
from tests.e2e.explanations import TINY_EXPLAIN, check_explanations

pytestmark = pytest.mark.slow
VENV = Path(sys.executable).parent.parent

# The tiny data at the cost of a test: torch encoders (no int8 calibration), two strategies, holdout selection.
TINY = {
    "ingest": {"source": "manifest", "min_class_count": 1},
    "validate": {"min_per_class": 3},
    "split": {"val_fraction": 0.2, "test_fraction": 0.2},
    "augment": {"views": 0},
    "featurize": {"runtime": "torch"},
    "train": {"strategies": ["text_only", "concat"], "epochs": 12, "patience": 12, "hidden_dim": 32, "batch_size": 16},
    "evaluate": {"selection": "holdout", "bootstrap": 50, "raw_check": 4, **TINY_EXPLAIN},
    "package": {"workers": 1},
}  # fmt: skip


def make(proj: Path, *args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """`make ARGS` in `proj`, as a user types it (the install step taken as done), `env` added to a user's shell."""
    return subprocess.run(["make", "-o", ".venv/.installed", *args], cwd=proj, env={**user_env(proj), **env},
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def user_env(proj: Path) -> dict[str, str]:
    """A user's shell: nothing of this test session's Prefect, BentoML or mmfusion settings."""
    env = project_env(proj)
    for key in list(env):  # nor the `make test` this may run under (its MAKEFLAGS make every sub-make chatty)
        if key.startswith(("PREFECT_API_URL", "PREFECT_HOME", "BENTOML_HOME", "MMFUSION_", "MAKE", "MFLAGS")):
            env.pop(key)
    return env


def ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory, server) -> Path:
    """A git clone of a project whose pipeline ran once and whose dvc.lock and reports/ were committed."""
    root = tmp_path_factory.mktemp("newcomer")
    manifest = write_tiny_dataset(root / "userdata", per_class=10, extras=False)
    published = copy_project(REPO, root / "published")
    params = yaml.safe_load((published / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["ingest"]["manifest"].update({"path": str(manifest), "group_column": "group"})
    (published / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (published / ".venv").symlink_to(VENV)
    # the publisher's run reports to the e2e Prefect server (`make run` reuses one that answers): a server start
    # less; the clone's `make run` below starts its own, as a user's does
    ok(make(published, "run", PREFECT_API_URL=server))
    git(published, "add", "-A")
    git(published, "commit", "-qm", "published: dvc.lock and reports")
    assert "reports/package.json" in git(published, "ls-files", "reports")
    assert "reports/evaluate/explanations/index.html" in git(published, "ls-files", "reports")  # a git-tracked DVC out
    dest = root / "clone"
    git(root, "clone", "-q", str(published), str(dest))
    assert not (dest / ".venv").exists()  # not tracked, even as a link
    (dest / ".venv").symlink_to(VENV)
    return dest


def _png(label: str, seed: int) -> bytes:
    buf = io.BytesIO()
    draw_sample(CLASSES[label][0], seed=seed, size=48).save(buf, format="PNG")
    return buf.getvalue()


def test_the_readme_path_in_a_fresh_clone(clone):
    # Before `make run`: the committed reports name a Bento this machine does not have: one line naming the fix.
    early = make(clone, "serve", f"PORT={free_port()}", timeout=120)
    assert early.returncode != 0
    errors = [line for line in early.stderr.splitlines() if line and not line.startswith("make")]
    assert len(errors) == 1 and errors[0].startswith("serve: error: ") and "make run" in errors[0], early.stderr
    assert "Traceback" not in early.stderr and "not found in BentoML store" not in early.stderr

    ok(make(clone, "run"))
    check_explanations(clone)  # as published: the page's PNGs are in git beside it
    live = ok(make(clone, "live", timeout=120))
    assert live.startswith("live:") and "NOT in" not in live and "not in the BentoML store" not in live, live

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_until_ready(["make", "-o", ".venv/.installed", "serve", f"PORT={port}"], f"{url}/readyz",
                               clone / "serve.log", 240, cwd=clone, env=user_env(clone))  # fmt: skip
    try:
        ids = []
        for i, label in enumerate(sorted(CLASSES)):
            r = httpx.post(f"{url}/classify", files={"image": ("x.png", _png(label, 700 + i), "image/png")},
                           data={"text": f"{CLASSES[label][1][i]} in a user's request"}, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            assert set(r.json()["probabilities"]) == set(CLASSES)
            ids.append((r.json()["request_id"], label))
        r = httpx.post(f"{url}/feedback", json={"request_id": ids[0][0], "label": ids[0][1]}, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "stored", r.text
        r = httpx.post(f"{url}/feedback", json={"request_id": "no-such-request", "label": ids[0][1]}, timeout=30)
        assert r.status_code == 404 and r.json()["reason"] == "unknown_request", r.text
        assert "no-such-request" in r.json()["error"], r.text
    finally:
        stop_process_group(server)

    drift = ok(make(clone, "drift", timeout=300))
    assert "Drift monitoring: model" in drift and "insufficient_data" in drift, drift  # 3 rows: no verdict yet
    assert "NOT in" not in ok(make(clone, "live", timeout=120))

"""The `pipeline` flow: the whole DVC pipeline as one Prefect flow run, for the UI's Run button.

It runs `dvc repro` (or `dvc exp run -S key=value ...` when overrides are given), so
DVC still decides which stages are stale; each stage then appears as its own flow run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger

from mmfusion.config import apply_overrides, parse_params

DVC = str(Path(sys.executable).with_name("dvc"))


def check_overrides(overrides: list[str], params_path: Path) -> None:
    """Fail before running anything when an override names an unknown key or has a wrong type
    (parsed as `dvc exp run -S` will parse it, then checked against the params schema)."""
    parse_params(apply_overrides(yaml.safe_load(params_path.read_text()) or {}, overrides))


def build_command(overrides: list[str], targets: list[str], force: bool) -> list[str]:
    """`dvc repro [targets]`, or `dvc exp run -S k=v ... [targets]` when there are overrides."""
    cmd = [DVC, "exp", "run"] if overrides else [DVC, "repro"]
    for item in overrides:
        cmd += ["-S", item]
    if force:
        cmd.append("--force")
    return cmd + list(targets)


@flow(name="pipeline", log_prints=True, persist_result=False)
def pipeline(overrides: list[str] | None = None, targets: list[str] | None = None, force: bool = False,
             project_dir: str = ".") -> dict:
    """Run the DVC pipeline (`dvc repro`), with optional `section.key=value` param overrides (`dvc exp run -S`)."""
    log = get_run_logger()
    overrides, targets = list(overrides or []), list(targets or [])
    project = Path(project_dir).resolve()
    check_overrides(overrides, project / "params.yaml")
    cmd = build_command(overrides, targets, force)
    log.info("running in %s: dvc %s", project, " ".join(cmd[1:]))
    # dvc.yaml says `python`: make it this environment's python, whatever PATH the server was started with.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    proc = subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PATH": path})
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            log.info(line)
            tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        raise RuntimeError(f"dvc exited with code {proc.returncode}: " + " | ".join(tail[-5:]))
    metrics = subprocess.run([DVC, "metrics", "show", "--json"], cwd=project, capture_output=True, text=True)
    return {"command": cmd[1:], "metrics": json.loads(metrics.stdout or "{}") if metrics.returncode == 0 else {}}

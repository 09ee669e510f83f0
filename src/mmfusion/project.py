"""A copy of this project as a fresh git + DVC repo: what the end-to-end tests and the benches run in.

    proj = copy_project(REPO, tmp / "proj")                       # code only: every stage will run
    proj = copy_project(REPO, tmp / "proj", include_outputs=True)  # + data, features, models, dvc.lock
    env = project_env(proj, BENTOML_HOME=tmp / "bentoml")

The copy holds the repo's tracked and untracked-not-ignored files (what a clone plus the user's
new files would hold); `include_outputs` adds the pipeline's outputs so `dvc repro` there starts
from what this checkout already computed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

OUTPUTS = ("data", "features", "models", "reports", "dvc.lock")  # what `dvc repro` writes
_IDENTITY = {"GIT_AUTHOR_NAME": "mmfusion", "GIT_AUTHOR_EMAIL": "mmfusion@localhost",
             "GIT_COMMITTER_NAME": "mmfusion", "GIT_COMMITTER_EMAIL": "mmfusion@localhost"}  # fmt: skip


def project_files(repo: Path) -> list[str]:
    """Tracked and untracked-not-ignored files of `repo`, relative to it."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True, check=True)
    return [rel for rel in out.stdout.decode().split("\0") if rel and (repo / rel).is_file()]


def _is_output(rel: str) -> bool:
    return rel in OUTPUTS or rel.startswith(tuple(f"{o}/" for o in OUTPUTS))


def copy_project(repo: Path, dest: Path, include_outputs: bool = False) -> Path:
    """`repo`'s files (without the pipeline outputs unless `include_outputs`) as a fresh git repo at `dest`."""
    repo, dest = Path(repo), Path(dest)
    for rel in project_files(repo):
        if not _is_output(rel):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, dest / rel)
    if include_outputs:
        for rel in OUTPUTS:
            src = repo / rel
            if src.is_dir():
                shutil.copytree(src, dest / rel, symlinks=False, dirs_exist_ok=True)
            elif src.exists():
                shutil.copy2(src, dest / rel)
    env = {**os.environ, **_IDENTITY}
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    for key, value in (("user.name", _IDENTITY["GIT_AUTHOR_NAME"]), ("user.email", _IDENTITY["GIT_AUTHOR_EMAIL"])):
        subprocess.run(["git", "config", key, value], cwd=dest, check=True)  # dvc exp commits need an identity
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "copy"], cwd=dest, check=True, env=env)
    return dest


def project_env(proj: Path, **extra: str | Path) -> dict[str, str]:
    """The environment for commands run in the copy: its own code first on PYTHONPATH, plus `extra`."""
    proj = Path(proj)
    env = {**os.environ, "PYTHONPATH": f"{proj / 'src'}{os.pathsep}{proj}"}
    env.update({k: str(v) for k, v in extra.items()})
    return env

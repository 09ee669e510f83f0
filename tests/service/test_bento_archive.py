"""The packaged Bento as a file: the package stage exports it to bentos/, and a machine whose BentoML store
lacks it (a fresh clone, another BENTOML_HOME) gets it imported by what serves it, or one line naming the fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.service.conftest import service_env


def promotion(packaged: dict, home: Path, *args: str) -> subprocess.CompletedProcess:
    root = packaged["root"]
    cmd = [sys.executable, "-m", "mmfusion.serving.promotion", *args, "--params", str(root / "params.yaml"), "--root", str(root)]
    return subprocess.run(cmd, cwd=root, env=service_env(home), capture_output=True, text=True, timeout=120)


def test_package_exports_the_bento_it_built(packaged):
    report = packaged["report"]
    archive = packaged["root"] / report["bento_archive"]
    assert report["bento_archive"] == "bentos/mmfusion.tar" and archive.stat().st_size > 10_000


def test_an_empty_store_gets_the_bento_from_the_archive(packaged, tmp_path):
    tag = packaged["report"]["bento_tag"]
    home = tmp_path / "fresh-bentoml"
    shown = promotion(packaged, home, "show")
    assert shown.returncode == 0 and f"{tag}" in shown.stdout and "`make serve` imports it" in shown.stdout, shown.stdout
    served = promotion(packaged, home, "live-tag")
    assert served.returncode == 0 and served.stdout.strip() == tag, served.stderr
    assert (home / "bentos" / tag.split(":")[0] / tag.split(":")[1]).is_dir()
    again = promotion(packaged, home, "show")
    assert again.returncode == 0 and "[" not in again.stdout, again.stdout  # servable: no note


def test_no_store_and_no_archive_is_one_line_naming_the_fix(packaged, tmp_path):
    root = packaged["root"]
    archive = root / packaged["report"]["bento_archive"]
    moved = tmp_path / "elsewhere.bento"
    shutil.move(archive, moved)
    try:
        out = promotion(packaged, tmp_path / "empty-bentoml", "live-tag")
        shown = promotion(packaged, tmp_path / "empty-bentoml", "show")
    finally:
        shutil.move(moved, archive)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve: error: Bento ") and "make run" in lines[0], out.stderr
    assert "NOT in the BentoML store" in shown.stdout, shown.stdout

"""The README stays one screen to a first run, and the docs site builds offline with no warning.

`mkdocs build --strict` fails on a page missing from nav, a broken link between pages or a missing
anchor. Links to repo files outside docs/ (bench/results/*.json, params.yaml) are only "not found
among documentation files" to MkDocs (mkdocs.yml logs them at INFO); here each must exist on disk.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250

# `make X` in inline code or at the start of an indented code line (prose such as "make sure" is not a target)
MAKE_TARGET = re.compile(r"(?:`|^ {4}\s*)make ([a-z][a-z0-9_-]*)", re.MULTILINE)
MAKEFILE_RULE = re.compile(r"^([a-zA-Z0-9_.-]+)(?:\s+[a-zA-Z0-9_.-]+)*\s*:(?!=)", re.MULTILINE)
OUTSIDE_LINK = re.compile(r"Doc file '([^']+)' contains a link '([^']+)', but the target .*is not found")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def makefile_targets() -> set[str]:
    return set(MAKEFILE_RULE.findall((REPO / "Makefile").read_text()))


def test_readme_is_one_screen():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move measurements and how-tos to docs/"
    )


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_make_target_named_exists(path: Path):
    named = set(MAKE_TARGET.findall(path.read_text()))
    missing = sorted(named - makefile_targets())
    assert not missing, f"{path.name} names make targets the Makefile does not have: {missing}"


def test_readme_links_exist():
    broken = []
    for url in MD_LINK.findall(README.read_text()):
        if "://" in url or url.startswith(("#", "mailto:")):
            continue
        if not (REPO / url.split("#", 1)[0]).exists():
            broken.append(url)
    assert not broken, f"README.md links to files that do not exist: {broken}"


@pytest.fixture(scope="module")
def mkdocs_build(tmp_path_factory) -> subprocess.CompletedProcess:
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (requirements.lock: mkdocs, mkdocs-material)")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_docs_build_strict_without_warnings(mkdocs_build):
    out = mkdocs_build.stdout + mkdocs_build.stderr
    warnings = [line for line in out.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert mkdocs_build.returncode == 0 and not warnings, out[-4000:]


def test_docs_links_outside_docs_exist(mkdocs_build):
    out = mkdocs_build.stdout + mkdocs_build.stderr
    broken = []
    for page, url in OUTSIDE_LINK.findall(out):
        target = (DOCS / page).parent / url.split("#", 1)[0]
        if not target.exists():
            broken.append(f"{page}: {url}")
    assert not broken, f"docs link to files that do not exist: {broken}"

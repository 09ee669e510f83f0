"""The built Bento is ready for replicas: `bentoml build` wrote its Dockerfile and the pinned requirements
(`bentoml containerize` needs Docker, absent here; docs/scale-out.md)."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO


def test_the_bento_carries_a_dockerfile_and_the_pinned_requirements(packaged):
    name, version = packaged["report"]["bento_tag"].split(":")
    bento = packaged["root"] / "bentoml" / "bentos" / name / version
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM " in dockerfile and "requirements.txt" in dockerfile
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    pins = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]["packages"]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==\S+", p) for p in pins)  # every package pinned
    missing = [p for p in pins if p not in requirements.split()]
    assert not missing, f"Bento requirements.txt lacks {missing}"

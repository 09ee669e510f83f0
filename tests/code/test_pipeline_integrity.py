"""dvc.yaml cannot go stale: every project module a stage runs is in its deps, and one stage is one name
in stages/__init__.py, dvc.yaml, params.yaml, the params schema and src/mmfusion/stages/<name>.py."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from mmfusion.config import FLOW_SECTIONS, SETTINGS_SECTIONS, SHARED_SECTIONS, Params
from mmfusion.stages import STAGES
from tests.conftest import REPO

SRC = REPO / "src"
DVC_STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """src/ file of a dotted `mmfusion...` module (a package's __init__.py), or None if there is none."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Every `mmfusion...` module a file imports, at the top or inside functions (lazy imports run too)."""
    package = ".".join(path.relative_to(SRC).with_suffix("").parts) if path.is_relative_to(SRC) else ""
    if path.name == "__init__.py":
        package += ".__init__"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.split(".")[: -node.level]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import submodule`
    return {m for m in found if m.split(".")[0] == "mmfusion" and module_file(m)}


def closure(roots: list[Path]) -> set[Path]:
    """The project files the roots run: their mmfusion imports, transitively, with every parent package."""
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                f = module_file(".".join(parts[:i]))
                if f is not None and f not in seen:
                    todo.append(f)
    return {p for p in seen if p.is_relative_to(SRC) and has_code(p)}


def has_code(path: Path) -> bool:
    """False for a file that is only a docstring (an empty package __init__.py): it cannot change an output."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def dep_paths(stage: dict) -> list[Path]:
    return [REPO / (d if isinstance(d, str) else next(iter(d))) for d in stage.get("deps", [])]


def test_stage_commands_run_their_stage_through_prefect():
    for name, stage in DVC_STAGES.items():
        assert stage["cmd"] == f"python -m flows.stages {name}", name


@pytest.mark.parametrize("name", STAGES)
def test_every_module_a_stage_runs_is_a_dvc_dep(name):
    """A changed module must rerun the stage: else `dvc repro` can call stale outputs up to date."""
    roots = [SRC / "mmfusion" / "stages" / f"{name}.py", REPO / "flows" / "stages.py"]  # its module + its cmd
    deps = dep_paths(DVC_STAGES[name])
    missing = sorted(
        str(f.relative_to(REPO)) for f in closure(roots) if not any(f == d or f.is_relative_to(d) for d in deps)
    )
    assert not missing, f"dvc.yaml stage {name!r} runs these modules but does not list them in deps: {missing}"


def test_closure_follows_lazy_and_package_imports():
    files = {str(p.relative_to(SRC)) for p in closure([SRC / "mmfusion" / "stages" / "evaluate.py"])}
    assert "mmfusion/fusion/heads.py" in files  # registered by mmfusion/fusion/__init__.py
    assert "mmfusion/encoders/image.py" in files  # registered by mmfusion/encoders/__init__.py
    lazy = {str(p.relative_to(SRC)) for p in closure([SRC / "mmfusion" / "monitoring" / "reference.py"])}
    assert "mmfusion/inference/predictor.py" in lazy  # imported inside build_reference() only


def test_stage_names_agree_everywhere():
    params_sections = list(yaml.safe_load((REPO / "params.yaml").read_text()))
    schema_sections = [f.name for f in dataclasses.fields(Params)]
    modules = {p.stem for p in (SRC / "mmfusion" / "stages").glob("*.py")} - {"__init__", "common"}
    assert list(DVC_STAGES) == list(STAGES)
    # stages first, then the non-stage flows, then settings of where the work runs
    assert params_sections == list(STAGES) + list(FLOW_SECTIONS) + list(SETTINGS_SECTIONS) + list(SHARED_SECTIONS)
    assert schema_sections == list(STAGES) + list(FLOW_SECTIONS) + list(SETTINGS_SECTIONS) + list(SHARED_SECTIONS)
    assert modules == set(STAGES)
    assert all((REPO / "flows" / f"{name}.py").exists() for name in FLOW_SECTIONS)
    assert not set(FLOW_SECTIONS) & set(DVC_STAGES)


def test_each_stage_depends_on_its_own_params_section():
    for name in STAGES:
        params = [p if isinstance(p, str) else next(iter(p)) for p in DVC_STAGES[name].get("params", [])]
        assert any(p == name or p.startswith(f"{name}.") for p in params), f"{name}: params {params}"


def test_no_stage_depends_on_a_settings_section():
    """Where the work runs (compute) never changes what a stage produces: switching it must rerun nothing."""
    for name, stage in DVC_STAGES.items():
        params = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
        assert not [p for p in params if p.split(".")[0] in SETTINGS_SECTIONS], name


def test_input_folders_named_in_params_are_deps_of_the_stage_that_reads_them():
    """A folder a stage reads by a param must be a DVC dep of that stage (or new files there rerun nothing)."""
    from mmfusion.config import load_params

    params = load_params(REPO / "params.yaml")
    read_by = {"ingest": [params.ingest.feedback_dir]}
    for stage, folders in read_by.items():
        for folder in filter(None, folders):
            assert folder in DVC_STAGES[stage]["deps"], f"dvc.yaml: {stage} reads {folder} but does not depend on it"

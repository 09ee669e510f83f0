"""`make test`'s two xdist workers: the tests that share session fixtures run on one worker, the longest first.

A real xdist session over a throwaway test tree that uses this suite's hooks (tests/conftest.py): what the
scheduler did is read from the files each test writes, not from its configuration.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, suite_group

CONFTEST = "from tests.conftest import pytest_collection_modifyitems, pytest_xdist_make_scheduler  # noqa: F401\n"
TEST = """import os, time
from pathlib import Path

def test_{i}():
    time.sleep(0.2)
    with open(Path(__file__).parents[2] / "ran.txt", "a") as f:
        f.write(f"{{os.environ['PYTEST_XDIST_WORKER']}} {module} {{time.time()}} {{os.environ['PREFECT_HOME']}}\\n")
"""


def test_groups_are_directories_with_shared_fixtures_else_modules():
    assert suite_group("tests/service/test_inputs.py::test_x[a/b]") == "service"
    assert suite_group("tests/model/test_behaviour.py::test_y") == "model"
    assert suite_group("tests/e2e/test_byod.py::test_z[one]") == "e2e/test_byod.py"
    assert suite_group("tests/code/test_split.py::test_w") == "code/test_split.py"


def test_a_shared_directory_runs_on_one_worker_and_the_longest_group_starts_first(tmp_path):
    root = tmp_path / "proj"
    modules = ["code/test_a.py", "code/test_b.py", "service/test_c.py", "service/test_d.py", "service/test_e.py",
               "e2e/test_byod.py"]  # fmt: skip
    for module in modules:
        path = root / "tests" / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(TEST.format(i=i, module=module) for i in range(3)))
    (root / "tests" / "conftest.py").write_text(CONFTEST)
    out = subprocess.run(
        # its own --basetemp: a numbered one would make pytest delete the oldest of the suite's own temp folders
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "basetemp"),
         "-n", "2", "--dist", "loadscope", "--no-loadscope-reorder", "tests"],
        cwd=root, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path / "prefect")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = [line.split() for line in (root / "ran.txt").read_text().splitlines()]
    assert len(runs) == 3 * len(modules)
    homes = {(worker, home) for worker, _, _, home in runs}
    assert len(homes) == len({home for _, home in homes}) == 2, homes  # one Prefect home each, not shared
    workers = {}
    for worker, module, _, _ in runs:
        workers.setdefault(suite_group("tests/" + module), set()).add(worker)
    assert len(workers["service"]) == 1, workers  # three modules, one worker
    assert len({w for ws in workers.values() for w in ws}) == 2  # and both workers worked
    firsts = {min((r for r in runs if r[0] == w), key=lambda r: float(r[2]))[1] for w in ("gw0", "gw1")}
    assert firsts == {"e2e/test_byod.py", "service/test_c.py"}  # the two longest groups started first

"""bench/transcript.py: the commands the bench scripts run (loop, real data), timed and logged as they run."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from transcript import CommandFailed, Transcript  # noqa: E402


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_stdout_is_returned_and_both_streams_are_logged(tmp_path):
    tr = Transcript(tmp_path / "t.txt")
    out = tr.run("say", py("import sys; print('tag:1'); print('a warning', file=sys.stderr)"), tmp_path, dict(os.environ))
    assert out == "tag:1\n"
    log = (tmp_path / "t.txt").read_text()
    assert log.startswith("$ ") and "tag:1" in log and "a warning" in log
    assert set(tr.seconds) == {"say"}


def test_a_failing_or_hanging_command_raises_with_its_output(tmp_path):
    tr = Transcript(tmp_path / "t.txt")
    with pytest.raises(CommandFailed, match=r"failed \(3\)[\s\S]*stage broke"):
        tr.run("fail", py("import sys; print('stage broke', file=sys.stderr); sys.exit(3)"), tmp_path, dict(os.environ))
    with pytest.raises(CommandFailed, match="failed"):
        tr.run("hang", py("import time; time.sleep(30)"), tmp_path, dict(os.environ), timeout=0.5)
    assert tr.seconds["hang"] < 10

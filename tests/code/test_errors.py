"""User errors print one line and exit non-zero; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import pytest

from mmfusion.config import ParamsError
from mmfusion.data.manifest import ManifestError
from mmfusion.errors import DataCheckFailed, UserError
from mmfusion.stages.common import USER_ERRORS, stage_main


def _raising(exc: BaseException):
    def run(params, root):
        raise exc

    return run


def test_user_errors_are_one_line_with_their_exit_code(tmp_path, capsys):
    argv = ["--params", "params.yaml"]
    assert stage_main("split", _raising(UserError("split.val_fraction must be between 0 and 0.5")), argv) == 2
    err = capsys.readouterr().err
    assert err == "split: error: split.val_fraction must be between 0 and 0.5\n"
    assert stage_main("validate", _raising(DataCheckFailed("2 critical expectation(s) failed")), argv) == 1


def test_a_bare_value_error_is_a_bug_with_a_traceback():
    with pytest.raises(ValueError, match="shapes do not match"):
        stage_main("train", _raising(ValueError("shapes do not match")), ["--params", "params.yaml"])
    assert ValueError not in USER_ERRORS


def test_params_and_manifest_errors_are_user_errors():
    assert issubclass(ParamsError, UserError) and issubclass(ManifestError, UserError)
    assert issubclass(UserError, ValueError)  # callers catching ValueError around a check keep working

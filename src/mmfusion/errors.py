"""The exception type for mistakes a user can fix (params, data, a missing earlier stage).

A stage's command line prints a `UserError` as one line (`<stage>: error: ...`) and exits with
its `exit_code`; every other exception is a bug and keeps its traceback. `UserError` is a
`ValueError`, so code that catches ValueError around a user-facing check still works.
"""

from __future__ import annotations


class UserError(ValueError):
    """Wrong params, data or order of stages: the message says what to change."""

    exit_code = 2


class DataCheckFailed(UserError):
    """The data failed a check the pipeline makes on purpose (e.g. a critical expectation)."""

    exit_code = 1

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


class RequestError(Exception):
    """A client mistake in a request: HTTP `status` (4xx), a machine-readable `reason` and a message for a person.

    Raised by the service's checks (serving/inputs.py) and by each modality's own check (modalities/)."""

    def __init__(self, status: int, reason: str, message: str, item: int | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.item = item

    def to_json(self) -> dict:
        body = {"error": str(self), "reason": self.reason, "status": self.status}
        if self.item is not None:
            body["item"] = self.item
        return body

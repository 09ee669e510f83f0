"""Every 4xx the service can give leaves with its own message and reason: the error normaliser
(serving/guard.py) only words the router's bare answers, never the endpoints' own.

The reasons are collected from the source (every `RequestError(...)`, `FeedbackError(...)` and
`client_error(...)` call with literal arguments), so a new error is covered without a new test.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from mmfusion.serving.guard import _normalise_error, error_body
from tests.conftest import REPO

# the service and what it runs per request: its guard and checks, each modality's own check, feedback
SOURCES = [*sorted((REPO / "src" / "mmfusion" / "serving").glob("*.py")), *sorted((REPO / "src/mmfusion/modalities").glob("*.py")),
           REPO / "src/mmfusion/monitoring/feedback.py"]  # fmt: skip


def raised_errors() -> list[tuple[int, str, str]]:
    """(status, reason, where) of every error constructed with literal status and reason in the service's code."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            args = [a.value if isinstance(a, ast.Constant) else None for a in node.args[:2]]
            where = f"{path.name}:{node.lineno}"
            if name in ("RequestError", "FeedbackError") and isinstance(args[0], int) and isinstance(args[1], str):
                found.append((args[0], args[1], where))
            elif name == "client_error" and isinstance(args[0], str):
                found.append((400, args[0], where))
    return found


ERRORS = raised_errors()


def test_the_scan_finds_the_service_errors():
    reasons = {r for _, r, _ in ERRORS}
    assert {"unknown_request", "unknown_item", "undecodable_image", "text_too_long", "invalid_request"} <= reasons
    assert any(status == 404 for status, _, _ in ERRORS) and any(status == 413 for status, _, _ in ERRORS)


def _start(status: int) -> dict:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}


@pytest.mark.parametrize("status,reason,where", ERRORS, ids=[f"{s}-{r}-{w}" for s, r, w in ERRORS])
def test_an_endpoint_error_keeps_its_message_and_reason(status, reason, where):
    message = f"what happened for {reason} (from {where})"
    start, body, info = _normalise_error(_start(status), json.dumps(error_body(status, reason, message)).encode(),
                                         "POST", "/feedback")  # fmt: skip
    answer = json.loads(body["body"])
    assert start["status"] == status
    assert answer == {"error": message, "reason": reason, "status": status} == info


@pytest.mark.parametrize("status,reason,where", [e for e in ERRORS if e[0] == 400])
def test_a_bentoml_bad_input_keeps_its_reason(status, reason, where):
    # client_error() travels as BentoML's BadInput: `[reason] message` in BentoML's own error body
    _, body, _ = _normalise_error(_start(400), json.dumps({"error": f"[{reason}] bad field x"}).encode())
    assert json.loads(body["body"]) == {"error": "bad field x", "reason": reason, "status": 400}


def test_the_routers_bare_answers_get_a_message_of_ours():
    _, body, _ = _normalise_error(_start(404), b"Not Found", "POST", "/clasify")
    assert json.loads(body["body"]) == {"error": "no endpoint /clasify", "reason": "not_found", "status": 404}
    _, body, _ = _normalise_error(_start(405), json.dumps({"error": "Method Not Allowed"}).encode(), "GET", "/classify")
    assert json.loads(body["body"])["error"] == "GET is not allowed on /classify: use POST"


def test_a_validation_error_names_the_field_and_the_problem():
    # BentoML's answer to a pydantic ValidationError (a form field of the wrong type): the input itself is left out
    detail = [{"type": "bool_parsing", "loc": ["explain"], "msg": "Input should be a valid boolean, unable to interpret input"}]
    _, body, _ = _normalise_error(_start(400), json.dumps({"error": "1 validation error for Input", "detail": detail}).encode())
    answer = json.loads(body["body"])
    assert answer["error"] == "1 validation error for Input: explain: Input should be a valid boolean, unable to interpret input"
    assert answer["reason"] == "invalid_request" and answer["status"] == 400

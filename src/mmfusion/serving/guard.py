"""HTTP-level safety that must act before (or around) BentoML: bodies, timeouts, concurrency, error shape, shutdown.

- `RequestGuard` (ASGI middleware, outermost of ours): asks the token gate (mmfusion.serving.auth)
  whether a protected path may go on, before anything else is read. Then it reads a request body completely before
  the app sees it, under a size limit (413) and a time limit (408), so slow or stalled clients
  never hold a concurrency slot or a model queue place. Then it admits at most
  `max_concurrency` requests per worker (429), gives each `timeout_s` (504), and, after SIGTERM,
  lets the in-flight ones finish until the drain deadline (then 503 `shutting_down`).
  Every answer with status >= 400, its own or BentoML's or Starlette's (405, 404...), leaves in
  one JSON shape `{"error", "reason", "status"}`, and each client error is logged as one
  WARNING line (no traceback; `quiet_client_errors` mutes BentoML's tracebacks for them).
- `SafeMultipartSerde`: BentoML's form parser downloads a file field given as a URL, decodes
  invalid UTF-8 text silently as Latin-1 and writes an upload under its own file name. This one
  takes only uploaded files for file fields (one each, the name dropped), and text that is valid
  UTF-8 (else 400 `invalid_text`).
- `use_private_upload_dir`: BentoML's per-request temporary files go to a folder named after the
  worker's PID; a starting worker removes the folders of workers that are gone (a `kill -9`
  leaves nothing behind after the restart).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
import typing as t
from collections import OrderedDict
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qsl

from bentoml.exceptions import BadInput
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from mmfusion import compat

log = logging.getLogger("mmfusion.serving")

Scope = dict[str, t.Any]
Message = dict[str, t.Any]

# reason codes for answers that are not the service's own RequestError
DEFAULT_REASONS = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "upload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}
_REASON_PREFIX = re.compile(r"^\[([a-z0-9_]+)\] ")


def client_error(reason: str, message: str) -> BadInput:
    """A BentoML BadInput (400) whose JSON answer will carry `reason` (see `_normalise_error`)."""
    return BadInput(f"[{reason}] {message}")


def error_body(status: int, reason: str, message: str) -> dict:
    return {"error": message, "reason": reason, "status": status}


def _json_messages(status: int, body: dict, extra_headers: list | None = None) -> tuple[Message, Message]:
    payload = json.dumps(body).encode()
    headers = [*(extra_headers or []), (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": payload, "more_body": False},
    )


class _Drain:
    """Process-wide shutdown state: set by SIGTERM (chained before uvicorn's own handler)."""

    stopping = False
    deadline: float | None = None
    grace_s: float = 20.0

    @classmethod
    def install(cls, grace_s: float) -> None:
        cls.grace_s = grace_s
        previous = signal.getsignal(signal.SIGTERM)
        if getattr(previous, "_mmfusion_drain", False):
            return

        def on_term(signum: int, frame: t.Any) -> None:
            if not cls.stopping:
                cls.stopping = True
                cls.deadline = time.monotonic() + cls.grace_s
                log.warning("SIGTERM: draining in-flight requests for up to %.0f s, then exiting", cls.grace_s)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                raise SystemExit(128 + signum)

        on_term._mmfusion_drain = True  # type: ignore[attr-defined]
        signal.signal(signal.SIGTERM, on_term)


install_drain = _Drain.install


class RequestGuard:
    """ASGI middleware: body limits and timeouts, admission, a request timeout, drain, one JSON error shape."""

    def __init__(
        self,
        app: t.Any,
        max_body_bytes: int,
        body_timeout_s: float = 10.0,
        timeout_s: float = 30.0,
        max_concurrency: int = 128,
        slack_bytes: int = 64 * 1024,
        gate: t.Any = None,
        keepalive_requests: int = 0,
    ):
        self.app = app
        # After this many requests on one connection the answer says `Connection: close` (nginx's
        # keepalive_requests): keep-alive clients stick to the worker that accepted them, so a worker that
        # started late, or replaced a killed one, got no traffic until clients reconnected. 0: never.
        self.keepalive_requests = keepalive_requests
        self._per_connection: OrderedDict[t.Any, int] = OrderedDict()
        self.gate = gate  # mmfusion.serving.auth.TokenGate: asked before the body is read
        self.max_body_bytes = max_body_bytes
        # multipart framing and the text field ride on top of the image itself
        self.limit = max_body_bytes + slack_bytes
        self.body_timeout_s = body_timeout_s
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.active = 0

    async def __call__(self, scope: Scope, receive: t.Callable, send: t.Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", "?"), scope.get("path", "?")
        answered = {"status": None}
        recycle = self._last_on_connection(scope)

        async def reply(status: int, reason: str, message: str, close: bool = False) -> None:
            answered["status"] = status
            _log_error(method, path, status, reason, message)
            extra = [(b"connection", b"close")] if close or recycle else []
            if status == 503:
                extra.append((b"retry-after", b"1"))
            if status == 401:
                extra.append((b"www-authenticate", b'Bearer realm="mmfusion"'))
            for m in _json_messages(status, error_body(status, reason, message), extra):
                await send(m)

        if _Drain.stopping:
            await reply(503, "shutting_down", "the server is shutting down; retry on another instance or in a moment", True)
            return

        refusal = self.gate.check(scope) if self.gate is not None else None
        if refusal is not None:  # before the body: an unauthorised upload is never read, let alone kept
            await reply(*refusal, close=True)
            return

        body_in = await self._read_body(scope, receive, reply)
        if body_in is None:
            return  # answered (413/408) or the client went away

        if self.active >= self.max_concurrency:
            await reply(429, "too_many_requests", f"this worker is busy with {self.active} requests; retry shortly")
            return

        replay = _Replay(body_in, receive)
        held: Message | None = None
        chunks: list[bytes] = []
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = True
                if recycle:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                if message["status"] >= 400:
                    held = message  # buffer the (small) error body to normalise it
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                start, body, info = _normalise_error(held, b"".join(chunks), method, path)
                held = None
                answered["status"] = start["status"]
                _log_error(method, path, start["status"], info["reason"], info["error"])
                await send(start)
                await send(body)
                return
            await send(message)

        self.active += 1
        task = asyncio.ensure_future(self.app(scope, replay, guarded_send))
        try:
            await self._wait(task, lambda: started)
        except _Expired as exc:
            if not started:
                status, reason, message = exc.args
                await reply(status, reason, message, close=True)
        finally:
            self.active -= 1

    def _last_on_connection(self, scope: Scope) -> bool:
        """Count this request on its connection (the peer's address and port); True for the last one."""
        client = scope.get("client")
        if self.keepalive_requests <= 0 or not client:
            return False
        key = tuple(client)
        n = self._per_connection.pop(key, 0) + 1
        if n >= self.keepalive_requests:
            return True  # forgotten: the connection closes after this answer
        self._per_connection[key] = n
        while len(self._per_connection) > 10_000:  # connections the client closed first
            self._per_connection.popitem(last=False)
        return False

    async def _wait(self, task: asyncio.Future, started: t.Callable[[], bool]) -> None:
        """Wait for the app; on the request timeout or the drain deadline, cancel it if nothing was sent yet."""
        t_end = time.monotonic() + self.timeout_s
        while True:
            limit = t_end if _Drain.deadline is None else min(t_end, _Drain.deadline)
            done, _ = await asyncio.wait({task}, timeout=max(0.0, min(limit - time.monotonic(), 0.5)))
            if done:
                task.result()
                return
            if time.monotonic() >= limit and not started():
                task.cancel()
                if _Drain.deadline is not None and time.monotonic() >= _Drain.deadline:
                    raise _Expired(503, "shutting_down", f"the server shut down before the request finished ({_Drain.grace_s:.0f} s drain); retry")
                raise _Expired(504, "timeout", f"the request took longer than {self.timeout_s:.0f} s")

    async def _read_body(self, scope: Scope, receive: t.Callable, reply: t.Callable) -> list[Message] | None:
        """All of the body's messages, read under the size and time limits; None once answered or disconnected."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await reply(413, "upload_too_large", f"request body is over the upload limit of {self.max_body_bytes} bytes", True)
            return None
        if length is None and b"chunked" not in headers.get(b"transfer-encoding", b""):
            return []  # no body
        if length == b"0":
            return []
        messages: list[Message] = []
        received = 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except asyncio.TimeoutError:
                await reply(
                    408, "body_timeout",
                    f"the request body did not arrive within {self.body_timeout_s:.0f} s ({received} bytes received)", True,
                )  # fmt: skip
                return None
            if message["type"] == "http.disconnect":
                return None
            messages.append(message)
            received += len(message.get("body", b""))
            if received > self.limit:
                await reply(413, "upload_too_large", f"request body is over the upload limit of {self.max_body_bytes} bytes", True)
                return None
            if not message.get("more_body"):
                return messages


class _Expired(Exception):
    pass


class _Replay:
    """An ASGI receive that hands out the buffered body, then waits on the real one (disconnects)."""

    def __init__(self, messages: list[Message], receive: t.Callable):
        self._messages = list(messages) or [{"type": "http.request", "body": b"", "more_body": False}]
        self._receive = receive

    async def __call__(self) -> Message:
        if self._messages:
            return self._messages.pop(0)
        return await self._receive()


def _log_error(method: str, path: str, status: int, reason: str, message: str) -> None:
    level = logging.WARNING if status < 500 or status in (503, 504) else logging.ERROR
    log.log(level, "%s %s -> %d %s: %s", method, path, status, reason, message[:300])


def _normalise_error(start: Message, body: bytes, method: str = "?", path: str = "?") -> tuple[Message, Message, dict]:
    """Any error answer (BentoML's `[{"error"}]`, `{"error", "detail"}`, Starlette's text/plain) in one JSON shape."""
    status = start["status"]
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        data = {"error": text} if text and len(text) < 300 else {}
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        data = {"error": str(data)}
    message = str(data.get("error") or "")
    if "reason" not in data:
        found = _REASON_PREFIX.match(message)
        if found:
            data["reason"], message = found.group(1), message[found.end():]
        message += _validation_detail(data.get("detail"))
    # An answer that already carries a reason is the service's own (RequestError, FeedbackError, client_error):
    # its message says what happened (`/feedback` -> 404 unknown_request), so it is kept as it is. Only the
    # router's bare 404/405 get a message of ours.
    routed = "reason" not in data
    if status == 405 and routed:
        message = f"{method} is not allowed on {path}: use POST"
    elif status == 404 and routed:
        message = f"no endpoint {path}"
    elif not message or message in ("Method Not Allowed", "Not Found"):
        message = f"{HTTPStatus(status).phrase}" if status in HTTPStatus._value2member_map_ else "error"
    data["error"] = message
    data.setdefault("reason", DEFAULT_REASONS.get(status, "invalid_request" if status < 500 else "internal_error"))
    data["status"] = status
    keep = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
    response_start, response_body = _json_messages(status, data, keep)
    return response_start, response_body, data


def _validation_detail(detail: t.Any) -> str:
    """The field and the problem of each entry of BentoML's pydantic `detail` (`: explain: Input should be a valid
    boolean, ...`; never the value, which BentoML leaves out), so a 400 for a mistyped field names it; "" if none."""
    if not isinstance(detail, list):
        return ""
    said = [f"{'.'.join(map(str, d.get('loc') or ())) or 'body'}: {d['msg']}"
            for d in detail[:3] if isinstance(d, dict) and d.get("msg")]  # fmt: skip
    return f": {'; '.join(said)}" if said else ""


class _QuietClientErrors(logging.Filter):
    """Drop BentoML's ERROR traceback for a client error (the guard logs one WARNING line instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or not str(record.msg).startswith("Exception on"):
            return True
        from bentoml.exceptions import BentoMLException
        from pydantic import ValidationError

        exc = record.exc_info[1]
        if isinstance(exc, ValidationError):
            return False
        if isinstance(exc, BentoMLException) and int(exc.error_code) < 500:
            return False
        return True


def quiet_client_errors() -> None:
    logger = compat.http_app_logger()
    if not any(isinstance(f, _QuietClientErrors) for f in logger.filters):
        logger.addFilter(_QuietClientErrors())


UPLOAD_PREFIX = "mmfusion-uploads-"


def use_private_upload_dir(root: str | None = None) -> Path:
    """Point BentoML's per-request temp folders at one named after this PID; remove those of dead workers."""
    root = Path(root or tempfile.gettempdir())
    mine = root / f"{UPLOAD_PREFIX}{os.getpid()}"
    for old in root.glob(f"{UPLOAD_PREFIX}*"):
        pid = old.name[len(UPLOAD_PREFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    mine.mkdir(parents=True, exist_ok=True)
    compat.set_request_tempdir(mine, prefix="request-")
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, except that a text part that is not valid in its charset is an error, not Latin-1."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset or "utf-8")
            except (UnicodeDecodeError, LookupError) as exc:
                raise MultiPartException(f"[invalid_text] field {part.field_name!r} is not valid UTF-8 text") from exc
        super().on_part_end()


async def _read_form(request: t.Any, max_files: int = 8, max_fields: int = 32) -> FormData:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await StrictMultiPartParser(request.headers, request.stream(), max_files=max_files, max_fields=max_fields).parse()
    else:  # application/x-www-form-urlencoded
        body = await request.body()
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict", max_num_fields=max_fields)
        except UnicodeDecodeError as exc:
            raise MultiPartException("[invalid_text] the form is not valid UTF-8 text") from exc
        except ValueError as exc:
            raise MultiPartException(f"malformed form data: {exc}") from exc
        form = FormData(pairs)
    request._form = form  # closed with the request (BentoML's background task)
    return form


def install_safe_multipart() -> None:
    """Replace BentoML's multipart parser (process-wide, in the API service process only)."""
    from starlette.exceptions import HTTPException

    class SafeMultipartSerde(compat.multipart_serde()):
        async def parse_request(self, request: t.Any, cls: t.Any) -> t.Any:
            try:
                form = await _read_form(request)
            except (MultiPartException, HTTPException, KeyError) as exc:
                detail = str(getattr(exc, "detail", None) or exc)
                if detail.startswith("[invalid_text]"):
                    raise BadInput(detail) from exc
                raise client_error("invalid_request", f"malformed form data: {detail}") from exc
            data: dict[str, t.Any] = {}
            for key in form:
                values = form.getlist(key)
                if len(values) > 1:
                    raise client_error("invalid_request", f"field {key!r} was sent {len(values)} times; send it once")
                value = values[0]
                if key in cls.multipart_fields:
                    if not isinstance(value, UploadFile):
                        raise client_error(
                            "invalid_request", f"field {key!r} must be an uploaded file (curl -F '{key}=@picture.png'), not text"
                        )
                    value.filename = None  # never used: a long or odd client file name must not reach the file system
                    data[key] = value
                    continue
                if isinstance(value, UploadFile):
                    raw = await value.read()
                    try:
                        value = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise client_error("invalid_text", f"field {key!r} is not valid UTF-8 text") from exc
                data[key] = value
            return cls.model_validate(data)

    compat.use_multipart_serde(SafeMultipartSerde)

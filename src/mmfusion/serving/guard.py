"""HTTP-level input safety that must act before BentoML parses a request.

- `RequestGuard` (ASGI middleware): refuses a body over the upload limit with 413, from its
  Content-Length or while it streams in, and turns BentoML's own 4xx bodies (`[{"error": ...}]`)
  into the same `{"error", "reason", "status"}` object the service returns.
- `SafeMultipartSerde`: BentoML's multipart parser downloads a file field given as a string URL,
  and JSON-decodes plain form fields (so a binary part ends in a 500 and text "42" in a 400).
  This one accepts only uploaded files for file fields and takes text fields verbatim.
"""

from __future__ import annotations

import json
import typing as t

from bentoml.exceptions import BadInput
from starlette.datastructures import UploadFile

Scope = dict[str, t.Any]
Message = dict[str, t.Any]


def _json_response(status: int, body: dict) -> tuple[Message, Message]:
    payload = json.dumps(body).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
    }
    return start, {"type": "http.response.body", "body": payload, "more_body": False}


def _too_large(limit: int) -> tuple[Message, Message]:
    message = f"request body is over the upload limit of {limit} bytes"
    return _json_response(413, {"error": message, "reason": "upload_too_large", "status": 413})


class RequestGuard:
    """ASGI middleware: a body-size limit and uniform 4xx JSON errors for POST requests."""

    def __init__(self, app: t.Any, max_body_bytes: int, slack_bytes: int = 64 * 1024):
        self.app = app
        self.max_body_bytes = max_body_bytes
        # multipart framing and the text field ride on top of the image itself
        self.limit = max_body_bytes + slack_bytes

    async def __call__(self, scope: Scope, receive: t.Callable, send: t.Callable) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            for message in _too_large(self.max_body_bytes):
                await send(message)
            return

        received = 0
        over = False

        async def guarded_receive() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True  # the app sees a disconnect; guarded_send answers 413 instead
                    return {"type": "http.disconnect"}
            return message

        held: Message | None = None
        chunks: list[bytes] = []
        replaced = False

        async def guarded_send(message: Message) -> None:
            nonlocal held, replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                if over:
                    replaced = True
                    for m in _too_large(self.max_body_bytes):
                        await send(m)
                    return
                if 400 <= message["status"] < 500:
                    held = message  # buffer the (small) error body to normalise it
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                start, body = _normalise_error(held, b"".join(chunks))
                held = None
                await send(start)
                await send(body)
                return
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)


def _normalise_error(start: Message, body: bytes) -> tuple[Message, Message]:
    """BentoML answers some 4xx with `[{"error": ...}]` or `{"error", "detail"}`: make them one shape."""
    status = start["status"]
    try:
        data = json.loads(body)
    except ValueError:
        data = {"error": body.decode("utf-8", "replace") or "bad request"}
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        data = {"error": str(data)}
    data.setdefault("error", "bad request")
    data.setdefault("reason", "invalid_request")
    data.setdefault("status", status)
    keep = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
    response_start, response_body = _json_response(status, data)
    response_start["headers"] = keep + response_start["headers"]
    return response_start, response_body


def _install_safe_multipart() -> None:
    """Replace BentoML's multipart parser (process-wide, in the API service process only)."""
    from _bentoml_impl import serde
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    class SafeMultipartSerde(serde.MultipartSerde):
        async def parse_request(self, request: t.Any, cls: t.Any) -> t.Any:
            try:
                form = await request.form(max_files=8, max_fields=32)
            except (MultiPartException, HTTPException) as exc:
                raise BadInput(f"malformed form data: {getattr(exc, 'detail', None) or exc}") from exc
            data: dict[str, t.Any] = {}
            for key in form:
                values = form.getlist(key)
                if key in cls.multipart_fields:
                    if not all(isinstance(v, UploadFile) for v in values):
                        raise BadInput(f"field {key!r} must be an uploaded file (curl -F '{key}=@picture.png'), not text")
                    data[key] = values[0]
                    continue
                value = values[0]
                if isinstance(value, UploadFile):
                    raw = await value.read()
                    try:
                        value = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise BadInput(f"field {key!r} must be UTF-8 text") from exc
                data[key] = value
            return cls.model_validate(data)

    for media_type, klass in list(serde.ALL_SERDE.items()):
        if klass is serde.MultipartSerde:
            serde.ALL_SERDE[media_type] = SafeMultipartSerde  # type: ignore[index]

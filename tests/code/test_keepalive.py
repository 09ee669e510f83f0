"""Keep-alive recycling in RequestGuard (package.keepalive_requests): after N requests on one connection the answer
says `Connection: close`, so clients reconnect and spread over the workers again; other connections keep counting
on their own, and error answers close too. Driven as ASGI, with the real guard around a small app."""

from __future__ import annotations

import asyncio

from mmfusion.serving.guard import RequestGuard


async def ok_app(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def missing_app(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"error": "no such thing", "reason": "unknown_request", "status": 404}'})


def call(guard: RequestGuard, client: tuple[str, int]) -> tuple[int, dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [(b"content-length", b"0")], "client": client}
    asyncio.run(guard(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.lower(): v for k, v in start["headers"]}


def test_the_nth_answer_on_a_connection_closes_it_and_others_count_on_their_own():
    guard = RequestGuard(ok_app, max_body_bytes=1000, keepalive_requests=3)
    a, b = ("127.0.0.1", 50001), ("127.0.0.1", 50002)
    closes = [call(guard, a)[1].get(b"connection") for _ in range(3)]
    assert closes == [None, None, b"close"]
    assert call(guard, b)[1].get(b"connection") is None  # its own count
    assert call(guard, a)[1].get(b"connection") is None  # a new connection on the same port starts again
    assert [call(guard, b)[1].get(b"connection") for _ in range(2)] == [None, b"close"]


def test_an_error_answer_closes_too_and_zero_never_closes():
    guard = RequestGuard(missing_app, max_body_bytes=1000, keepalive_requests=1)
    status, headers = call(guard, ("127.0.0.1", 50003))
    assert status == 404 and headers.get(b"connection") == b"close"
    never = RequestGuard(ok_app, max_body_bytes=1000, keepalive_requests=0)
    assert all(call(never, ("127.0.0.1", 50004))[1].get(b"connection") is None for _ in range(50))

"""bench/serve.py's lean load generator against a real local HTTP server: every answer counted once, a
server that closes the connection (package.keepalive_requests) reconnected to, errors counted by status,
and the multipart request it builds is the one BentoML's parser reads (field names, file, texts)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Server:
    """An asyncio HTTP/1.1 server in a thread: answers /classify with the parsed multipart fields, closes
    every `close_every` answers, answers 503 to every `fail_every`-th request."""

    def __init__(self, close_every: int = 3, fail_every: int = 0):
        self.close_every, self.fail_every = close_every, fail_every
        self.requests, self.connections, self.fields = 0, 0, []
        self.loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.sock = sock
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the test server did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, sock=self.sock))
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer) -> None:
        from python_multipart import MultipartParser  # the parser BentoML reads forms with (through Starlette)

        self.connections += 1
        served = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers["content-length"]))
            boundary = headers["content-type"].split("boundary=")[1]
            fields, current = {}, {}

            def on_header_value(data, start, end, current=current):
                current.setdefault("header", b"")
                current["header"] += data[start:end]

            def on_part_data(data, start, end, current=current):
                current.setdefault("data", b"")
                current["data"] += data[start:end]

            def on_part_end(current=current, fields=fields):
                name = current["header"].decode().split('name="')[1].split('"')[0]
                fields[name] = current.get("data", b"")
                current.clear()

            parser = MultipartParser(boundary, {"on_header_value": on_header_value, "on_part_data": on_part_data, "on_part_end": on_part_end})
            parser.write(body)
            parser.finalize()
            self.fields.append(fields)
            self.requests += 1
            served += 1
            status = 503 if self.fail_every and self.requests % self.fail_every == 0 else 200
            payload = json.dumps({"label": "x", "latency_ms": 1.5}).encode()
            close = served >= self.close_every
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n".encode() + payload
            )
            await writer.drain()
            if close:
                break
        writer.close()

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(5)
        self.loop.close()


INPUTS = [(b"\x89PNG fake image bytes \r\n--not-a-boundary", "grinning face"), (b"\x00\x01", "caf\u00e9 \u2615")]


def test_the_lean_client_counts_every_answer_reconnects_and_sends_real_multipart(bench):
    server = Server(close_every=3)
    try:
        point = bench.run_point("lean", f"http://127.0.0.1:{server.port}", INPUTS, 4, 1.0, 0.0, "")
    finally:
        server.stop()
    assert point["requests"] > 20 and not point["errors"]
    # every answer counted once: the server saw at least as many (the last ones may end after the window)
    assert point["requests"] <= server.requests <= point["requests"] + 4
    assert server.connections >= server.requests // 3  # closed every 3 answers: the client reconnected
    first = server.fields[0]
    assert first["image"] == INPUTS[0][0] and first["text"].decode() == "grinning face"
    assert any(f["text"].decode() == "caf\u00e9 \u2615" for f in server.fields)
    assert point["client_cpu_s"] >= 0 and point["client"] == "lean"


def test_the_lean_client_counts_errors_by_status_and_sends_the_variant_fields(bench):
    server = Server(close_every=1000, fail_every=4)
    try:
        point = bench.run_point("lean", f"http://127.0.0.1:{server.port}", INPUTS, 2, 0.5, 0.0, "explain")
    finally:
        server.stop()
    assert point["errors"].get("503", 0) >= 2 and point["requests"] >= 2 * point["errors"]["503"]
    assert point["error_sample"] and all(f["explain"] == b"true" for f in server.fields)

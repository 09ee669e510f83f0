"""A hostile-but-fair client against the real `bentoml serve` of the session fixture.

Each case sends one bad (or odd but valid) request and asserts the status, the JSON error
shape `{"error", "reason", "status"}` and that a good request is answered right after it.
One shared server for the whole corpus; raw sockets for what httpx will not send.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import sqlite3
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image

from tests.service.conftest import TEST_LIMITS, TEST_SERVICE, png_bytes

pytestmark = pytest.mark.slow

TIMEOUT = 60.0
GOOD_PNG = png_bytes("fruit", 1)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(size=(32, 32), color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def png_declaring(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("L", (8, 8)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def upload(data: bytes, name: str = "x.png", ctype: str = "image/png", text: str | None = None) -> dict:
    kw: dict = {"files": {"image": (name, data, ctype)}}
    if text is not None:
        kw["data"] = {"text": text}
    return {"method": "POST", "path": "/classify", **kw}


def form_text(raw: bytes) -> dict:
    """A multipart body with a text part of raw bytes (httpx would encode a str)."""
    body = b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\n' + raw + b"\r\n--b--\r\n"
    return {"method": "POST", "path": "/classify", "content": body, "headers": {"content-type": "multipart/form-data; boundary=b"}}


def batch(items, **kw) -> dict:
    return {"method": "POST", "path": "/classify_batch", "json": {"items": items}, **kw}


def raw_json(path: str, body: bytes, ctype: str = "application/json") -> dict:
    return {"method": "POST", "path": path, "content": body, "headers": {"content-type": ctype}}


def chunks(total: int, size: int = 64 * 1024):
    sent = 0
    while sent < total:
        yield b"\0" * min(size, total - sent)
        sent += size


truncated_png = GOOD_PNG[: len(GOOD_PNG) // 2]
big = TEST_LIMITS["max_upload_bytes"] + 200_000

# (id, request, status, reason); reason None: a 200 answer
CASES = [
    # text with no visible character, client file names, invalid UTF-8, wrong methods and paths
    ("control_chars_only", {"method": "POST", "path": "/classify", "data": {"text": "\x01\x02"}}, 400, "no_input"),
    ("zero_width_only", {"method": "POST", "path": "/classify", "data": {"text": "\u200b"}}, 400, "no_input"),
    ("zero_width_batch_item", batch([{"text": "red apple"}, {"text": "\u200b\u200d"}]), 400, "no_input"),
    ("bom_and_joiners_only", {"method": "POST", "path": "/classify", "data": {"text": "\ufeff\u200d\u2060"}}, 400, "no_input"),
    ("zero_width_text_with_image", upload(GOOD_PNG, text="\u200b"), 200, None),
    ("filename_300_chars", upload(GOOD_PNG, name="a" * 300 + ".png"), 200, None),
    ("filename_path_traversal", upload(GOOD_PNG, name="../../../../etc/passwd"), 200, None),
    ("invalid_utf8_text_part", form_text(b"\xff\xfe apple"), 400, "invalid_text"),
    ("invalid_utf8_urlencoded", raw_json("/classify", b"text=%FF%FE+apple", "application/x-www-form-urlencoded"), 400, "invalid_text"),
    ("lone_surrogate_json", raw_json("/classify_batch", b'{"items": [{"text": "x \\ud800 y"}]}'), 400, "invalid_request"),
    ("get_classify", {"method": "GET", "path": "/classify"}, 405, "method_not_allowed"),
    ("put_classify", {"method": "PUT", "path": "/classify", "content": b"x"}, 405, "method_not_allowed"),
    ("delete_batch", {"method": "DELETE", "path": "/classify_batch"}, 405, "method_not_allowed"),
    ("unknown_path", {"method": "POST", "path": "/predict", "json": {}}, 404, "not_found"),
    # images: truncated and corrupt in every allowed format, bombs, formats outside the list, odd modes
    ("truncated_png", upload(truncated_png), 400, "undecodable_image"),
    ("truncated_jpeg", upload(encoded(rgb((64, 64)), "JPEG")[:300], "x.jpg", "image/jpeg"), 400, "undecodable_image"),
    ("truncated_gif", upload(encoded(rgb(), "GIF")[:40], "x.gif", "image/gif"), 400, "undecodable_image"),
    ("truncated_webp", upload(encoded(rgb((64, 64)), "WEBP")[:60], "x.webp", "image/webp"), 400, "undecodable_image"),
    ("truncated_bmp", upload(encoded(rgb(), "BMP")[:200], "x.bmp", "image/bmp"), 400, "undecodable_image"),
    ("corrupt_png_body", upload(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10), 400, "undecodable_image"),
    ("random_bytes", upload(bytes(range(256)) * 4), 400, "undecodable_image"),
    ("svg_text", upload(b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', "x.svg", "image/svg+xml"), 400, "undecodable_image"),
    ("empty_file", upload(b""), 400, "empty_image"),
    ("bomb_2100x2100", upload(encoded(Image.new("L", (2100, 2100)), "PNG")), 413, "image_too_large"),
    ("header_declares_10g_pixels", upload(png_declaring(100_000, 100_000)), 413, "image_too_large"),
    ("tiff_not_allowed", upload(encoded(rgb(), "TIFF"), "x.tiff", "image/tiff"), 415, "unsupported_format"),
    ("ico_not_allowed", upload(encoded(rgb(), "ICO"), "x.ico", "image/x-icon"), 415, "unsupported_format"),
    ("ppm_not_allowed", upload(encoded(rgb(), "PPM"), "x.ppm", "image/x-portable-pixmap"), 415, "unsupported_format"),
    ("png_named_jpg", upload(GOOD_PNG, "x.jpg", "image/jpeg"), 200, None),
    ("mode_16bit_gray_png", upload(encoded(Image.new("I;16", (32, 32), 30000), "PNG")), 200, None),
    ("mode_cmyk_jpeg", upload(encoded(Image.new("CMYK", (32, 32), (0, 50, 100, 0)), "JPEG"), "x.jpg", "image/jpeg"), 200, None),
    ("mode_palette_transparent_gif", upload(encoded(Image.new("P", (32, 32), 0), "GIF", transparency=0), "x.gif"), 200, None),
    ("mode_1bit_bmp", upload(encoded(Image.new("1", (32, 32), 1), "BMP"), "x.bmp"), 200, None),
    ("mode_la_png_1x1", upload(encoded(Image.new("LA", (1, 1)), "PNG")), 200, None),
    ("animated_gif", upload(encoded(rgb(), "GIF", save_all=True, append_images=[rgb(color=(0, 0, 255))]), "x.gif"), 200, None),
    # bodies and transports
    ("oversized_with_length", upload(b"\0" * big), 413, "upload_too_large"),
    ("oversized_chunked", {"method": "POST", "path": "/classify", "content": chunks(big), "headers": {"content-type": "multipart/form-data; boundary=b"}}, 413, "upload_too_large"),
    ("text_too_long", {"method": "POST", "path": "/classify", "data": {"text": "word " * 60}}, 400, "text_too_long"),
    ("text_of_250k_chars", {"method": "POST", "path": "/classify", "data": {"text": "a" * 250_000}}, 400, "text_too_long"),
    ("empty_form", {"method": "POST", "path": "/classify", "content": b"--b--\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}}, 400, "no_input"),
    ("no_boundary", {"method": "POST", "path": "/classify", "content": b"xx", "headers": {"content-type": "multipart/form-data"}}, 400, "invalid_request"),
    ("image_field_as_text", {"method": "POST", "path": "/classify", "data": {"image": "http://127.0.0.1:1/x.png"}}, 400, "invalid_request"),
    ("image_sent_twice", {"method": "POST", "path": "/classify", "files": [("image", ("a.png", GOOD_PNG)), ("image", ("b.png", GOOD_PNG))]}, 400, "invalid_request"),
    ("plain_text_body", raw_json("/classify", b"red apple", "text/plain"), 400, "invalid_request"),
    ("pickle_media_type", raw_json("/classify", b"\x80\x04N.", "application/vnd.bentoml+pickle"), 415, "unsupported_media_type"),
    # JSON
    ("malformed_json", raw_json("/classify_batch", b'{"items": [{"text": "x"}'), 400, "invalid_request"),
    ("json_is_a_list", raw_json("/classify_batch", b'[{"text": "x"}]'), 400, "invalid_request"),
    ("items_not_a_list", raw_json("/classify_batch", b'{"items": "red apple"}'), 400, "invalid_request"),
    ("nested_json_100k", raw_json("/classify_batch", b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400, "invalid_request"),
    ("huge_json_many_items", batch([{"text": "x"}] * 5000), 413, "too_many_items"),
    ("empty_items", batch([]), 400, "no_items"),
    ("item_text_is_object", batch([{"text": {"a": 1}}]), 400, "invalid_request"),
    ("item_image_not_base64", batch([{"image": "%%%"}]), 400, "invalid_base64"),
    ("item_image_not_an_image", batch([{"image": b64(b"hello world")}]), 400, "undecodable_image"),
    ("item_image_is_number", raw_json("/classify_batch", b'{"items": [{"image": 5}]}'), 400, "invalid_request"),
    ("item_text_number_is_text", batch([{"text": 42}]), 200, None),
    ("item_bomb", batch([{"text": "ok"}, {"image": b64(png_declaring(50_000, 50_000))}]), 413, "image_too_large"),
    ("batch_neither_modality", batch([{}]), 400, "no_input"),
    # /classify's options: booleans as pydantic reads a form (yes/no, 1/0, on/off, true/false), nothing else
    ("explain_maybe", {"method": "POST", "path": "/classify", "data": {"text": "red apple", "explain": "maybe"}}, 400, "invalid_request"),
    ("explain_yes", {"method": "POST", "path": "/classify", "data": {"text": "red apple", "explain": "yes"}}, 200, None),
    ("overlay_without_explain", {"method": "POST", "path": "/classify", "data": {"text": "red apple", "overlay": "true"}}, 400, "overlay_without_explain"),
    # headers
    ("request_id_not_ascii", {"method": "POST", "path": "/classify", "data": {"text": "red apple"}, "headers": {"x-request-id": "é".encode() * 10}}, 200, None),
    ("request_id_too_long", {"method": "POST", "path": "/classify", "data": {"text": "red apple"}, "headers": {"x-request-id": "x" * 5000}}, 200, None),
]


def send(server, spec: dict) -> httpx.Response:
    spec = dict(spec)
    method, path = spec.pop("method"), spec.pop("path")
    return httpx.request(method, f"{server.url}{path}", timeout=TIMEOUT, **spec)


def assert_good_request(server) -> None:
    resp = httpx.post(f"{server.url}/classify", files={"image": ("a.png", GOOD_PNG, "image/png")}, data={"text": "red apple"}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["label"]


def assert_error_shape(resp: httpx.Response, status: int, reason: str) -> dict:
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert isinstance(body, dict) and body["reason"] == reason and body["status"] == status, body
    assert isinstance(body["error"], str) and len(body["error"]) > 10
    assert "object at 0x" not in body["error"] and "Traceback" not in body["error"]
    return body


def test_the_corpus_has_40_kinds():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("name, spec, status, reason", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, name, spec, status, reason):
    resp = send(server, spec)
    if reason is None:
        assert resp.status_code == 200, resp.text[:500]
        body = resp.json()
        assert body.get("label") or body["results"][0]["label"]
        assert "client_request_id" not in body  # an unusable x-request-id is not echoed
    else:
        body = assert_error_shape(resp, status, reason)
        if name in ("zero_width_batch_item", "item_bomb"):
            assert body["item"] == 1
        if name == "explain_maybe":
            assert "explain: Input should be a valid boolean" in body["error"]  # names the field (guard: pydantic's detail)
    assert_good_request(server)


def test_client_errors_are_one_warning_line_without_traceback(server):
    text = server.output.read_text(errors="replace")
    assert "Traceback" not in text
    assert "-> 405 method_not_allowed" in text and "-> 400 invalid_text" in text


def test_reused_request_id_keeps_both_rows(server):
    ids = []
    for text in ("red apple", "blue wave"):
        resp = httpx.post(f"{server.url}/classify", data={"text": text}, headers={"x-request-id": "reused-1"}, timeout=TIMEOUT)
        assert resp.status_code == 200
        body = resp.json()
        assert body["client_request_id"] == "reused-1" and resp.headers["x-request-id"] == body["request_id"]
        ids.append(body["request_id"])
    assert ids[0] != ids[1]
    deadline = time.monotonic() + 15
    rows = []
    while time.monotonic() < deadline and len(rows) < 2:
        with sqlite3.connect(f"file:{server.log_path}?mode=ro", uri=True, timeout=10) as conn:
            rows = conn.execute("SELECT p.request_id, CAST(i.data AS TEXT) FROM predictions p JOIN inputs i USING (request_id, item) "
                                "WHERE p.client_request_id = 'reused-1' AND i.modality = 'text' ORDER BY p.ts").fetchall()  # fmt: skip
        time.sleep(0.2)
    assert rows == [(ids[0], "red apple"), (ids[1], "blue wave")]


def _slow_connection(port: int, length: int = 1000) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )
    return s


def test_slow_bodies_are_cut_off_and_good_requests_keep_being_served(server):
    """60 connections dripping a byte a second: each gets a 408 JSON at the body timeout; good requests get 200."""
    port = int(server.url.rsplit(":", 1)[1])
    slow = [_slow_connection(port) for _ in range(60)]
    stop = threading.Event()

    def drip():
        while not stop.wait(1.0):
            for s in slow:
                try:
                    s.send(b"x")
                except OSError:
                    pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    t0 = time.monotonic()
    try:
        codes = []
        while time.monotonic() - t0 < TEST_SERVICE["body_timeout_s"]:
            resp = httpx.post(f"{server.url}/classify", data={"text": "red apple"}, timeout=TIMEOUT)
            codes.append(resp.status_code)
        assert codes and set(codes) == {200}
        # stop dripping before reading: a byte sent after the server's 408 + close draws a TCP reset,
        # which can discard the answer still unread in the socket (a stalled body times out the same way)
        stop.set()
        dripper.join(5)
        answers = []
        for s in slow:
            s.settimeout(TEST_SERVICE["body_timeout_s"] + 10)
            data = b""
            while True:
                try:
                    chunk = s.recv(4096)
                except ConnectionResetError:
                    break
                if not chunk:  # the answer ends with the connection (Connection: close)
                    break
                data += chunk
            answers.append(data)
    finally:
        stop.set()
        dripper.join(5)
        for s in slow:
            s.close()
    for data in answers:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head[:100]
        assert json.loads(body)["reason"] == "body_timeout"
    assert_good_request(server)

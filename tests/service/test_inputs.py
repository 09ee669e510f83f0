"""Input safety and settings without a server (fast)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from mmfusion.config import ServeLimits
from mmfusion.serving.guard import _normalise_error
from mmfusion.serving.inputs import RequestError, check_item, decode_base64, sniff_format
from mmfusion.serving.settings import build_bento_args, load_settings, resolve_batching

LIMITS = ServeLimits(max_upload_bytes=50_000, max_pixels=10_000, max_text_chars=20)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def reason(fn, *args) -> tuple[int, str]:
    with pytest.raises(RequestError) as exc:
        fn(*args)
    return exc.value.status, exc.value.reason


def test_valid_items():
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    item = check_item(encode(rgba, "PNG"), "  Red Apple ", LIMITS)
    assert item.image.mode == "RGB" and item.image.size == (40, 30)
    assert item.image.getpixel((0, 0)) == (255, 255, 255)  # alpha flattened by the shared decode path
    assert item.text == "  Red Apple " and item.image_format == "PNG" and item.modalities == ["image", "text"]
    assert item.image_bytes is None and item.image_nbytes > 0
    assert check_item(None, "leaf", LIMITS).modalities == ["text"]
    assert check_item(encode(Image.new("RGB", (8, 8)), "JPEG"), None, LIMITS, keep_bytes=True).image_bytes


@pytest.mark.parametrize(
    "data, text, expected",
    [
        (None, None, (400, "no_input")),
        (None, " \t ", (400, "no_input")),
        (None, "x" * 21, (400, "text_too_long")),
        (b"", "ok", (400, "empty_image")),
        (b"\x89PNG\r\n\x1a\nbroken", None, (400, "undecodable_image")),
        (b"x" * 50_001, None, (413, "upload_too_large")),
        (encode(Image.new("RGB", (101, 100)), "PNG"), None, (413, "image_too_large")),
        (encode(Image.new("RGB", (8, 8)), "TIFF"), None, (415, "unsupported_format")),
    ],
)
def test_refused_items(data, text, expected):
    assert reason(check_item, data, text, LIMITS) == expected


def test_sniff_reads_only_the_header():
    assert sniff_format(encode(Image.new("RGB", (8, 8)), "PNG")) == "PNG"
    assert sniff_format(b"hello") is None


def test_base64():
    raw = encode(Image.new("RGB", (8, 8)), "PNG")
    assert decode_base64(base64.b64encode(raw).decode(), LIMITS) == raw
    assert decode_base64("data:image/png;base64," + base64.b64encode(raw).decode(), LIMITS) == raw
    assert reason(decode_base64, "not base64!", LIMITS) == (400, "invalid_base64")
    assert reason(decode_base64, "A" * 80_000, LIMITS) == (413, "upload_too_large")


def test_bentoml_error_bodies_are_normalised():
    start = {"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]}
    new_start, body = _normalise_error(start, b'[{"error": "field must be a file"}]')
    data = json.loads(body["body"])
    assert data == {"error": "field must be a file", "reason": "invalid_request", "status": 400}
    assert (b"content-length", str(len(body["body"])).encode()) in new_start["headers"]


def test_batching_resolution():
    assert resolve_batching("true", "cpu") is True
    assert resolve_batching(True, "auto") is True
    assert resolve_batching("false", "cuda") is False
    assert resolve_batching("auto", "cpu") is False
    with pytest.raises(ValueError, match="auto, true or false"):
        resolve_batching("sometimes", "cpu")


def test_settings_from_bento_args_and_env(tmp_path, monkeypatch):
    from mmfusion.config import PackageParams

    args = build_bento_args(PackageParams(), "mmfusion:v1", tmp_path)
    assert args["package"]["log"]["path"] == str((tmp_path / "logs/inference.sqlite").resolve())
    monkeypatch.delenv("MMFUSION_MODEL", raising=False)
    monkeypatch.delenv("MMFUSION_INFERENCE_LOG", raising=False)
    s = load_settings(args)
    assert s.model_tag == "mmfusion:v1" and s.log_path == tmp_path.resolve() / "logs/inference.sqlite"
    s = load_settings({"package": json.dumps({"batching": {"enabled": "true"}, "limits": {"max_text_chars": 5}})})
    assert s.batching and s.params.limits.max_text_chars == 5 and s.model_tag == "mmfusion:latest"
    monkeypatch.setenv("MMFUSION_MODEL", "mmfusion:other")
    monkeypatch.setenv("MMFUSION_INFERENCE_LOG", str(tmp_path / "x.sqlite"))
    s = load_settings(args)
    assert s.model_tag == "mmfusion:other" and s.log_path == tmp_path / "x.sqlite"
    with pytest.raises(ValueError, match="package.limits.max_txt"):
        load_settings({"package": {"limits": {"max_txt": 1}}})

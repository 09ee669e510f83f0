"""Input safety and settings without a server (fast)."""

from __future__ import annotations

import base64
import io
import json
import zlib

import pytest
from PIL import Image

from mmfusion.bentos import build_bento_args
from mmfusion.config import ServeLimits
from mmfusion.serving.guard import _normalise_error
from mmfusion.modalities.text import normalize_text, text_or_none
from mmfusion.modalities import specs_for
from mmfusion.modalities.image import sniff_format
from mmfusion.serving.inputs import CheckContext, RequestError, check_item, decode_base64
from mmfusion.serving.settings import load_settings, resolve_batching

LIMITS = ServeLimits(max_upload_bytes=50_000, max_pixels=10_000, max_text_chars=20)
CTX = CheckContext(LIMITS)
MODALITIES = ("image", "text")


def item(data, text, ctx=CTX, modalities=MODALITIES):
    return check_item({"image": data, "text": text}, specs_for(modalities), ctx)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height (a decompression bomb's header, CRC fixed)."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def reason(fn, *args) -> tuple[int, str]:
    with pytest.raises(RequestError) as exc:
        fn(*args)
    return exc.value.status, exc.value.reason


def test_valid_items():
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    checked = item(encode(rgba, "PNG"), "  Red Apple ")
    image = checked.values["image"]
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # alpha flattened by the shared decode path
    assert checked.values["text"] == "  Red Apple " and checked.modalities == ["image", "text"]
    fields = checked.record["fields"]
    assert fields["image_format"] == "PNG" and (fields["image_width"], fields["image_height"]) == (40, 30)
    assert fields["image_bytes"] > 0 and fields["text_chars"] == len("  Red Apple ")
    assert checked.record["kept"] == {} and checked.record["modalities"] == ["image", "text"]
    assert item(None, "leaf").modalities == ["text"]
    jpeg = encode(Image.new("RGB", (8, 8)), "JPEG")
    kept = item(jpeg, " Leaf ", CheckContext(LIMITS, keep={"image": True, "text": True})).record["kept"]
    assert kept == {"image": ("JPEG", jpeg), "text": ("text", b" Leaf ")}  # the upload as sent, the text as checked
    assert item(jpeg, " Leaf ", CheckContext(LIMITS, keep={"text": True})).record["kept"] == {"text": ("text", b" Leaf ")}


def test_text_empty_after_normalisation_counts_as_none():
    """The check and the Predictor share text_or_none: what the check lets through, the model can take."""
    for blank in ("\x01\x02", "\u200b", "\u200b\u200d\ufeff", " \t\n", "\x00"):
        assert text_or_none(blank) is None
        assert reason(item, None, blank) == (400, "no_input")
        assert item(encode(Image.new("RGB", (8, 8)), "PNG"), blank).modalities == ["image"]  # the text is dropped
    assert item(None, "a\u200bb").values["text"] == "a\u200bb" and text_or_none("A\u200bB") == "ab"
    assert text_or_none("A\u200bB", lowercase=False) == normalize_text("A\u200bB", lowercase=False) == "AB"


def test_invalid_text_and_modalities():
    assert reason(item, None, "bad \ud800 surrogate") == (400, "invalid_text")
    assert reason(item, None, 42) == (400, "invalid_text")
    assert reason(item, encode(Image.new("RGB", (8, 8)), "PNG"), None, CTX, ("text",)) == (400, "unsupported_modality")
    assert item(None, "leaf", CTX, ("text",)).modalities == ["text"]


def test_messages_speak_about_the_request():
    huge = png_declaring(100_000, 100_000)
    for data in (b"GIF89a" + b"\0" * 40, b"no image here", encode(Image.new("RGB", (8, 8)), "PNG")[:30], huge):
        with pytest.raises(RequestError) as exc:
            item(data, None)
        assert "object at 0x" not in str(exc.value) and "BytesIO" not in str(exc.value), str(exc.value)
    with pytest.raises(RequestError) as exc:
        item(huge, None)
    assert exc.value.reason == "image_too_large" and "10000" in str(exc.value)


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
    assert reason(item, data, text) == expected


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
    new_start, body, _ = _normalise_error(start, b'[{"error": "field must be a file"}]')
    data = json.loads(body["body"])
    assert data == {"error": "field must be a file", "reason": "invalid_request", "status": 400}
    assert (b"content-length", str(len(body["body"])).encode()) in new_start["headers"]
    _, body, _ = _normalise_error(start, b'[{"error": "[invalid_text] field \'text\' is not valid UTF-8 text"}]')
    assert json.loads(body["body"])["reason"] == "invalid_text"
    plain = {"type": "http.response.start", "status": 405, "headers": [(b"content-type", b"text/plain")]}
    new_start, body, _ = _normalise_error(plain, b"Method Not Allowed", "GET", "/classify")
    assert json.loads(body["body"]) == {"error": "GET is not allowed on /classify: use POST", "reason": "method_not_allowed", "status": 405}
    assert (b"content-type", b"application/json") in new_start["headers"]


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
    assert args["package"]["log"]["url"] == f"sqlite:///{(tmp_path / 'logs/inference.sqlite').resolve()}"
    monkeypatch.delenv("MMFUSION_MODEL", raising=False)
    monkeypatch.delenv("MMFUSION_INFERENCE_LOG", raising=False)
    s = load_settings(args)
    assert s.model_tag == "mmfusion:v1" and s.log_url.database == str(tmp_path.resolve() / "logs/inference.sqlite")
    s = load_settings({"package": json.dumps({"batching": {"enabled": "true"}, "limits": {"max_text_chars": 5}})})
    assert s.batching and s.params.limits.max_text_chars == 5 and s.model_tag == "mmfusion:latest"
    monkeypatch.setenv("MMFUSION_MODEL", "mmfusion:other")
    monkeypatch.setenv("MMFUSION_INFERENCE_LOG", str(tmp_path / "x.sqlite"))
    s = load_settings(args)
    assert s.model_tag == "mmfusion:other" and s.log_url.database == str(tmp_path / "x.sqlite")
    monkeypatch.setenv("MMFUSION_INFERENCE_LOG", "postgresql://svc:s3cret@db:5432/log")  # the deployment's secret
    assert load_settings(args).log_url.password == "s3cret"
    with pytest.raises(ValueError, match="package.limits.max_txt"):
        load_settings({"package": {"limits": {"max_txt": 1}}})


def test_a_log_url_with_a_password_is_never_baked_into_a_bento(tmp_path):
    from mmfusion.config import InferenceLogParams, PackageParams

    params = PackageParams(log=InferenceLogParams(url="postgresql://svc:s3cret@db:5432/log"))
    with pytest.raises(ValueError, match="holds a password") as exc:
        build_bento_args(params, "mmfusion:v1", tmp_path)
    assert "s3cret" not in str(exc.value) and "***" in str(exc.value)
    params = PackageParams(log=InferenceLogParams(url="postgresql://svc@db:5432/log"))  # PGPASSWORD at serve time
    assert build_bento_args(params, "mmfusion:v1", tmp_path)["package"]["log"]["url"] == "postgresql+psycopg://svc@db:5432/log"


def test_previews_are_drawn_per_modality_and_a_failing_one_never_fails_the_request(monkeypatch):
    png = encode(Image.new("RGB", (64, 48), "red"), "PNG")
    assert item(png, "a red apple").record["previews"] == {}  # none drawn (share 0): none made
    checked = item(png, "A red apple", ctx=CheckContext(LIMITS, previews={"image": True, "text": False}))
    assert set(checked.record["previews"]) == {"image"} and checked.record["previews"]["image"][0] == "image/webp"
    both = item(png, "A red apple", ctx=CheckContext(LIMITS, previews={"image": True, "text": True}))
    assert both.record["previews"]["text"] == ("text/plain", b"a red apple") and both.record["kept"] == {}
    from mmfusion.modalities.image import ImageSpec

    monkeypatch.setattr(ImageSpec, "preview", lambda self, value: 1 / 0)
    broken = item(png, "A red apple", ctx=CheckContext(LIMITS, previews={"image": True, "text": True}))
    assert set(broken.record["previews"]) == {"text"} and broken.modalities == ["image", "text"]

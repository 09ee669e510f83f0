"""Input safety for the service: every client mistake becomes a `RequestError` (a 4xx with a message).

Checks, cheapest first: at least one modality, text length, upload size, image format
(from the header, before decoding), pixel count (decompression bombs) and finally the one
decode path, `mmfusion.data.images.decode_image`.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from mmfusion.config import ServeLimits
from mmfusion.data.images import ImageDecodeError, decode_image


class RequestError(Exception):
    """A client mistake: HTTP `status` (4xx), a machine-readable `reason` and a message for a person."""

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


@dataclass
class CheckedItem:
    """One validated input: what the Predictor gets, plus what the inference log records."""

    image: Image.Image | None
    text: str | None
    image_format: str | None = None
    image_nbytes: int | None = None  # size of the upload
    image_bytes: bytes | None = None  # the upload itself, only kept when raw images are logged

    def to_predictor(self) -> dict:
        return {"image": self.image, "text": self.text}

    @property
    def modalities(self) -> list[str]:
        return [m for m, v in (("image", self.image), ("text", self.text)) if v is not None]


def sniff_format(data: bytes) -> str | None:
    """The image format from the file header (PIL name: PNG, JPEG...), None when unrecognised; decodes nothing."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def check_image(data: bytes, limits: ServeLimits) -> tuple[Image.Image, str]:
    """Decode uploaded bytes into an RGB image under the limits; returns (image, format)."""
    if len(data) == 0:
        raise RequestError(400, "empty_image", "the image upload is empty")
    if len(data) > limits.max_upload_bytes:
        raise RequestError(
            413, "upload_too_large", f"image is {len(data)} bytes, over the limit of {limits.max_upload_bytes}"
        )
    fmt = sniff_format(data)
    allowed = {f.upper() for f in limits.allowed_formats}
    if fmt is not None and fmt.upper() not in allowed:
        raise RequestError(
            415, "unsupported_format", f"image format {fmt} is not accepted; allowed: {', '.join(sorted(allowed))}"
        )
    try:
        image = decode_image(data, max_pixels=limits.max_pixels)
    except ImageDecodeError as exc:
        status = 413 if exc.reason == "image_too_large" else 400
        raise RequestError(status, exc.reason, str(exc)) from exc
    return image, fmt or "unknown"


def check_text(text: object, limits: ServeLimits) -> str | None:
    """The text as given (the Predictor normalises it), None when absent or blank."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise RequestError(400, "invalid_text", f"text must be a string, got {type(text).__name__}")
    if len(text) > limits.max_text_chars:
        raise RequestError(
            400, "text_too_long", f"text has {len(text)} characters, over the limit of {limits.max_text_chars}"
        )
    return text if text.strip() else None


def check_item(image_data: bytes | None, text: object, limits: ServeLimits, keep_bytes: bool = False) -> CheckedItem:
    """Validate one request item (raw image bytes and/or text); at least one modality must be present."""
    text = check_text(text, limits)
    if image_data is None and text is None:
        raise RequestError(400, "no_input", "send an image, a text, or both (a blank text does not count)")
    image = fmt = None
    if image_data is not None:
        image, fmt = check_image(image_data, limits)
    return CheckedItem(
        image=image,
        text=text,
        image_format=fmt,
        image_nbytes=len(image_data) if image_data is not None else None,
        image_bytes=image_data if keep_bytes else None,
    )


def decode_base64(value: str, limits: ServeLimits) -> bytes:
    """Bytes from a base64 string (a `data:` URL prefix is accepted); 400 on malformed input."""
    if "," in value[:100] and value.startswith("data:"):
        value = value.split(",", 1)[1]
    # base64 inflates by 4/3: refuse before decoding anything absurd
    if len(value) * 3 // 4 > limits.max_upload_bytes:
        raise RequestError(413, "upload_too_large", f"image is over the limit of {limits.max_upload_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "invalid_base64", f"image is not valid base64: {exc}") from exc

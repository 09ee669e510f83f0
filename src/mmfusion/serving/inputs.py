"""Input safety for the service: every client mistake becomes a `RequestError` (a 4xx with a message).

This module is the one place that knows the HTTP API's name and check for each modality
(`CHECKS`: `image` = uploaded bytes, `text` = a string); the service takes the list of
modalities from the model, so a model without a modality refuses that field.

Checks, cheapest first: text validity and length, upload size, image format (from the header,
before decoding), pixel count (decompression bombs) and finally the one decode path,
`mmfusion.data.images.decode_image`. "No text" has one rule, `mmfusion.data.text.text_or_none`,
which the Predictor uses too: a text of control or zero-width characters only counts as absent.
Messages speak about the request (sizes, formats, limits), never about Python objects.
"""

from __future__ import annotations

import base64
import binascii
import io
import typing as t
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from mmfusion.config import ServeLimits
from mmfusion.data.images import ImageDecodeError, decode_image
from mmfusion.data.text import text_or_none


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


@dataclass(frozen=True)
class CheckContext:
    """What the checks need besides the input: the limits and the model's own text setting."""

    limits: ServeLimits
    lowercase: bool = True  # the model's normalize_text setting (Predictor.lowercase)
    keep_bytes: bool = False  # keep raw image bytes for the inference log (log_images)


@dataclass
class CheckedItem:
    """One validated input: `values` is what the Predictor gets ({modality: value}, present ones only),
    `record` what the inference log stores about the inputs (InferenceRecord fields)."""

    values: dict[str, t.Any]
    record: dict[str, t.Any] = field(default_factory=dict)

    def to_predictor(self) -> dict:
        return dict(self.values)

    @property
    def modalities(self) -> list[str]:
        return list(self.values)


def sniff_format(data: bytes) -> str | None:
    """The image format from the file header (PIL name: PNG, JPEG...), None when unrecognised; decodes nothing."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def check_image(data: bytes, limits: ServeLimits) -> tuple[Image.Image, str]:
    """Decode uploaded bytes into an RGB image under the limits; returns (image, format)."""
    if not isinstance(data, (bytes, bytearray)):
        raise RequestError(400, "invalid_image", "image must be uploaded as a file (bytes)")
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
        if exc.reason == "image_too_large":
            # PIL refuses absurd sizes itself before our check, with its own limit in the message
            raise RequestError(
                413, "image_too_large", f"image has more pixels than the limit of {limits.max_pixels} (width x height)"
            ) from exc
        what = f"a {fmt} file" if fmt else "an image in a known format"
        allowed_list = ", ".join(sorted(allowed))
        raise RequestError(
            400, "undecodable_image", f"the upload ({len(data)} bytes) is not {what} that decodes: truncated or corrupt; "
            f"send a complete {allowed_list} file"
        ) from exc  # fmt: skip
    except (MemoryError, Image.DecompressionBombError) as exc:
        raise RequestError(413, "image_too_large", f"image is too large to decode (limit {limits.max_pixels} pixels)") from exc
    return image, fmt or "unknown"


def check_text(text: object, ctx: CheckContext) -> str | None:
    """The text as given (the Predictor normalises it), None when it is empty after normalisation."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise RequestError(400, "invalid_text", f"text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from a JSON \ud800 escape
        raise RequestError(400, "invalid_text", f"text is not valid Unicode (character {exc.start} is a lone surrogate)") from exc
    if len(text) > ctx.limits.max_text_chars:
        raise RequestError(
            400, "text_too_long", f"text has {len(text)} characters, over the limit of {ctx.limits.max_text_chars}"
        )
    return text if text_or_none(text, lowercase=ctx.lowercase) is not None else None


def _image(raw: t.Any, ctx: CheckContext) -> tuple[t.Any, dict]:
    image, fmt = check_image(raw, ctx.limits)
    record = {"image_size": image.size, "image_format": fmt, "image_bytes": len(raw)}
    if ctx.keep_bytes:
        record["image_data"] = bytes(raw)
    return image, record


def _text(raw: t.Any, ctx: CheckContext) -> tuple[t.Any, dict]:
    text = check_text(raw, ctx)
    return text, ({"text": text} if text is not None else {})


# The HTTP field of each modality and its check: raw request value -> (Predictor input or None, log fields).
CHECKS: dict[str, t.Callable[[t.Any, CheckContext], tuple[t.Any, dict]]] = {"image": _image, "text": _text}


def supported(modalities: t.Iterable[str]) -> None:
    """Fail at start-up, not per request, when the model has a modality the HTTP API cannot take."""
    missing = [m for m in modalities if m not in CHECKS]
    if missing:
        raise ValueError(f"the service has no input check for modalities {missing}; add them to serving/inputs.py CHECKS")


def check_item(raw: t.Mapping[str, t.Any], modalities: t.Sequence[str], ctx: CheckContext) -> CheckedItem:
    """Validate one request item ({field: raw value}) for a model with `modalities`; at least one must be present."""
    given = {m: v for m, v in raw.items() if v is not None}
    extra = sorted(set(given) - set(modalities))
    if extra:
        raise RequestError(400, "unsupported_modality", f"this model takes {list(modalities)}, not {extra}")
    values: dict[str, t.Any] = {}
    record: dict[str, t.Any] = {}
    # texts first: cheap, and an empty text must not cost an image decode
    for m in sorted(given, key=lambda m: m != "text"):
        value, rec = CHECKS[m](given[m], ctx)
        record.update(rec)
        if value is not None:
            values[m] = value
    if not values:
        blank = " (the text is empty after normalisation: only whitespace, control or zero-width characters)" if given else ""
        raise RequestError(400, "no_input", f"send at least one of {list(modalities)}{blank}")
    return CheckedItem(values={m: values[m] for m in modalities if m in values}, record=record)


def decode_base64(value: object, limits: ServeLimits) -> bytes:
    """Bytes from a base64 string (a `data:` URL prefix is accepted); 400 on malformed input."""
    if not isinstance(value, str):
        raise RequestError(400, "invalid_base64", f"image must be a base64 string, got {type(value).__name__}")
    if "," in value[:100] and value.startswith("data:"):
        value = value.split(",", 1)[1]
    # base64 inflates by 4/3: refuse before decoding anything absurd
    if len(value) * 3 // 4 > limits.max_upload_bytes:
        raise RequestError(413, "upload_too_large", f"image is over the limit of {limits.max_upload_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "invalid_base64", f"image is not valid base64 ({len(value)} characters): {exc}") from exc

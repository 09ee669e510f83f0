"""The image modality: files under `images/`, decoded by the one `decode_image`, uploaded as files.

Reading: the file's bytes key the cache; decoding flattens alpha onto the recorded `background`
(the model folder's, so the service decodes exactly as featurize did). A request's image is checked
cheapest first: upload size, format from the header (before decoding), pixel count (decompression
bombs), then the decode itself.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmfusion.data.images import ImageDecodeError, decode_image
from mmfusion.errors import RequestError
from mmfusion.modalities.base import ModalitySpec, register_modality


def sniff_format(data: bytes) -> str | None:
    """The image format from the file header (PIL name: PNG, JPEG...), None when unrecognised; decodes nothing."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def check_image(data: bytes, limits: Any, background: tuple[int, int, int] = (255, 255, 255)) -> tuple[Image.Image, str]:
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
        image = decode_image(data, background=background, max_pixels=limits.max_pixels)
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


@register_modality
class ImageSpec(ModalitySpec):
    """Images: a path relative to the project root in the manifest's `image` column."""

    name = "image"
    column = "image"
    folder = "images"
    http = "file"
    stats = ("image_width", "image_height")
    parallel_load = True
    defaults = {"background": [255, 255, 255]}  # alpha is flattened onto it (emoji have alpha)

    @classmethod
    def settings_from_params(cls, params: Any) -> dict[str, Any]:
        return {"background": [int(c) for c in params.clean.background]}

    @property
    def background(self) -> tuple[int, int, int]:
        return tuple(int(c) for c in self.settings["background"])  # type: ignore[return-value]

    def content(self, value: str) -> bytes:
        try:
            return (self.root / value).read_bytes()
        except OSError as exc:
            raise ImageDecodeError("missing_image", f"cannot read image {value}: {exc.strerror or exc}") from exc

    def load(self, value: str) -> Image.Image:
        return decode_image(self.root / value, background=self.background)

    def measure(self, value: str) -> dict[str, float]:
        try:
            with Image.open(self.root / value) as img:
                return {"image_width": float(img.width), "image_height": float(img.height)}
        except (OSError, ValueError):
            return {"image_width": float("nan"), "image_height": float("nan")}

    def check(self, raw: Any, ctx: Any) -> tuple[Any | None, dict[str, Any]]:
        image, fmt = check_image(raw, ctx.limits, self.background)
        record = {"image_size": image.size, "image_format": fmt, "image_bytes": len(raw)}
        if ctx.keep_bytes:
            record["image_data"] = bytes(raw)
        return image, record

    def example(self) -> Image.Image:
        return Image.new("RGB", (64, 64), "white")

"""The image modality: files under `images/`, decoded by the one `decode_image`, uploaded as files.

Reading: the file's bytes key the cache; decoding flattens alpha onto the recorded `background`
(the model folder's, so the service decodes exactly as featurize did). A request's image is checked
cheapest first: upload size, format from the header (before decoding), pixel count (decompression
bombs), then the decode itself. Cleaning decodes the raw file the same way, checks the size and saves
a PNG under `images/`; duplicates are told by the raw file's SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from mmfusion.errors import RequestError
from mmfusion.modalities.base import Dropped, InputDecodeError, ModalitySpec, register_modality

if TYPE_CHECKING:
    import pandas as pd


# The one decode path (cleaning, augmentation, featurizing, serving): open, fully load (so truncated
# files fail here, not later), refuse decompression bombs, and flatten any alpha onto a background colour.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(InputDecodeError):
    """An image could not be decoded; `reason` is a short machine-readable code."""


def decode_image(
    data: bytes | str | Path,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode bytes or a file into an RGB image, alpha flattened onto `background`."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > max_pixels:
                    raise ImageDecodeError(
                        "image_too_large", f"image has {img.width}x{img.height} pixels, over the limit of {max_pixels}"
                    )
                img.load()
                return to_rgb(img, background)
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError("missing_image", f"image file not found: {exc.filename}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("image_too_large", str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("undecodable_image", f"cannot decode image: {exc}") from exc


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB copy of `img`; transparent pixels become `background` (emoji have alpha)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


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


# Augmentation (the augment stage): a mild, seeded torchvision v2 view at the image's own size.


def build_image_transform(params: Any, size: tuple[int, int]):
    """The mild image augmentation: random resized crop, small rotation, colour jitter, optional flip."""
    from torchvision.transforms import v2  # torch: only augmentation pays for it

    height, width = size
    steps: list = [
        v2.RandomResizedCrop((height, width), scale=params.crop_scale, ratio=(0.9, 1.1), antialias=True),
        v2.RandomRotation(params.rotation, fill=255),
        v2.ColorJitter(params.brightness, params.contrast, params.saturation, params.hue),
    ]
    if params.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def augment_image(img: Image.Image, params: Any, seed: int) -> Image.Image:
    """One seeded view of an RGB image, at the image's own size."""
    import torch

    transform = build_image_transform(params, (img.height, img.width))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


PREVIEW_SIDE = 96  # px, the longest side of a preview thumbnail (the drift report's examples)
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}  # a kept upload's file name


@register_modality
class ImageSpec(ModalitySpec):
    """Images: a path relative to the project root in the manifest's `image` column."""

    name = "image"
    column = "image"
    folder = "images"
    http = "file"
    stats = ("image_width", "image_height")
    log_fields = ("image_format", "image_bytes")
    column_types = {"image_width": "int", "image_height": "int", "image_bytes": "int"}
    keep_share = 0.0  # raw images are large and may be private: kept only where package.log.keep says
    # a 96 px thumbnail of every request for the drift report's examples (a few hundred bytes to a few KB; users'
    # pictures, small): package.log.previews: {image: 0} stores none
    preview_share = 1.0
    parallel_load = True
    defaults = {"background": [255, 255, 255]}  # alpha is flattened onto it (emoji have alpha)
    clean_fields = {"width": 0, "height": 0, "image_sha256": ""}
    dedup_key = "image_sha256"  # of the raw file: the same picture under another name is a duplicate

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
        return image, {"image_width": image.width, "image_height": image.height, "image_format": fmt,
                       "image_bytes": len(raw)}  # fmt: skip

    def kept(self, raw: Any, value: Any, fields: dict[str, Any]) -> tuple[str | None, bytes]:
        return fields.get("image_format"), bytes(raw)

    def suffix(self, fmt: str | None) -> str:
        return SUFFIXES.get(str(fmt).upper(), ".img")

    def preview(self, value: Image.Image) -> tuple[str, bytes]:
        """A WebP thumbnail, longest side PREVIEW_SIDE px (never enlarged)."""
        scale = min(1.0, PREVIEW_SIDE / max(value.size))
        thumb = value if scale >= 1.0 else value.resize(
            (max(1, round(value.width * scale)), max(1, round(value.height * scale))), Image.Resampling.BICUBIC, reducing_gap=2.0
        )  # fmt: skip
        buf = io.BytesIO()
        # method 2: 0.6 ms per 72 px emoji vs 1.5 ms at the default 4, 3% larger (a per-request cost when serving)
        thumb.convert("RGB").save(buf, format="WEBP", quality=80, method=2)
        return "image/webp", buf.getvalue()

    def example(self) -> Image.Image:
        return Image.new("RGB", (64, 64), "white")

    def parts(self, value: Image.Image, explain: Any) -> Any:
        from mmfusion.modalities.parts import RegionParts

        return RegionParts(value, explain.image_grid)

    def clean(self, raw: str, data: bytes | None, out_root: Path, params: Any) -> dict[str, Any]:
        """Decode the raw file (alpha onto `clean.background`), check its size and save it as PNG."""
        try:
            img = decode_image(data, background=params.background)
        except ImageDecodeError as exc:
            raise Dropped(exc.reason, str(exc)) from exc
        if min(img.size) < params.min_image_size:
            raise Dropped("image_too_small", f"{img.width}x{img.height} < clean.min_image_size={params.min_image_size}")
        name = f"{self.folder}/{Path(raw).stem}.png"
        img.save(out_root / name, format="PNG")
        sha256 = hashlib.sha256(data).hexdigest()
        return {self.column: name, "width": img.width, "height": img.height, "image_sha256": sha256}

    def augment(self, value: str, params: Any, views: Any, out_root: Path) -> list[str]:
        """Decode once, then save one torchvision v2 view per seed as `images/<name>.png`."""
        img = self.load(value)
        names = []
        for seed, name in views:
            names.append(f"{self.folder}/{name}.png")
            augment_image(img, params, seed).save(out_root / names[-1], format="PNG")
        return names

    def validation_columns(self, df: pd.DataFrame, root: Path) -> dict[str, Any]:
        return {"image_exists": [bool(p) and (root / p).is_file() for p in df[self.column]]}

    def expectations(self, gxe: Any, params: Any, where: Any) -> list:
        lo, hi = params.image_size
        return [
            gxe.ExpectColumnValuesToBeBetween(column="width", min_value=lo, max_value=hi, **where),
            gxe.ExpectColumnValuesToBeBetween(column="height", min_value=lo, max_value=hi, **where),
            gxe.ExpectColumnValuesToBeInSet(column="image_exists", value_set=[True], **where),
            gxe.ExpectColumnValuesToMatchRegex(column="image_sha256", regex=r"^[0-9a-f]{64}$", **where),
        ]

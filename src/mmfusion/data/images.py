"""Image decoding shared by cleaning, augmentation, featurizing and serving.

One decode path: open, fully load (so truncated files fail here, not later),
refuse decompression bombs, and flatten any alpha onto a background colour.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """An image could not be decoded; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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

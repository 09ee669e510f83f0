"""The parts of one input that an explanation attributes a prediction to: words, image regions, time segments.

A modality's spec says how its values come apart (`ModalitySpec.parts`, one class here per kind of
part). Each `Parts` knows its elements (`names`), how to rebuild the value with some of them removed
(`rebuild(keep)`: a perturbation the real encoders then see, so attributions go through whatever runtime
serves, ONNX and int8 included) and how to describe attributions for an answer (`describe`).

    words    text: the normalised text's words; a removed word is left out of the text
    regions  images: an N x N grid of cells; a removed cell is filled with the image's mean colour
    segments audio: N equal time segments; a removed segment is silenced
    whole    any other modality: the value is one part, removed means missing

A value with every part removed is a missing modality (None), as the Predictor takes it.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WORD = re.compile(r"\S+")


@dataclass
class Parts:
    """A value as parts: `names` label them (a word, a cell, a time span); `rebuild(keep)` is the value with only
    the parts where `keep` is True; `describe(attr)` is the JSON an answer carries."""

    kind: str
    value: Any
    names: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.names)

    def rebuild(self, keep: np.ndarray) -> Any:
        return self.value if bool(np.asarray(keep).any()) else None

    def describe(self, attr: np.ndarray) -> dict[str, Any]:
        return {"kind": self.kind, "parts": [{"part": n, "attribution": _r(a)} for n, a in zip(self.names, attr)]}


class WholeParts(Parts):
    def __init__(self, value: Any):
        super().__init__("whole", value, ["whole"])


class WordParts(Parts):
    """A text's words (whitespace-separated, as the text normaliser leaves them); a removed word is left out."""

    def __init__(self, text: str):
        self.spans = [m.span() for m in WORD.finditer(text)]
        super().__init__("words", text, [text[a:b] for a, b in self.spans])

    def rebuild(self, keep: np.ndarray) -> str | None:
        words = [w for w, k in zip(self.names, np.asarray(keep, bool)) if k]
        return " ".join(words) or None

    def describe(self, attr: np.ndarray) -> dict[str, Any]:
        return {"kind": self.kind, "parts": [{"word": w, "start": a, "end": b, "attribution": _r(v)}
                                             for w, (a, b), v in zip(self.names, self.spans, attr)]}  # fmt: skip


class RegionParts(Parts):
    """An image as a `grid` x `grid` grid of cells; a removed cell is filled with the image's mean colour (the
    occlusion baseline that keeps the image's overall colour, so only the cell's content goes)."""

    def __init__(self, image: Any, grid: int):
        self.grid = max(1, min(int(grid), image.width, image.height))
        self.pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        self.fill = self.pixels.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
        h, w = self.pixels.shape[:2]
        self.ys = np.linspace(0, h, self.grid + 1).round().astype(int)
        self.xs = np.linspace(0, w, self.grid + 1).round().astype(int)
        super().__init__("regions", image, [f"r{r}c{c}" for r in range(self.grid) for c in range(self.grid)])

    def rebuild(self, keep: np.ndarray) -> Any:
        from PIL import Image

        keep = np.asarray(keep, bool)
        if not keep.any():
            return None
        if keep.all():
            return self.value
        out = self.pixels.copy()
        for k in np.flatnonzero(~keep):
            r, c = divmod(int(k), self.grid)
            out[self.ys[r] : self.ys[r + 1], self.xs[c] : self.xs[c + 1]] = self.fill
        return Image.fromarray(out, "RGB")

    def heat(self, attr: np.ndarray) -> np.ndarray:
        return np.asarray(attr, dtype=np.float64).reshape(self.grid, self.grid)

    def describe(self, attr: np.ndarray) -> dict[str, Any]:
        h, w = self.pixels.shape[:2]
        return {"kind": self.kind, "grid": [self.grid, self.grid], "size": [w, h],
                "attributions": [[_r(v) for v in row] for row in self.heat(attr)]}  # fmt: skip

    def overlay_png(self, attr: np.ndarray, size: int = 256) -> bytes:
        """The image with its attribution heatmap over it (red: for the prediction, blue: against), as PNG."""
        return png_bytes(overlay(self.value, self.heat(attr), size))


class SegmentParts(Parts):
    """A waveform cut into `segments` equal time spans; a removed span is silenced."""

    def __init__(self, wave: np.ndarray, segments: int, sample_rate: int):
        self.sample_rate = int(sample_rate)
        n = max(1, min(int(segments), wave.size))
        self.bounds = np.linspace(0, wave.size, n + 1).round().astype(int)
        names = [f"{a / sample_rate:.2f}-{b / sample_rate:.2f}s" for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        super().__init__("segments", wave, names)

    def rebuild(self, keep: np.ndarray) -> np.ndarray | None:
        keep = np.asarray(keep, bool)
        if not keep.any():
            return None
        out = np.array(self.value, dtype=np.float32, copy=True)
        for k in np.flatnonzero(~keep):
            out[self.bounds[k] : self.bounds[k + 1]] = 0.0
        return out

    def describe(self, attr: np.ndarray) -> dict[str, Any]:
        sr = self.sample_rate
        return {"kind": self.kind, "parts": [{"start_s": round(a / sr, 3), "end_s": round(b / sr, 3), "attribution": _r(v)}
                                             for a, b, v in zip(self.bounds[:-1], self.bounds[1:], attr)]}  # fmt: skip


def _r(v: float) -> float:
    return round(float(v), 5)


def overlay(image: Any, heat: np.ndarray, size: int = 256) -> Any:
    """`image` (PIL) resized to `size` on its longer side, a diverging heatmap of `heat` (grid) blended over it:
    red where a region raised the predicted class's probability, blue where it lowered it, scaled to the largest."""
    from matplotlib import colormaps
    from PIL import Image

    img = image.convert("RGB")
    scale = size / max(img.width, img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    top = float(np.abs(heat).max()) or 1.0
    rgba = colormaps["RdBu_r"]((np.asarray(heat) / top + 1) / 2)  # [g, g, 4] in 0..1; 0 attribution is white
    cells = Image.fromarray((rgba[..., :3] * 255).astype(np.uint8), "RGB").resize(img.size, Image.Resampling.NEAREST)
    alpha = Image.fromarray((np.abs(np.asarray(heat)) / top * 160).astype(np.uint8), "L").resize(img.size, Image.Resampling.NEAREST)
    return Image.composite(cells, img, alpha)


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

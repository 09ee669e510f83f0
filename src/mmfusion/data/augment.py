"""Seeded augmentation of the training split: image views (torchvision v2) and text perturbations.

Each view is seeded from (augment.seed, sample id, view index), so the same params give
the same bytes, whatever the order or number of workers.
"""

from __future__ import annotations

import hashlib
import random

import torch
from PIL import Image
from torchvision.transforms import v2

from mmfusion.config import AugmentParams


def view_seed(seed: int, sample_id: str, view: int) -> int:
    """A stable 63-bit seed for one view of one sample."""
    digest = hashlib.sha256(f"{seed}:{sample_id}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def build_image_transform(params: AugmentParams, size: tuple[int, int]) -> v2.Compose:
    """The mild image augmentation: random resized crop, small rotation, colour jitter, optional flip."""
    height, width = size
    steps: list = [
        v2.RandomResizedCrop((height, width), scale=params.crop_scale, ratio=(0.9, 1.1), antialias=True),
        v2.RandomRotation(params.rotation, fill=255),
        v2.ColorJitter(params.brightness, params.contrast, params.saturation, params.hue),
    ]
    if params.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def augment_image(img: Image.Image, params: AugmentParams, seed: int) -> Image.Image:
    """One seeded view of an RGB image, at the image's own size."""
    transform = build_image_transform(params, (img.height, img.width))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


def augment_text(text: str, params: AugmentParams, seed: int) -> str:
    """Seeded word dropout and one swap of neighbouring words; never returns an empty text."""
    rng = random.Random(seed)
    words = text.split()
    if len(words) <= 1:
        return text
    kept = [w for w in words if rng.random() >= params.word_dropout] or [rng.choice(words)]
    if params.word_swap and len(kept) > 1:
        i = rng.randrange(len(kept) - 1)
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    return " ".join(kept)

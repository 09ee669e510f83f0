"""Generated user datasets of awkward shapes, for the bring-your-own-data matrix (tests/e2e/test_byod.py).

Each builder writes a manifest + images under a folder and returns (manifest path, ingest.manifest
overrides, other param overrides). Images are small seeded drawings (fast to encode); the label
is in the colour and the text, so a model can learn something from 30-40 rows.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from tests.e2e.explanations import TINY_EXPLAIN

PALETTE = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40), (150, 60, 200), (40, 200, 200)]
WORDS = ["apple", "leaf", "ocean", "sun", "plum", "ice"]
MULTILINGUAL = ["rojo manzana 🍎", "grüner Baum 🌳", "синий океан 🌊", "黄色的太阳 ☀️", "برقوق بنفسجي", "氷 ❄️ 冷たい"]


def draw(color: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 40)) -> Image.Image:
    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in color)
    box = [rng.randint(0, w // 5), rng.randint(0, h // 5), rng.randint(w * 3 // 5, w - 1), rng.randint(h * 3 // 5, h - 1)]
    (d.ellipse if seed % 2 else d.rectangle)(box, fill=jitter)
    return img


def _rows(classes: int, per_class: int, images: Path, fmt: str = "PNG", seed: int = 0) -> list[dict]:
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(classes):
        for i in range(per_class):
            name = f"c{c:02d}_{i:02d}.{fmt.lower()}"
            draw(PALETTE[c % len(PALETTE)], seed=seed + 100 * c + i).save(images / name, format=fmt)
            rows.append({"image": f"images/{name}", "text": f"{WORDS[c % len(WORDS)]} {c} item {i}",
                         "label": f"class_{c:02d}", "group": f"c{c}-g{i // 2}"})  # fmt: skip
    return rows


def two_classes_parquet_mixed_formats_no_id(root: Path) -> tuple[Path, dict, dict]:
    """2 classes; a Parquet manifest without an id column; JPEG, WebP, GIF and large images."""
    rows = _rows(2, 16, root / "images")
    for k, row in enumerate(rows):
        fmt = ("JPEG", "WEBP", "GIF", "PNG")[k % 4]
        path = root / row["image"]
        img = Image.open(path).convert("RGB")
        if fmt == "PNG" and k % 8 == 3:
            img = img.resize((2400, 1800))  # a large photo-sized image
        new = path.with_suffix("." + fmt.lower().replace("jpeg", "jpg"))
        path.unlink()
        img.save(new, format=fmt)
        row["image"] = new.relative_to(root).as_posix()
    path = root / "manifest.parquet"
    pd.DataFrame(rows).drop(columns=["group"]).to_parquet(path, index=False)
    return path, {"group_column": ""}, {}


def partial_rows_multilingual_broken_no_group(root: Path) -> tuple[Path, dict, dict]:
    """Rows with only an image or only a text, long multilingual emoji-laden texts, corrupt and missing
    images, and no group column."""
    rows = _rows(3, 12, root / "images", seed=7)
    for k, row in enumerate(rows):
        c = int(row["label"][-2:])
        row["text"] = f"{MULTILINGUAL[c]} {row['text']}"
        if k % 9 == 4:
            row["text"] = (f"{MULTILINGUAL[c]} " * 60)[:1800]  # long: past the text encoder's 256 tokens
        if k % 6 == 1:
            row["image"] = ""  # text-only sample
        elif k % 6 == 2:
            row["text"] = ""  # image-only sample
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows.append({"image": "images/corrupt.png", "text": "a broken picture", "label": "class_00"})
    rows.append({"image": "images/not-there.png", "text": "a missing picture", "label": "class_01"})
    path = root / "manifest.csv"
    pd.DataFrame(rows).drop(columns=["group"]).assign(id=lambda d: [f"row{i}" for i in range(len(d))]).to_csv(
        path, index=False
    )
    return path, {"group_column": ""}, {"evaluate": TINY_EXPLAIN}  # the shape whose explanations are checked


def many_classes_some_tiny(root: Path) -> tuple[Path, dict, dict]:
    """52 classes of 3 rows and 4 classes of 1 row (dropped at ingest by min_class_count)."""
    rows = _rows(52, 3, root / "images", seed=11)
    rows += [dict(r, label=f"tiny_{i}", group=f"tiny-{i}") for i, r in
             enumerate(_rows(4, 1, root / "images_tiny", seed=99))]  # fmt: skip
    for r in rows[-4:]:
        r["image"] = r["image"].replace("images/", "images_tiny/")
    path = root / "manifest.csv"
    pd.DataFrame(rows).assign(id=lambda d: [f"s{i}" for i in range(len(d))]).to_csv(path, index=False)
    return path, {"group_column": "group"}, {"ingest": {"min_class_count": 3}, "validate": {"min_per_class": 3},
                                              "split": {"val_fraction": 0.34, "test_fraction": 0.34}}  # fmt: skip


def one_class_only(root: Path) -> tuple[Path, dict, dict]:
    """A single label: nothing to classify; must stop with one clear line."""
    rows = _rows(1, 12, root / "images")
    path = root / "manifest.csv"
    pd.DataFrame(rows).assign(id=lambda d: [f"s{i}" for i in range(len(d))]).to_csv(path, index=False)
    return path, {"group_column": "group"}, {}


def wrong_columns(root: Path) -> tuple[Path, dict, dict]:
    """A manifest whose columns are named differently from the params: one clear line naming them."""
    rows = _rows(2, 4, root / "images")
    path = root / "manifest.tsv"
    pd.DataFrame(rows).rename(columns={"image": "file", "label": "vote"}).to_csv(path, sep="\t", index=False)
    return path, {"group_column": "group", "label_column": "category", "columns": {"image": "picture"}}, {}


def no_usable_images(root: Path) -> tuple[Path, dict, dict]:
    """Every image undecodable and clean.allow_missing_modality off: nothing left; one clear line."""
    rows = _rows(2, 6, root / "images")
    for row in rows:
        (root / row["image"]).write_bytes(b"not an image")
    path = root / "manifest.csv"
    pd.DataFrame(rows).assign(id=lambda d: [f"s{i}" for i in range(len(d))]).to_csv(path, index=False)
    return path, {"group_column": "group"}, {"clean": {"allow_missing_modality": False}}


def tuned_image_encoder(root: Path) -> tuple[Path, dict, dict]:
    """`tuned_concat` (the image encoder's top fine-tuned with the head) against `text_only`, with texts that say
    nothing about the class, so the tuned model wins and is what the Bento serves; some rows have no image (the
    tuning path's missing rows), training uses augment's views, and the image encoder runs int8 where its fidelity
    guard allows."""
    rows = _rows(3, 12, root / "images", seed=21)
    for k, row in enumerate(rows):
        row["text"] = f"item number {k % 5}"
        if k % 7 == 3:
            row["image"] = ""  # text-only sample
    path = root / "manifest.csv"
    pd.DataFrame(rows).assign(id=lambda d: [f"t{i}" for i in range(len(d))]).to_csv(path, index=False)
    return path, {"group_column": "group"}, {
        "train": {"strategies": ["tuned_concat", "text_only"], "use_augmented": True,  # augment's views, tuned on too
                  "finetune": {"blocks": {"image": 2}, "epochs": 8, "patience": 8, "batch_size": 8}},
        "augment": {"views": 1},
        "featurize": {"runtimes": {"image": "onnx-int8"}},
    }  # fmt: skip


SHAPES = {
    "two_classes_parquet_mixed_formats_no_id": (two_classes_parquet_mixed_formats_no_id, "bento"),
    "partial_rows_multilingual_broken_no_group": (partial_rows_multilingual_broken_no_group, "bento"),
    "many_classes_some_tiny": (many_classes_some_tiny, "bento"),
    "one_class_only": (one_class_only, "error"),
    "wrong_columns": (wrong_columns, "error"),
    "no_usable_images": (no_usable_images, "error"),
    "tuned_image_encoder": (tuned_image_encoder, "tuned"),
}

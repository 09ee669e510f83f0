"""Cleaning: decode, normalise and de-duplicate raw samples; every dropped row gets a reason.

Reasons (one per dropped row, the first that applies):
  missing_label, disallowed_label, empty_text, text_too_short, text_too_long,
  missing_image, undecodable_image, image_too_large, image_too_small,
  no_modality (neither an image nor a text),
  label_conflict (the same image bytes under different labels: every copy is dropped),
  duplicate (same image bytes and same text as an earlier row: later copies are dropped).

A row with only one modality is a real sample: with `clean.allow_missing_modality` (default on)
a row whose image path is empty is kept as text-only, and one whose text is empty after
normalisation as image-only (its `image_sha256`/`width`/`height` or `text` are then empty/0).
A row that names an image that cannot be read is still dropped: that is a broken row, not a
text-only sample.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from mmfusion.config import CleanParams
from mmfusion.data.images import ImageDecodeError, decode_image
from mmfusion.data.manifest import CLEAN_COLUMNS, ManifestError, resolve_inside
from mmfusion.data.text import normalize_text

log = logging.getLogger(__name__)


def normalize_label(raw: str, params: CleanParams) -> str:
    """Strip a label and map it through `clean.label_aliases`."""
    label = " ".join(str(raw).split())
    return params.label_aliases.get(label, label)


def _check_text(text: str, params: CleanParams) -> tuple[str | None, str]:
    if not text:
        return "empty_text", "text is empty after normalisation"
    if len(text) < params.min_text_chars:
        return "text_too_short", f"{len(text)} chars < clean.min_text_chars={params.min_text_chars}"
    if len(text) > params.max_text_chars:
        return "text_too_long", f"{len(text)} chars > clean.max_text_chars={params.max_text_chars}"
    return None, ""


PRESENCE_PATTERNS = ("image+text", "image_only", "text_only")


def presence_pattern(has_image: bool, has_text: bool) -> str:
    return "image+text" if has_image and has_text else "image_only" if has_image else "text_only"


class _Dropped(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _clean_text(raw: str, params: CleanParams, has_image: bool) -> str:
    """The normalised text; '' for an image-only row where that is allowed."""
    text = normalize_text(raw, lowercase=params.lowercase)
    if not text and has_image and params.allow_missing_modality:
        return ""
    if not text and not has_image:
        raise _Dropped("no_modality", "neither an image path nor a text")
    reason, detail = _check_text(text, params)
    if reason:
        raise _Dropped(reason, detail)
    return text


def _clean_image(row: pd.Series, raw_root: Path, out_root: Path, params: CleanParams) -> dict:
    """Decode, check and save the row's image; returns its clean-manifest fields."""
    try:
        path = resolve_inside(raw_root, row["image"])
        data = path.read_bytes()
    except (OSError, ManifestError) as exc:
        raise _Dropped("missing_image", f"cannot read {row['image']}: {exc.__class__.__name__}") from exc
    try:
        img = decode_image(data, background=params.background)
    except ImageDecodeError as exc:
        raise _Dropped(exc.reason, str(exc)) from exc
    if min(img.size) < params.min_image_size:
        raise _Dropped("image_too_small", f"{img.width}x{img.height} < clean.min_image_size={params.min_image_size}")
    name = f"images/{Path(row['image']).stem}.png"
    img.save(out_root / name, format="PNG")
    return {"image": name, "width": img.width, "height": img.height, "image_sha256": hashlib.sha256(data).hexdigest()}


def clean_row(row: pd.Series, raw_root: Path, out_root: Path, params: CleanParams, allowed: set[str]) -> dict:
    """One raw row as a clean-manifest row; raises _Dropped with the first reason that applies."""
    label = normalize_label(row["label"], params)
    if not label:
        raise _Dropped("missing_label", "label is empty")
    if allowed and label not in allowed:
        raise _Dropped("disallowed_label", f"label {label!r} not in clean.allowed_labels")
    has_image = bool(str(row["image"]).strip())
    if not has_image and not params.allow_missing_modality:
        raise _Dropped("missing_image", "no image path (clean.allow_missing_modality is off)")
    text = _clean_text(row["text"], params, has_image)
    image = (
        _clean_image(row, raw_root, out_root, params)
        if has_image
        else {"image": "", "width": 0, "height": 0, "image_sha256": ""}
    )
    return {
        "id": row["id"],
        "image": image["image"],
        "text": text,
        "label": label,
        "group": row["group"] or row["id"],
        "source": row["source"],
        "license": row["license"],
        "width": image["width"],
        "height": image["height"],
        "image_sha256": image["image_sha256"],
    }


def drop_conflicts_and_duplicates(df: pd.DataFrame, dropped: list[dict]) -> pd.DataFrame:
    """Drop every copy of an image seen under two labels, and later copies of the same (image, text)."""
    with_image = df[df["image_sha256"] != ""]
    labels_per_image = with_image.groupby("image_sha256")["label"].nunique()
    conflicted = set(labels_per_image[labels_per_image > 1].index)
    for sha in conflicted:
        rows = df[df["image_sha256"] == sha]
        detail = "same image under labels " + ", ".join(
            f"{i} ({lab})" for i, lab in zip(rows["id"], rows["label"], strict=True)
        )
        dropped.extend({"id": i, "reason": "label_conflict", "detail": detail} for i in rows["id"])
    df = df[~df["image_sha256"].isin(conflicted)]
    dup_mask = df.duplicated(subset=["image_sha256", "text"], keep="first")
    first_of = df[~dup_mask].set_index(["image_sha256", "text"])["id"]
    for _, row in df[dup_mask].iterrows():
        dropped.append(
            {"id": row["id"], "reason": "duplicate", "detail": f"same image and text as {first_of[(row['image_sha256'], row['text'])]}"}
        )
    return df[~dup_mask].reset_index(drop=True)


def clean_dataset(raw: pd.DataFrame, raw_root: Path, out_root: Path, params: CleanParams) -> tuple[pd.DataFrame, dict]:
    """Clean `raw` (images relative to `raw_root`) into `out_root/images`; return (clean manifest, report).

    `raw_root` is only read. The report holds counts per reason, the kept rows per presence
    pattern (image+text, image_only, text_only) and one row per dropped sample.
    """
    images_out = out_root / "images"
    images_out.mkdir(parents=True, exist_ok=True)
    allowed = set(params.allowed_labels)
    kept: list[dict] = []
    dropped: list[dict] = []
    for _, row in tqdm(raw.iterrows(), total=len(raw), desc="clean", unit="img", mininterval=2):
        try:
            kept.append(clean_row(row, raw_root, out_root, params, allowed))
        except _Dropped as exc:
            dropped.append({"id": row["id"], "reason": exc.reason, "detail": exc.detail})

    df = drop_conflicts_and_duplicates(pd.DataFrame(kept, columns=list(CLEAN_COLUMNS)), dropped)
    for name in set(p["image"] for p in kept if p["image"]) - set(df["image"]):
        (out_root / name).unlink(missing_ok=True)

    counts = Counter(d["reason"] for d in dropped)
    patterns = Counter(presence_pattern(i != "", t != "") for i, t in zip(df["image"], df["text"]))
    report = {
        "input": int(len(raw)),
        "kept": int(len(df)),
        "dropped": len(dropped),
        "dropped_by_reason": dict(sorted(counts.items())),
        "kept_by_presence": {k: int(patterns.get(k, 0)) for k in PRESENCE_PATTERNS},
        "labels": {k: int(v) for k, v in df["label"].value_counts().sort_index().items()},
        "dropped_rows": dropped,
    }
    return df, report

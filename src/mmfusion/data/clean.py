"""Cleaning: decode, normalise and de-duplicate raw samples; every dropped row gets a reason.

Reasons (one per dropped row, the first that applies):
  missing_label, disallowed_label, empty_text, text_too_short, text_too_long,
  missing_image, undecodable_image, image_too_large, image_too_small,
  label_conflict (the same image bytes under different labels: every copy is dropped),
  duplicate (same image bytes and same text as an earlier row: later copies are dropped).
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


def clean_dataset(raw: pd.DataFrame, raw_root: Path, out_root: Path, params: CleanParams) -> tuple[pd.DataFrame, dict]:
    """Clean `raw` (images relative to `raw_root`) into `out_root/images`; return (clean manifest, report).

    `raw_root` is only read. The report holds counts per reason and one row per dropped sample.
    """
    images_out = out_root / "images"
    images_out.mkdir(parents=True, exist_ok=True)
    allowed = set(params.allowed_labels)
    kept: list[dict] = []
    dropped: list[dict] = []

    def drop(row: pd.Series, reason: str, detail: str) -> None:
        dropped.append({"id": row["id"], "reason": reason, "detail": detail})

    for _, row in tqdm(raw.iterrows(), total=len(raw), desc="clean", unit="img", mininterval=2):
        label = normalize_label(row["label"], params)
        if not label:
            drop(row, "missing_label", "label is empty")
            continue
        if allowed and label not in allowed:
            drop(row, "disallowed_label", f"label {label!r} not in clean.allowed_labels")
            continue
        text = normalize_text(row["text"], lowercase=params.lowercase)
        reason, detail = _check_text(text, params)
        if reason:
            drop(row, reason, detail)
            continue
        try:
            path = resolve_inside(raw_root, row["image"])
            data = path.read_bytes()
        except (OSError, ManifestError) as exc:
            drop(row, "missing_image", f"cannot read {row['image']}: {exc.__class__.__name__}")
            continue
        try:
            img = decode_image(data, background=params.background)
        except ImageDecodeError as exc:
            drop(row, exc.reason, str(exc))
            continue
        if min(img.size) < params.min_image_size:
            drop(row, "image_too_small", f"{img.width}x{img.height} < clean.min_image_size={params.min_image_size}")
            continue
        sha = hashlib.sha256(data).hexdigest()
        name = f"images/{Path(row['image']).stem}.png"
        img.save(out_root / name, format="PNG")
        kept.append(
            {
                "id": row["id"],
                "image": name,
                "text": text,
                "label": label,
                "group": row["group"] or row["id"],
                "source": row["source"],
                "license": row["license"],
                "width": img.width,
                "height": img.height,
                "image_sha256": sha,
            }
        )

    df = pd.DataFrame(kept, columns=list(CLEAN_COLUMNS))
    # The same image bytes under different labels: no copy can be trusted.
    labels_per_image = df.groupby("image_sha256")["label"].nunique()
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
    df = df[~dup_mask].reset_index(drop=True)
    for name in set(p["image"] for p in kept) - set(df["image"]):
        (out_root / name).unlink(missing_ok=True)

    counts = Counter(d["reason"] for d in dropped)
    report = {
        "input": int(len(raw)),
        "kept": int(len(df)),
        "dropped": len(dropped),
        "dropped_by_reason": dict(sorted(counts.items())),
        "labels": {k: int(v) for k, v in df["label"].value_counts().sort_index().items()},
        "dropped_rows": dropped,
    }
    return df, report

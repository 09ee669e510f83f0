"""Text normalisation shared by cleaning, the Predictor and the service's request check."""

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


def text_or_none(text: str | None, lowercase: bool = True) -> str | None:
    """`normalize_text(text)`, or None when nothing is left: the one rule for "no text".

    The Predictor and the service's request check both call this, so a text the check
    accepts is one the model can take (control or zero-width characters only count as none).
    """
    if text is None:
        return None
    return normalize_text(text, lowercase=lowercase) or None

"""The text modality: the manifest's `text` column itself, normalised by the one `normalize_text`.

"No text" has one rule, `text_or_none`: a text of whitespace, control or zero-width characters only
counts as absent, in the Predictor and in the service's check alike. The `lowercase` setting is the
one cleaning used, recorded in the model folder. Cleaning keeps the normalised text within
`clean.min_text_chars..max_text_chars` (a longer one is dropped, not truncated); duplicates are told by it.
"""

from __future__ import annotations

import random
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmfusion.errors import RequestError
from mmfusion.modalities.base import Dropped, ModalitySpec, register_modality

if TYPE_CHECKING:
    import pandas as pd


_SPACE = re.compile(r"\s+")
PREVIEW_CHARS = 300  # characters of a text's preview (the drift report's examples)


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


def check_text(text: object, limits: Any, lowercase: bool = True) -> str | None:
    """The text as given (the Predictor normalises it), None when it is empty after normalisation."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise RequestError(400, "invalid_text", f"text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from a JSON \ud800 escape
        raise RequestError(400, "invalid_text", f"text is not valid Unicode (character {exc.start} is a lone surrogate)") from exc
    if len(text) > limits.max_text_chars:
        raise RequestError(400, "text_too_long", f"text has {len(text)} characters, over the limit of {limits.max_text_chars}")
    return text if text_or_none(text, lowercase=lowercase) is not None else None


def augment_text(text: str, params: Any, seed: int) -> str:
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


@register_modality
class TextSpec(ModalitySpec):
    """Texts: the value of the manifest's `text` column."""

    name = "text"
    column = "text"
    folder = None
    http = "text"
    stats = ("text_chars",)
    keep_share = 1.0  # text drift reviews and feedback need the text; package.log.keep: {text: 0} keeps only its length
    # the drift report's examples show the first PREVIEW_CHARS characters of every request's (normalised) text, even
    # where keep is 0: package.log.previews: {text: 0} stores none
    preview_share = 1.0
    defaults = {"lowercase": True}
    dedup_key = column  # the normalised text itself

    @classmethod
    def settings_from_params(cls, params: Any) -> dict[str, Any]:
        return {"lowercase": bool(params.clean.lowercase)}

    def content(self, value: str) -> bytes:
        return self.load(value).encode("utf-8")  # idempotent on cleaned text: the same call as serving

    def load(self, value: str) -> str:
        return normalize_text(value, lowercase=self.settings["lowercase"])

    def present(self, raw: Any) -> bool:
        return text_or_none(str(raw if raw is not None else ""), lowercase=self.settings["lowercase"]) is not None

    def measure(self, value: str) -> dict[str, float]:
        return {"text_chars": float(len(value))}

    def value(self, item_value: Any) -> str | None:
        return text_or_none(item_value, lowercase=self.settings["lowercase"]) if isinstance(item_value, str) else None

    def check(self, raw: Any, ctx: Any) -> tuple[Any | None, dict[str, Any]]:
        text = check_text(raw, ctx.limits, self.settings["lowercase"])
        return text, ({"text_chars": len(text)} if text is not None else {})

    def preview(self, value: str) -> tuple[str, bytes] | None:
        """The normalised text, cut to PREVIEW_CHARS characters (an ellipsis says where)."""
        text = self.value(value)
        if text is None:
            return None
        cut = text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1].rstrip() + "\u2026"
        return "text/plain", cut.encode("utf-8")

    def example(self) -> str:
        return "warm up"

    def parts(self, value: str, explain: Any) -> Any:
        from mmfusion.modalities.parts import WordParts

        return WordParts(value)

    def clean(self, raw: str, data: bytes | None, out_root: Path, params: Any) -> dict[str, Any]:
        """Normalise the text (`clean.lowercase`) and check its length."""
        text = normalize_text(raw, lowercase=params.lowercase)
        if not text:
            raise self.missing()
        if len(text) < params.min_text_chars:
            raise Dropped("text_too_short", f"{len(text)} chars < clean.min_text_chars={params.min_text_chars}")
        if len(text) > params.max_text_chars:
            raise Dropped("text_too_long", f"{len(text)} chars > clean.max_text_chars={params.max_text_chars}")
        return {self.column: text}

    def missing(self) -> Dropped:
        return Dropped("empty_text", "text is empty after normalisation")

    def augment(self, value: str, params: Any, views: Any, out_root: Path) -> list[str]:
        """Seeded word dropout and swap, one text per seed."""
        return [augment_text(value, params, seed) for seed, _ in views]

    def validation_columns(self, df: pd.DataFrame, root: Path) -> dict[str, Any]:
        return {"text_length": df[self.column].str.len()}

    def expectations(self, gxe: Any, params: Any, where: Any) -> list:
        lo, hi = params.text_length
        return [gxe.ExpectColumnValueLengthsToBeBetween(column=self.column, min_value=lo, max_value=hi, **where)]

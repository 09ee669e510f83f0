"""The text modality: the manifest's `text` column itself, normalised by the one `normalize_text`.

"No text" has one rule, `text_or_none`: a text of whitespace, control or zero-width characters only
counts as absent, in the Predictor and in the service's check alike. The `lowercase` setting is the
one cleaning used, recorded in the model folder.
"""

from __future__ import annotations

from typing import Any

from mmfusion.data.text import normalize_text, text_or_none
from mmfusion.errors import RequestError
from mmfusion.modalities.base import ModalitySpec, register_modality


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


@register_modality
class TextSpec(ModalitySpec):
    """Texts: the value of the manifest's `text` column."""

    name = "text"
    column = "text"
    folder = None
    http = "text"
    stats = ("text_chars",)
    defaults = {"lowercase": True}

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
        return text, ({"text": text} if text is not None else {})

    def example(self) -> str:
        return "warm up"

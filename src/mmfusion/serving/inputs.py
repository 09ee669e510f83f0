"""Input safety for the service: every client mistake becomes a `RequestError` (a 4xx with a message).

Each modality checks its own request values (`mmfusion.modalities`: the image spec checks an upload's
size, format from its header, pixel count, then decodes it with the model's recorded background;
the text spec checks validity and length, with the one "no text" rule the Predictor uses too). This
module does what is common: which fields a model takes (the service takes the list of modalities
from the model, so a model without a modality refuses that field), at least one present, texts
first (cheap: an empty text must not cost an image decode), and the base64 form of file
modalities in JSON items. Messages speak about the request (sizes, formats, limits), never about
Python objects.
"""

from __future__ import annotations

import base64
import binascii
import logging
import typing as t
from dataclasses import dataclass, field

from mmfusion.config import ServeLimits
from mmfusion.errors import RequestError
from mmfusion.modalities import ModalitySpec

__all__ = ["CheckContext", "CheckedItem", "RequestError", "check_item", "decode_base64"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckContext:
    """What the checks need besides the input: the limits and whether raw file bytes go to the log."""

    limits: ServeLimits
    keep: t.Mapping[str, bool] = field(default_factory=dict)  # {modality: this request's raw input goes to the log}
    previews: t.Mapping[str, bool] = field(default_factory=dict)  # {modality: this request's preview goes to the log}


@dataclass
class CheckedItem:
    """One validated input: `values` is what the Predictor gets ({modality: value}, present ones only),
    `record` what the inference log stores about the inputs (InferenceRecord's `fields`, `kept`, `previews`,
    `modalities`)."""

    values: dict[str, t.Any]
    record: dict[str, t.Any] = field(default_factory=dict)

    def to_predictor(self) -> dict:
        return dict(self.values)

    @property
    def modalities(self) -> list[str]:
        return list(self.values)


def check_item(raw: t.Mapping[str, t.Any], specs: t.Mapping[str, ModalitySpec], ctx: CheckContext) -> CheckedItem:
    """Validate one request item ({field: raw value}) for a model whose inputs are `specs`; one must be present."""
    given = {m: v for m, v in raw.items() if v is not None}
    extra = sorted(set(given) - set(specs))
    if extra:
        raise RequestError(400, "unsupported_modality", f"this model takes {list(specs)}, not {extra}")
    values: dict[str, t.Any] = {}
    fields: dict[str, t.Any] = {}
    kept: dict[str, tuple[str | None, bytes]] = {}
    previews: dict[str, tuple[str, bytes]] = {}
    # string fields first: cheap, and an empty text must not cost a file decode
    for m in sorted(given, key=lambda m: specs[m].http != "text"):
        value, log_fields = specs[m].check(given[m], ctx)
        fields.update(log_fields)
        if value is not None:
            values[m] = value
            if ctx.keep.get(m):
                kept[m] = specs[m].kept(given[m], value, log_fields)
            if ctx.previews.get(m):
                preview = _preview(specs[m], value)
                if preview is not None:
                    previews[m] = preview
    if not values:
        blank = " (the text is empty after normalisation: only whitespace, control or zero-width characters)" if given else ""
        raise RequestError(400, "no_input", f"send at least one of {list(specs)}{blank}")
    present = [m for m in specs if m in values]
    return CheckedItem(values={m: values[m] for m in present},
                       record={"fields": fields, "kept": kept, "previews": previews, "modalities": present})  # fmt: skip


def _preview(spec: ModalitySpec, value: t.Any) -> tuple[str, bytes] | None:
    """The spec's preview of a checked value; None (logged) when it fails: a preview never fails a request."""
    try:
        return spec.preview(value)
    except Exception as exc:  # noqa: BLE001
        log.warning("no %s preview for the log: %s", spec.name, exc)
        return None


def decode_base64(value: object, limits: ServeLimits, field_name: str = "image") -> bytes:
    """Bytes of a file modality's value in a JSON item, from base64 (a `data:` URL prefix is accepted); 400 if malformed."""
    if not isinstance(value, str):
        raise RequestError(400, "invalid_base64", f"{field_name} must be a base64 string, got {type(value).__name__}")
    if "," in value[:100] and value.startswith("data:"):
        value = value.split(",", 1)[1]
    # base64 inflates by 4/3: refuse before decoding anything absurd
    if len(value) * 3 // 4 > limits.max_upload_bytes:
        raise RequestError(413, "upload_too_large", f"{field_name} is over the limit of {limits.max_upload_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "invalid_base64", f"{field_name} is not valid base64 ({len(value)} characters): {exc}") from exc

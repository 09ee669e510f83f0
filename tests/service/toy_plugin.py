"""A plugin that registers two toy modalities, one of each HTTP kind, for the service's field tests.

Served with `MMFUSION_PLUGINS=tests.service.toy_plugin`: the service imports it before building its
fields, so /classify gets a file field and a text field more, and /classify_batch items two more keys.
No model takes them: a request that sends one is refused (400 `unsupported_modality`). Never import it
into the test process itself: the registry is process-wide.
"""

from __future__ import annotations

from typing import Any

from mmfusion.modalities import ModalitySpec, register_modality


@register_modality
class ToyFileSpec(ModalitySpec):
    """A file modality no model takes."""

    name = "toy_file"
    column = "toy_file"
    folder = "toy_files"
    http = "file"

    def check(self, raw: Any, ctx: Any) -> tuple[Any | None, dict[str, Any]]:
        return (bytes(raw) or None), {}

    def example(self) -> bytes:
        return b"toy"


@register_modality
class ToyTextSpec(ModalitySpec):
    """A text modality no model takes."""

    name = "toy_text"
    column = "toy_text"
    http = "text"

    def check(self, raw: Any, ctx: Any) -> tuple[Any | None, dict[str, Any]]:
        return (raw or None), {}

    def example(self) -> str:
        return "toy"


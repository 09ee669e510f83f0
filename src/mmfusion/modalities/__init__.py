"""Modalities: one registered spec per modality, which every edge of the system loops over.

    from mmfusion.modalities import get_modality, list_modalities, specs_for
    list_modalities()                       # ['image', 'text']
    specs = specs_for(["image", "text"], root, settings)   # settings: a model's config.json `inputs`
    specs["image"].load("data/clean/images/1f34e.png")     # a decoded RGB image

See `modalities/base.py` for what a spec holds; adding a modality is a new module with its spec
(registered with `register_modality`) and its encoders (docs/adding-a-modality.md). A spec outside
this package is registered in every process (stages, service, monitor) by naming its module in the
environment variable MMFUSION_PLUGINS (comma-separated): they are imported with this package.
"""

import importlib
import os

from mmfusion.modalities.base import (
    ModalitySpec,
    build_spec,
    get_modality,
    keep_shares,
    list_modalities,
    preview_shares,
    recorded_settings,
    register_modality,
    row_item,
    settings_from_params,
    specs_for,
    stats_of,
    unregister_modality,
)
from mmfusion.modalities.image import ImageSpec
from mmfusion.modalities.text import TextSpec
from mmfusion.modalities.audio import AudioSpec  # noqa: E402  (registered third: image, text, audio)

__all__ = [
    "AudioSpec",
    "ImageSpec",
    "ModalitySpec",
    "TextSpec",
    "build_spec",
    "get_modality",
    "keep_shares",
    "list_modalities",
    "preview_shares",
    "recorded_settings",
    "register_modality",
    "row_item",
    "settings_from_params",
    "specs_for",
    "stats_of",
    "unregister_modality",
]

PLUGINS_ENV = "MMFUSION_PLUGINS"


def load_plugins() -> list[str]:
    """Import the modules named in MMFUSION_PLUGINS (comma-separated): the modalities they register join the
    registry before anything reads it; a name that does not import fails at once."""
    modules = [name.strip() for name in os.environ.get(PLUGINS_ENV, "").split(",") if name.strip()]
    for name in modules:
        importlib.import_module(name)
    return modules


load_plugins()

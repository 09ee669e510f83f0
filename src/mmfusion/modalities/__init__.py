"""Modalities: one registered spec per modality, which every edge of the system loops over.

    from mmfusion.modalities import get_modality, list_modalities, specs_for
    list_modalities()                       # ['image', 'text']
    specs = specs_for(["image", "text"], root, settings)   # settings: a model's config.json `inputs`
    specs["image"].load("data/clean/images/1f34e.png")     # a decoded RGB image

See `modalities/base.py` for what a spec holds; adding a modality is a new module with its spec
(registered with `register_modality`) and its encoders (docs/adding-a-modality.md).
"""

from mmfusion.modalities.base import (
    ModalitySpec,
    build_spec,
    get_modality,
    list_modalities,
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

__all__ = [
    "ImageSpec",
    "ModalitySpec",
    "TextSpec",
    "build_spec",
    "get_modality",
    "list_modalities",
    "recorded_settings",
    "register_modality",
    "row_item",
    "settings_from_params",
    "specs_for",
    "stats_of",
    "unregister_modality",
]

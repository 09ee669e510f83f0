"""Fusion strategies by name (`train.strategies`): each is a head mapping {modality: embedding}
(+ a presence mask) to class logits.

    from mmfusion.fusion import create_head, list_heads
    head = create_head("gated", dims={"image": 1280, "text": 384}, num_classes=9)
    out = head({"image": x_img, "text": x_txt}, present)   # FusionOutput(logits, present, weights, aux_logits)
"""

from mmfusion.fusion import heads as _heads  # noqa: F401  (registers the heads)
from mmfusion.fusion import ensemble as _ensemble  # noqa: F401  (registers `ensemble`)
from mmfusion.fusion.base import FusionHead, FusionOutput
from mmfusion.fusion.registry import create_head, list_heads, register_head

__all__ = ["FusionHead", "FusionOutput", "create_head", "list_heads", "register_head"]

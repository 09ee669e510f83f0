"""Explanations (mmfusion.explain) through a real Predictor: a fusion head trained here in a second on stand-in
encoders (a word-vector text encoder and a thumbnail image encoder: deterministic, no weights), calibrated, so
every number an explanation gives can be checked against the Predictor's own answers."""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.config import ExplainParams, parse_params
from mmfusion.explain import Explainer, ExplainTooCostly, PerturbedModel
from mmfusion.inference.predictor import Predictor
from mmfusion.training.data import FeatureSet
from mmfusion.training.strategies import fit_strategy
from tests.conftest import CLASSES, draw_sample

LABELS = sorted(CLASSES)
TEMPERATURE = 1.7  # a calibration that is not the identity: explanations must give calibrated probabilities too


class WordEncoder:
    """Text: the mean of a fixed random vector per word (seeded by the word), so every word moves the embedding."""

    dim, fingerprint = 16, "test-words"

    def __init__(self):
        self.calls = 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        vec = lambda w: np.random.default_rng(zlib.crc32(w.encode())).normal(size=self.dim)  # noqa: E731
        means = [np.mean([vec(w) for w in t.split()], axis=0) for t in texts]
        return torch.tensor(np.stack(means), dtype=torch.float32)


class ThumbnailEncoder:
    """Image: its 2 x 4 thumbnail's colours, 24 numbers around 0 (a region's colour moves its part of them)."""

    dim, fingerprint = 24, "test-thumbnail"

    def __init__(self):
        self.calls = 0

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        self.calls += 1
        thumbs = [np.asarray(im.convert("RGB").resize((4, 2), Image.Resampling.BOX), np.float32) for im in images]
        return torch.tensor(np.stack(thumbs).reshape(len(images), -1) / 128.0 - 1.0)


def picture(label: str, seed: int) -> Image.Image:
    img = draw_sample(CLASSES[label][0], seed=seed, size=24, alpha=False)
    return img.convert("RGB")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    encoders = {"image": ThumbnailEncoder(), "text": WordEncoder()}
    rows = [(picture(label, 50 * c + i), f"{CLASSES[label][1][i % 5]} {CLASSES[label][1][(i + 2) % 5]}", c)
            for c, label in enumerate(LABELS) for i in range(12)]  # fmt: skip
    x = {"image": encoders["image"].encode([r[0] for r in rows]), "text": encoders["text"].encode([r[1] for r in rows])}
    y = torch.tensor([r[2] for r in rows])

    def subset(idx):
        return FeatureSet(x={m: a[idx] for m, a in x.items()}, y=y[idx], ids=[f"s{i}" for i in idx])

    meta = {m: {"encoder": f"test_{m}", "dim": enc.dim, "fingerprint": enc.fingerprint, "preprocessing": {}}
            for m, enc in encoders.items()}  # fmt: skip
    params = parse_params({"train": {"strategies": ["concat"], "epochs": 15, "patience": 15, "batch_size": 12,
                                     "hidden_dim": 16}})  # fmt: skip
    out = tmp_path_factory.mktemp("explain_model") / "best"
    train, val = [i for i in range(len(rows)) if i % 4], list(range(0, len(rows), 4))
    fit_strategy("concat", subset(train), subset(val), LABELS, meta, params, out, torch.device("cpu"))
    (out / "calibration.json").write_text(json.dumps({"temperature": TEMPERATURE}))
    return out


@pytest.fixture()
def encoders() -> dict:
    return {"image": ThumbnailEncoder(), "text": WordEncoder()}


@pytest.fixture()
def predictor(model_dir, encoders) -> Predictor:
    p = Predictor.from_dir(model_dir, device="cpu", encoders=encoders, head_runtime="torch")
    assert p.temperature == TEMPERATURE
    return p


def settings(**kw) -> ExplainParams:
    return dataclasses.replace(ExplainParams(image_grid=2, max_evaluations=64, samples=16, batch_size=8), **kw)


def prob(predictor: Predictor, item: dict, label: str) -> float:
    return predictor.predict([item])[0]["probabilities"][label]


def test_feature_ablation_gives_each_part_the_drop_when_it_alone_is_removed(predictor):
    image, text = picture("fruit", 3), "red apple sweet strawberry"
    item = {"image": image, "text": text}
    explainer = Explainer(predictor, settings())
    out = explainer.explain(item, overlay=True)
    label = predictor.predict([item])[0]["label"]
    p_all = prob(predictor, item, label)
    assert out["target"] == label and out["probability"] == pytest.approx(p_all, abs=1e-5)
    assert explainer.cost(explainer.parts(item)) == 4 + 4 + 1  # feature ablation: each part removed once, and none
    assert out["evaluations"] == 4 + 4 + 1  # what the cost bound promised is what ran

    words = text.split()
    got = [w["attribution"] for w in out["modalities"]["text"]["parts"]]
    assert [w["word"] for w in out["modalities"]["text"]["parts"]] == words
    without = [" ".join(words[:i] + words[i + 1 :]) for i in range(4)]
    want = [p_all - prob(predictor, {"image": image, "text": t}, label) for t in without]
    assert got == pytest.approx(want, abs=1e-4) and max(map(abs, want)) > 1e-3  # words matter to this model

    pixels = np.asarray(image)
    fill = pixels.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    want = []
    for r in range(2):
        for c in range(2):
            cell = pixels.copy()
            cell[12 * r : 12 * (r + 1), 12 * c : 12 * (c + 1)] = fill  # the cell filled with the image's mean colour
            want.append(p_all - prob(predictor, {"image": Image.fromarray(cell), "text": text}, label))
    regions = out["modalities"]["image"]
    assert regions["grid"] == [2, 2] and regions["size"] == [24, 24]
    assert np.ravel(regions["attributions"]).tolist() == pytest.approx(want, abs=1e-4) and max(map(abs, want)) > 1e-3
    assert regions["total"] == pytest.approx(sum(want), abs=1e-4)
    assert regions["overlay_png"]  # asked for; the service checks that it decodes


def test_a_target_other_than_the_answer_is_explained_for_that_class(predictor):
    item = {"text": "green leaf"}
    other = next(label for label in LABELS if label != predictor.predict([item])[0]["label"])
    out = Explainer(predictor, settings()).explain(item, target=other)
    assert out["target"] == other and out["probability"] == pytest.approx(prob(predictor, item, other), abs=1e-5)


def test_too_costly_is_refused_before_any_model_call(predictor, encoders):
    text = " ".join(f"w{i}" for i in range(80))
    explainer = Explainer(predictor, settings())
    with pytest.raises(ExplainTooCostly) as err:
        explainer.explain({"text": text})
    assert err.value.needed == 81 and err.value.limit == 64
    assert "81 model evaluations" in str(err.value) and "limit of 64" in str(err.value)
    assert encoders["text"].calls == encoders["image"].calls == 0  # nothing was computed
    shapley = Explainer(predictor, settings(method="shapley_sampling", samples=8))
    with pytest.raises(ExplainTooCostly):
        shapley.check_cost({"text": "a b c d e f g h"})  # 8 samples x 8 parts + 1


@pytest.mark.parametrize("method", ["shapley_sampling", "kernel_shap", "lime"])
def test_the_sampling_methods_are_seeded(predictor, method):
    item = {"image": picture("water", 4), "text": "blue wave deep lake"}
    explainer = Explainer(predictor, settings(method=method, samples=3 if method == "shapley_sampling" else 24))
    first, second = (explainer.explain(item) for _ in range(2))
    for out in (first, second):
        out.pop("seconds")
    assert first == second
    torch.manual_seed(123)  # the global RNG's state does not matter either
    third = explainer.explain(item)
    third.pop("seconds")
    assert third == first


def test_a_missing_modality_gets_no_entry(predictor):
    explainer = Explainer(predictor, settings())
    assert set(explainer.explain({"image": None, "text": "oak tree"})["modalities"]) == {"text"}
    assert set(explainer.explain({"image": picture("plant", 1), "text": " \u200b "})["modalities"]) == {"image"}


def test_removing_every_part_leaves_the_uniform_distribution(predictor):
    item = {"text": "fern"}
    parts = Explainer(predictor, settings()).parts(item)
    model = PerturbedModel(predictor, parts)
    nothing = model(torch.zeros(1, model.width)).numpy()
    assert nothing[0].tolist() == pytest.approx([1 / len(LABELS)] * len(LABELS))
    out = Explainer(predictor, settings()).explain(item)
    (word,) = out["modalities"]["text"]["parts"]
    assert word["attribution"] == pytest.approx(out["probability"] - 1 / len(LABELS), abs=1e-5)

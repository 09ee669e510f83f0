"""The faithfulness (deletion) check and the explanations page (mmfusion.explain.faithfulness, .page) on models
whose answer is known: a function of the keep-vector, and a two-input model where one word and one image cell decide."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.config import ExplainParams
from mmfusion.explain import Explainer
from mmfusion.explain.faithfulness import (FaithfulnessCheck, area, deletion_curves, plot_deletion, removal_counts,
                                           summarise)
from mmfusion.explain.page import build_page, quotas, rank_rows, render_input
from mmfusion.modalities import specs_for

FRACTIONS = np.linspace(0, 1, 5)


def one_part_matters(j: int, n: int):
    """Two classes; class 0's probability is 0.9 while part `j` is kept, 0.1 once it is removed."""

    def predict(keep: np.ndarray) -> np.ndarray:
        assert keep.shape[1] == n and keep.dtype == bool
        p0 = np.where(keep[:, j], 0.9, 0.1)
        return np.stack([p0, 1 - p0], axis=1)

    return predict


def test_removal_counts_round_each_fraction_of_the_parts():
    assert removal_counts(FRACTIONS, 8).tolist() == [0, 2, 4, 6, 8]
    assert removal_counts(FRACTIONS, 3).tolist() == [0, 1, 2, 2, 3]  # round half to even: 1.5 -> 2, 0.75 -> 1


def test_deletion_curves_of_attributions_that_find_the_part_that_matters():
    n, j = 8, 5
    attr = np.zeros(n)
    attr[j] = 0.8  # what feature ablation gives: only part j's removal changes anything
    top, random = deletion_curves(one_part_matters(j, n), attr, 0, FRACTIONS, draws=200, rng=np.random.default_rng(0))
    assert top.tolist() == pytest.approx([0.9, 0.1, 0.1, 0.1, 0.1])
    # k random parts of 8 remove part j with probability k/8: 0.9 - 0.8 k/8 in expectation
    assert random.tolist() == pytest.approx([0.9 - 0.8 * k / n for k in (0, 2, 4, 6, 8)], abs=0.06)
    assert area(top, FRACTIONS) == pytest.approx(0.5 * 0.25 * (0.9 + 0.1) + 0.75 * 0.1)
    found = summarise(top[None], random[None], FRACTIONS, [n])
    assert found["auc_top"] < found["auc_random"] and found["difference"] > 0.2
    assert found["items_top_below_random"] == 1.0


def test_attributions_that_point_elsewhere_do_not_beat_random():
    """The check can fail: an explanation that ranks the deciding part last loses to random removal."""
    n, j = 8, 5
    attr = np.arange(n, 0, -1).astype(float)
    attr[j] = -1.0  # ranked last
    predict = one_part_matters(j, n)
    top, random = deletion_curves(predict, attr, 0, FRACTIONS, draws=50, rng=np.random.default_rng(1))
    assert top.tolist() == pytest.approx([0.9, 0.9, 0.9, 0.9, 0.1])  # part j goes only with the last fraction
    found = summarise(top[None], random[None], FRACTIONS, [n])
    assert found["auc_top"] > found["auc_random"] and found["difference"] < 0


def test_random_orders_remove_parts_cumulatively_and_exactly_k_at_a_time():
    seen = []

    def predict(keep):
        seen.append(keep.copy())
        return np.tile([0.5, 0.5], (len(keep), 1))

    deletion_curves(predict, np.arange(6.0), 1, FRACTIONS, draws=3, rng=np.random.default_rng(2))
    masks = seen[0].reshape(4, len(FRACTIONS), 6)  # the top order, then 3 random ones
    assert ((~masks).sum(axis=2) == removal_counts(FRACTIONS, 6)).all()
    assert (masks[:, 1:] <= masks[:, :-1]).all()  # a part removed at one fraction stays removed
    assert (masks[0, 1] == [True, True, True, True, False, False]).all()  # the largest attributions go first


# -- a two-input model whose answer is known: the word "key" and the top-left image cell say class "a" ---------

LABELS = ["a", "b"]


def redness(image: Image.Image) -> float:
    """How red the top-left quarter of an image is (1: pure red; the mean-colour fill of a cell leaves 0.25)."""
    px = np.asarray(image, dtype=np.float64)[: image.height // 2, : image.width // 2] / 255
    return float((px[..., 0] - px[..., 1:].mean(axis=-1)).mean())


def loudness(wave: np.ndarray) -> float:
    """The RMS of a clip's first tenth."""
    return float(np.sqrt(np.mean(np.square(wave[: wave.size // 10]))))


FEATURES = {"image": redness, "text": lambda t: float("key" in t.split()), "audio": loudness}


class KnownModel:
    """What the Explainer needs of a Predictor: class "a"'s logit is the sum of each input's one feature times its
    weight, minus 1 (a missing input adds nothing; with none, both classes are as likely)."""

    labels = LABELS
    strategy, version = "known", "test"

    def __init__(self, weights: dict[str, float] | None = None):
        self.weights = weights or {"image": 3.0, "text": 3.0}
        self.modalities = tuple(self.weights)
        self.inputs = specs_for(self.modalities)
        self.head = SimpleNamespace(dims={m: 1 for m in self.modalities})

    def encode(self, modality: str, values: list) -> np.ndarray:
        return np.array([[FEATURES[modality](v)] for v in values], dtype=np.float32)

    def head_probabilities(self, emb: dict, present: np.ndarray) -> np.ndarray:
        logit = sum(w * emb[m][:, 0] for m, w in self.weights.items()) - 1
        p = np.where(present.any(axis=1), 1 / (1 + np.exp(-logit)), 0.5)
        return np.stack([p, 1 - p], axis=1)


def picture(red: bool) -> Image.Image:
    img = Image.new("RGB", (24, 24), (255, 255, 255))
    if red:
        img.paste((255, 0, 0), (0, 0, 12, 12))
    return img


SETTINGS = dataclasses.replace(ExplainParams(), image_grid=2, max_evaluations=64)


def test_the_check_over_a_model_passes_for_every_input_and_writes_its_plot(tmp_path):
    check = FaithfulnessCheck(KnownModel(), SETTINGS, steps=4, draws=3, seed=0)
    for text in ("the key is here", "a key word", "key under the mat now"):
        assert check.add({"image": picture(True), "text": text})
    report = check.summary()
    assert report["items"] == 3 and report["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert report["passed"] is True and report["all"]["difference"] > 0
    assert set(report["modalities"]) == {"image", "text"}
    for found in [report["all"], *report["modalities"].values()]:
        assert len(found["top"]) == len(found["random"]) == 5
        assert found["auc_top"] < found["auc_random"]
    assert report["modalities"]["image"]["parts_mean"] == 4
    # a quarter of the parts removed, most attributed first: the word "key" and the red cell (filled with the
    # image's mean colour), so that only the filled cell's redness is left of class "a"'s evidence
    filled = picture(True)
    filled.paste(tuple(np.asarray(filled).reshape(-1, 3).mean(axis=0).round().astype(int)), (0, 0, 12, 12))
    assert report["all"]["top"][1] == pytest.approx(1 / (1 + np.exp(1 - 3 * redness(filled))), abs=1e-4)
    path = plot_deletion(report, tmp_path / "faithfulness.png", title="known")
    assert path.stat().st_size > 5000


def test_rows_over_the_cost_limit_are_counted_not_explained():
    check = FaithfulnessCheck(KnownModel(), dataclasses.replace(SETTINGS, max_evaluations=5), steps=2, draws=1)
    assert not check.add({"image": picture(True), "text": "key"})  # 4 cells + 1 word + the whole: 6 evaluations
    report = check.summary()
    assert report["skipped_too_costly"] == 1 and report["items"] == 0
    assert report["all"] is None and report["passed"] is None


def test_page_rows_are_half_errors_most_confident_first_one_class_at_a_time():
    probs = np.array([[0.9, 0.1], [0.99, 0.01], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.95, 0.05]])
    y = np.array([0, 0, 1, 1, 0, 0])  # rows 3 and 4 are errors
    correct, errors = rank_rows(probs, y)
    assert correct == [1, 2, 5, 0]  # the most confident "a", the only "b", then the other "a" rows
    assert errors == [4, 3]
    assert quotas(6, len(correct), len(errors)) == (4, 2)
    assert quotas(4, 4, 1) == (3, 1)  # one error: the rest are correct rows
    assert quotas(4, 1, 9) == (1, 3)  # one correct row: the rest are errors


def test_the_page_shows_each_input_by_its_parts_and_opens_offline(tmp_path):
    model = KnownModel()
    items = [{"image": picture(True), "text": "the key is here"}, {"image": picture(False), "text": "plain words"},
             {"image": None, "text": "only key text"}]  # fmt: skip
    probs = np.array([[0.98, 0.02], [0.3, 0.7], [0.9, 0.1]])
    summary = build_page(Explainer(model, SETTINGS), lambda i: items[i], ["r0", "r1", "r2"], ["a", "a", "a"], probs,
                         np.zeros(3, int), 2, tmp_path / "explanations", title="Explanations: known")  # fmt: skip
    assert summary["rows"] == 2 and summary["errors"] == 1
    page = (tmp_path / "explanations" / "index.html").read_text()
    assert "Explanations: known" in page and "true <b>a</b>" in page and "predicted <b>b</b>" in page
    assert "r0" in page and "r1" in page and "r2" not in page
    key = re.search(r'<span style="background:rgb\((\d+),(\d+),(\d+)\);color:[^"]+"[^>]*>key</span>', page)
    assert key and int(key.group(1)) > int(key.group(3))  # the deciding word is red (for the prediction)
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 4 and all((tmp_path / "explanations" / s).is_file() for s in sources)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_audio_is_explained_by_time_segments_and_a_whole_value_by_one_chip(tmp_path):
    wave = np.zeros(16000, dtype=np.float32)
    wave[:1600] = 0.3 * np.sin(np.arange(1600) / 3)  # only the first tenth sounds: the first segment decides
    model = KnownModel({"audio": 20.0})
    check = FaithfulnessCheck(model, SETTINGS, steps=2, draws=2)
    assert check.add({"audio": wave})
    assert check.summary()["passed"] is True
    build_page(Explainer(model, SETTINGS), lambda i: {"audio": wave}, ["clip"], ["a"], np.array([[0.9, 0.1]]),
               np.zeros(1, int), 1, tmp_path, title="audio")  # fmt: skip
    bar = re.search(r'<div class="bar">(.*?)</div></div>', (tmp_path / "index.html").read_text()).group(1)
    segments = re.findall(r'<div style="flex:([0-9.]+);background:rgb\((\d+),(\d+),(\d+)\)', bar)
    assert len(segments) == SETTINGS.audio_segments and float(segments[0][0]) == pytest.approx(0.1)
    assert int(segments[0][1]) > int(segments[0][3])  # red: for the prediction
    assert all(min(map(int, s[1:])) > 240 for s in segments[1:])  # the silent rest: no attribution, (near) white
    whole = {"kind": "whole", "parts": [{"part": "whole", "attribution": -0.2}], "total": -0.2}
    chip = render_input(tmp_path, "row00", "vector", whole, None)
    assert "vector (-0.200)" in chip and re.search(r'class="chip" style="background:rgb\((\d+),\d+,(\d+)\)', chip)

"""Behavioural checks of a trained default-data model (see conftest.py): real encoders, raw inputs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

# (text, a rewording of it, the category both must get): everyday, unambiguous names.
PARAPHRASES = [
    ("red apple", "a shiny red apple", "Food & Drink"),
    ("flag: Germany", "the German national flag", "Flags"),
    ("soccer ball", "ball for playing soccer", "Activities"),
    ("grinning face", "a face that is grinning", "Smileys & Emotion"),
    ("dog face", "the face of a dog", "Animals & Nature"),
    ("airplane", "an airplane", "Travel & Places"),
]


@pytest.fixture(scope="module")
def predictor(model_root):
    from mmfusion.inference.predictor import Predictor

    p = Predictor.from_dir(model_root / "models" / "best", device="auto")
    if set(label for *_, label in PARAPHRASES) - set(p.labels):
        pytest.skip(f"the default model is not the 9-category task (labels: {p.labels[:5]}...)")
    return p


def test_reworded_text_keeps_its_label(predictor):
    items = [{"image": None, "text": t} for pair in PARAPHRASES for t in pair[:2]]
    labels = [r["label"] for r in predictor.predict(items)]
    for i, (text, reworded, expected) in enumerate(PARAPHRASES):
        assert labels[2 * i] == expected, f"{text!r} -> {labels[2 * i]}"
        assert labels[2 * i + 1] == labels[2 * i], f"{text!r} -> {labels[2 * i]} but {reworded!r} -> {labels[2 * i + 1]}"


def test_case_and_spacing_do_not_matter(predictor):
    a, b = predictor.predict([{"image": None, "text": "Red   APPLE"}, {"image": None, "text": "red apple"}])
    assert a["probabilities"] == pytest.approx(b["probabilities"])


def test_text_only_and_image_only_still_predict(predictor, model_root):
    from mmfusion.modalities.image import decode_image
    from mmfusion.data.manifest import read_manifest

    test = read_manifest(model_root / "data" / "split" / "test.csv", required=("id", "image", "text", "label"))
    test = test.iloc[:: max(1, len(test) // 45)]
    texts = predictor.predict([{"image": None, "text": t} for t in test["text"]])
    images = predictor.predict([{"image": decode_image(model_root / f), "text": None} for f in test["image"]])
    text_acc = sum(r["label"] == y for r, y in zip(texts, test["label"])) / len(test)
    image_acc = sum(r["label"] == y for r, y in zip(images, test["label"])) / len(test)
    chance = 1 / len(predictor.labels)
    assert text_acc > 0.6, text_acc
    assert image_acc > 3 * chance, image_acc
    assert all(set(r["embeddings"]) == {"text"} and r["contributions"]["image"] == 0 for r in texts)


def test_fusion_beats_the_unimodal_baselines_on_test(model_root):
    """Scored now, by the evaluation code, on the cached test features (not read from a metrics.json)."""
    from mmfusion.inference.checkpoint import load_checkpoint, read_config
    from mmfusion.training.data import load_split
    from mmfusion.training.loop import predict_logits

    winner = read_config(model_root / "models" / "best")["strategy"]
    dirs = sorted(d for d in (model_root / "models" / "strategies").glob("*") if (d / "config.json").exists())
    labels = read_config(dirs[0])["labels"]
    test = load_split(model_root / "features", "test", labels)
    accuracy, unimodal = {}, set()
    for d in dirs:
        head, _ = load_checkpoint(d)
        accuracy[d.name] = float((predict_logits(head, test).argmax(axis=1) == test.y.numpy()).mean())
        if head.unimodal:
            unimodal.add(d.name)
    if not unimodal:
        pytest.skip("no unimodal baseline trained")
    assert winner not in unimodal
    # the served model itself: a CV refit bag or an evaluate-built ensemble is not one of models/strategies
    best, _ = load_checkpoint(model_root / "models" / "best")
    accuracy[f"best ({winner})"] = float((predict_logits(best, test).argmax(axis=1) == test.y.numpy()).mean())
    assert accuracy[f"best ({winner})"] >= max(accuracy[n] for n in unimodal), accuracy

"""Predictor.from_dir on a model trained on synthetic features, with stand-in encoders (no model hub, no weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.config import parse_params
from mmfusion.features.store import load_features
from mmfusion.inference.checkpoint import model_version
from mmfusion.inference.predictor import Predictor
from mmfusion.monitoring.reference import load_reference
from mmfusion.stages import evaluate as evaluate_stage
from mmfusion.stages import train as train_stage
from tests.code.synthetic import write_synthetic_features


class LookupEncoder:
    """Returns the cached synthetic embedding of a sample: the text is its id, the image carries it in .info."""

    def __init__(self, modality, table, fingerprint):
        self.modality, self.table, self.fingerprint = modality, table, fingerprint
        self.dim = next(iter(table.values())).shape[0]
        self.calls = 0

    def encode(self, values):
        self.calls += 1
        keys = [v.info["id"] if isinstance(v, Image.Image) else v for v in values]
        return torch.from_numpy(np.stack([self.table[k] for k in keys]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("project")
    write_synthetic_features(root / "features", per_class={"train": 25, "val": 10, "test": 10, "augmented": 0})
    params = parse_params(
        {
            "train": {"strategies": ["text_only", "concat", "attention"], "hidden_dim": 16, "epochs": 10, "batch_size": 16, "lr": 3e-3},
            "evaluate": {"raw_check": 0, "explain_rows": 0, "faithfulness_rows": 0, "bootstrap": 100},
        }
    )
    train_stage.run(params, root)
    evaluate_stage.run(params, root)
    arrays, index = load_features(root / "features", "test")
    ids = list(index["id"])
    encoders = {
        "image": LookupEncoder("image", dict(zip(ids, arrays["image"])), "synthetic-image-0"),
        "text": LookupEncoder("text", dict(zip(ids, arrays["text"])), "synthetic-text-0"),
    }
    return root, encoders, index


def _image(sample_id):
    img = Image.new("RGB", (4, 4))
    img.info["id"] = sample_id
    return img


def test_from_dir_rebuilds_the_winner(trained):
    root, encoders, _ = trained
    p = Predictor.from_dir(root / "models/best", device="cpu", encoders=encoders)
    assert p.labels == [f"class_{i}" for i in range(4)]
    assert p.modalities == ("image", "text")
    assert p.encoders == {"image": "synthetic_image", "text": "synthetic_text"}
    assert p.version.startswith(p.strategy + "-") and len(p.version) > len(p.strategy) + 8
    # one version formula: what the service logs is what the drift reference was written for
    assert p.version == model_version(root / "models/best") == load_reference(root / "models/best")[1]["model_version"]
    assert p.metrics["test"]["accuracy"] > 0.5
    assert p.temperature > 0


def test_predict_with_both_and_with_one_modality(trained):
    root, encoders, index = trained
    p = Predictor.from_dir(root / "models/best", device="cpu", encoders=encoders)
    rows = index.iloc[::7]
    items = [{"image": _image(i), "text": i} for i in rows["id"]]
    items += [{"image": None, "text": i} for i in rows["id"]] + [{"image": _image(i), "text": "  "} for i in rows["id"]]
    results = p.predict(items)
    n = len(rows)
    both, text_only, image_only = results[:n], results[n : 2 * n], results[2 * n :]
    acc = np.mean([r["label"] == y for r, y in zip(both, rows["label"])])
    assert acc >= 0.8
    for r in results:
        assert set(r["probabilities"]) == set(p.labels)
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert abs(sum(r["contributions"].values()) - 1) < 1e-5
    assert all(set(r["embeddings"]) == {"image", "text"} for r in both)
    assert all(set(r["embeddings"]) == {"text"} and r["contributions"]["image"] == 0 for r in text_only)
    assert all(set(r["embeddings"]) == {"image"} and r["contributions"]["text"] == 0 for r in image_only)
    assert len(both[0]["embeddings"]["image"]) == 24


def test_predict_embeddings_matches_predict(trained):
    root, encoders, index = trained
    p = Predictor.from_dir(root / "models/best", device="cpu", encoders=encoders)
    items = [{"image": _image(i), "text": i} for i in index["id"][:5]] + [{"image": None, "text": index["id"][5]}]
    embs = p.embed(items)
    present = p.presence(items)
    assert embs["image"].shape == (6, 24) and not embs["image"][5].any()  # missing: zeros, flagged by `present`
    assert present["image"].tolist() == [True] * 5 + [False]
    assert p.predict_embeddings(embs, present) == p.predict(items)


def test_ablation_contributions_for_a_head_without_weights(trained):
    root, encoders, index = trained
    p = Predictor.from_dir(root / "models/strategies/concat", device="cpu", encoders=encoders)
    results = p.predict([{"image": _image(i), "text": i} for i in index["id"][:8]])
    for r in results:
        assert set(r["contributions"]) == {"image", "text"}
        assert all(v >= 0 for v in r["contributions"].values())
        assert abs(sum(r["contributions"].values()) - 1) < 1e-5


def test_an_item_with_nothing_is_an_error(trained):
    root, encoders, _ = trained
    p = Predictor.from_dir(root / "models/best", device="cpu", encoders=encoders)
    with pytest.raises(ValueError, match="none of the modalities"):
        p.predict([{"image": None, "text": " "}])


def test_an_encoder_with_another_fingerprint_is_refused(trained):
    root, encoders, _ = trained
    wrong = dict(encoders, text=LookupEncoder("text", encoders["text"].table, "another-model"))
    with pytest.raises(ValueError, match="fingerprint"):
        Predictor.from_dir(root / "models/best", device="cpu", encoders=wrong)


class ThreadRecordingEncoder(LookupEncoder):
    """A LookupEncoder that records which thread ran each call."""

    def __init__(self, base):
        super().__init__(base.modality, base.table, base.fingerprint)
        self.threads = []

    def encode(self, values):
        import threading

        self.threads.append(threading.current_thread().name)
        return super().encode(values)


def test_small_batches_encode_modalities_concurrently_with_the_same_answers(trained):
    root, encoders, index = trained
    rec = {m: ThreadRecordingEncoder(e) for m, e in encoders.items()}
    p = Predictor.from_dir(root / "models/best", device="cpu", encoders=rec)
    items = [{"image": _image(i), "text": i} for i in index["id"][:6]] + [{"image": None, "text": index["id"][6]}]
    batched = p.predict(items)  # 7 items > parallel_max_items: the encoders run on this thread, in turn
    assert all(not name.startswith("encoder") for e in rec.values() for name in e.threads)
    singles = [p.predict([it])[0] for it in items]  # a lone item: each encoder on its own thread
    assert p.parallel_max_items >= 1
    for e in rec.values():
        assert any(name.startswith("encoder") for name in e.threads)
    for one, many in zip(singles, batched):  # the same answers (to float rounding of a batch of 1 vs 7)
        assert one["label"] == many["label"] and one["embeddings"] == many["embeddings"]
        for key in ("probabilities", "contributions"):
            assert np.allclose(list(one[key].values()), list(many[key].values()), atol=1e-5)
    p.parallel_max_items = 0  # concurrency off: still the same answers
    assert [p.predict([it])[0] for it in items] == singles  # bit-identical: same batch size


def test_ablation_contributions_are_the_drops_when_each_modality_is_hidden(trained):
    """The batched ablation (one head call for every hidden modality) equals hiding each in turn."""
    root, encoders, index = trained
    p = Predictor.from_dir(root / "models/strategies/concat", device="cpu", encoders=encoders)
    items = [{"image": _image(i), "text": i} for i in index["id"][:5]]
    assert p._head.gives_weights is False  # known when it loads: concat has no modality weights of its own
    first = p.predict(items)  # the prediction and its ablations share one head call
    results = p.predict(items)
    assert results == first
    x = {m: torch.as_tensor(v) for m, v in p.embed(items).items()}
    probs, _ = p._probs(x, torch.ones(5, 2, dtype=torch.bool))
    pred = probs.argmax(axis=1)
    drops = []
    for j in range(2):
        mask = torch.ones(5, 2, dtype=torch.bool)
        mask[:, j] = False
        without, _ = p._probs(x, mask)
        drops.append(np.clip(probs[np.arange(5), pred] - without[np.arange(5), pred], 0, None))
    drops = np.stack(drops, axis=1)
    for i, (r0, r, d) in enumerate(zip(first, results, drops)):
        want = d / d.sum() if d.sum() > 0 else np.full(2, 0.5)
        assert np.allclose([r0["contributions"]["image"], r0["contributions"]["text"]], want, atol=1e-6)
        assert np.allclose([r["contributions"]["image"], r["contributions"]["text"]], want, atol=1e-6)
        assert np.allclose(list(r["probabilities"].values()), probs[i], atol=1e-6)


@pytest.mark.parametrize("model", ["models/best", "models/strategies/concat", "models/strategies/attention"])
def test_the_onnx_head_answers_as_the_torch_head(trained, model):
    """The head runtime changes speed, not answers: labels, probabilities and contributions match torch's."""
    root, encoders, index = trained
    items = [{"image": _image(i), "text": i} for i in index["id"][:9]] + [{"image": None, "text": index["id"][9]}]
    eager = Predictor.from_dir(root / model, device="cpu", encoders=encoders, head_runtime="torch")
    fast = Predictor.from_dir(root / model, device="cpu", encoders=encoders)  # auto: ONNX Runtime on CPU
    assert (eager.describe()["head_runtime"], fast.describe()["head_runtime"]) == ("torch", "onnx")
    for want, got in zip(eager.predict(items), fast.predict(items)):
        assert got["label"] == want["label"] and got["embeddings"] == want["embeddings"]
        for key in ("probabilities", "contributions"):
            assert np.allclose(list(got[key].values()), list(want[key].values()), atol=1e-5), key

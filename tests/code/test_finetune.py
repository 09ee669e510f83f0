"""Fine-tuning (mmfusion.training.finetune): the cut encoder, tuned weights in a model folder, the tuned model's
missing rows, and the errors a user meets before any training."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmfusion.encoders import create_encoder
from mmfusion.encoders.tuning import CutEncoder
from mmfusion.errors import UserError
from tests.conftest import CLASSES, draw_sample


def images(n: int = 4) -> list[Image.Image]:
    out = []
    for i, (label, (color, _)) in enumerate(list(CLASSES.items()) * 2):
        img = draw_sample(color, seed=i, size=64)
        rgb = Image.new("RGB", img.size, (255, 255, 255))
        rgb.paste(img, mask=img.getchannel("A"))
        out.append(rgb)
    return out[:n]


@pytest.fixture(scope="module")
def lite():
    return create_encoder("efficientnet_lite0", device="cpu")


@pytest.mark.parametrize("blocks", [1, 2, 5])
def test_the_cut_encoder_and_its_top_give_the_encoders_own_output(lite, blocks, one_torch_thread):
    items = images()
    cut = CutEncoder(lite, blocks)
    acts = cut.encode(items)
    assert acts.shape == (len(items), cut.dim)
    with torch.no_grad():
        got = cut._top(acts)
    assert torch.allclose(got, lite.encode(items), atol=1e-5)
    assert cut.fingerprint != CutEncoder(lite, blocks + 1).fingerprint != lite.fingerprint


def test_tuned_weights_change_the_fingerprint_and_the_embeddings(lite, tmp_path, one_torch_thread):
    import copy

    from safetensors.torch import save_file

    items = images(3)
    cut = CutEncoder(lite, 2)
    top = copy.deepcopy(cut._top)
    with torch.no_grad():
        top.conv_head.weight.mul_(1.1)  # "trained"
        want = top(cut.encode(items))
    path = tmp_path / "image.safetensors"
    save_file(top.encoder_state(), str(path))
    tuned = create_encoder("efficientnet_lite0", device="cpu").load_tuned(path)
    assert tuned.fingerprint != lite.fingerprint
    assert torch.allclose(tuned.encode(items), want, atol=1e-5)
    assert not torch.allclose(tuned.encode(items), lite.encode(items), atol=1e-3)
    # the pretrained encoder the cut came from is untouched
    assert torch.allclose(cut._top(cut.encode(items)), lite.encode(items), atol=1e-5)

    bad = tmp_path / "bad.safetensors"
    save_file({"no_such.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="keys it lacks"):
        create_encoder("efficientnet_lite0", device="cpu").load_tuned(bad).encode(items)
    with pytest.raises(FileNotFoundError, match="missing"):
        create_encoder("efficientnet_lite0", device="cpu").load_tuned(tmp_path / "gone.safetensors")


def test_an_encoder_without_a_cut_says_so():
    text = create_encoder("minilm_l6", device="cpu")
    assert not text.tunable
    with pytest.raises(UserError, match="cannot be fine-tuned.*train.finetune.blocks"):
        text.top(1)
    with pytest.raises(UserError, match="must be 1..16"):
        create_encoder("efficientnet_lite0", device="cpu").top(17)


def test_missing_rows_pass_the_tuned_model_without_poisoning_its_gradients(lite, one_torch_thread):
    """A row without an image is NaN in the activations (presence.mark_missing): the head must see it as
    missing, and the top's weights must get finite gradients."""
    from mmfusion.fusion import create_head
    from mmfusion.training.finetune import TunedModel
    from mmfusion.training.presence import presence_from_nan

    import copy

    cut = CutEncoder(lite, 1)
    acts = cut.encode(images(4))
    acts[1] = float("nan")
    head = create_head("concat", dims={"image": 1280, "text": 8}, num_classes=3, hidden_dim=16)
    model = TunedModel(head, {"image": copy.deepcopy(cut._top).requires_grad_(True)}, encoder_lr=1e-4)
    model.train()
    assert not model.tops["image"].training  # frozen norm statistics
    with presence_from_nan(head):
        out = model({"image": acts, "text": torch.randn(4, 8)}, torch.ones(4, 2, dtype=torch.bool))
    assert torch.isfinite(out.logits).all() and not out.present[1, 0] and out.present[0, 0]
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0])).backward()
    grads = [p.grad for p in model.tops.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    groups = model.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]


@pytest.mark.parametrize(
    ("strategies", "blocks", "message"),
    [
        (["tuned_nonsense"], {"image": 2}, "unknown strategy 'tuned_nonsense'.*tuned_<strategy>"),
        (["tuned_ensemble"], {"image": 2}, "unknown strategy 'tuned_ensemble'"),
        (["tuned_text_only"], {"image": 2}, "tuned_text_only would tune nothing"),
        (["tuned_concat"], {}, "needs train.finetune.blocks"),
        (["tuned_concat"], {"text": 1}, "'minilm_l6' cannot be fine-tuned"),
        (["tuned_concat"], {"audio": 1}, "names 'audio', but the features have image, text"),
        (["tuned_concat"], {"image": 0}, "must be >= 1"),
    ],
)
def test_a_tuned_strategy_that_cannot_run_fails_before_training(strategies, blocks, message):
    from mmfusion.config import FinetuneParams
    from mmfusion.training.finetune import check_finetune
    from mmfusion.training.strategies import check_strategies

    encoders = {"image": {"encoder": "efficientnet_lite0", "dim": 1280}, "text": {"encoder": "minilm_l6", "dim": 384}}
    with pytest.raises(UserError, match=message):
        check_strategies(tuple(strategies), tuple(encoders))
        check_finetune(tuple(strategies), encoders, FinetuneParams(blocks=blocks))


def test_the_model_version_covers_the_tuned_weights(tmp_path):
    from mmfusion.inference.checkpoint import model_version

    (tmp_path / "model.safetensors").write_bytes(b"head")
    (tmp_path / "config.json").write_text('{"strategy": "tuned_concat"}')
    plain = model_version(tmp_path)
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "image.safetensors").write_bytes(b"top 1")
    one = model_version(tmp_path)
    (tmp_path / "tuned" / "image.safetensors").write_bytes(b"top 2")
    assert len({plain, one, model_version(tmp_path)}) == 3


def test_fit_tuned_is_seeded_and_learns_with_missing_rows(lite, one_torch_thread):
    """The tuning loop itself, on real cut activations of 12 drawings (4 without an image): the same seed gives
    the same tops and head, bit for bit, and the tuned tops moved away from the pretrained weights."""
    from mmfusion.config import parse_params
    from mmfusion.training.data import FeatureSet
    from mmfusion.training.finetune import fit_tuned

    cut = CutEncoder(lite, 1)
    labels = sorted(CLASSES)
    imgs, y = [], []
    for c, label in enumerate(labels):
        for i in range(4):
            img = draw_sample(CLASSES[label][0], seed=10 * c + i, size=48)
            rgb = Image.new("RGB", img.size, (255, 255, 255))
            rgb.paste(img, mask=img.getchannel("A"))
            imgs.append(rgb)
            y.append(c)
    acts = cut.encode(imgs)
    present = torch.ones(len(y), 2, dtype=torch.bool)
    present[[1, 5, 9, 10], 0] = False
    acts[~present[:, 0]] = 0.0
    data = FeatureSet(x={"image": acts, "text": torch.randn(len(y), 8, generator=torch.Generator().manual_seed(0))},
                      y=torch.tensor(y), ids=[f"r{i}" for i in range(len(y))], present=present)  # fmt: skip

    params = parse_params({"train": {"hidden_dim": 16, "finetune": {"blocks": {"image": 1}, "epochs": 3, "batch_size": 4}}})
    encoders = {"image": {"dim": 1280}, "text": {"dim": 8}}
    runs = [fit_tuned("tuned_concat", data, data, labels, encoders, params, {"image": cut._top}, torch.device("cpu")) for _ in range(2)]
    (a, ra), (b, rb) = runs
    assert ra.history == rb.history and ra.epochs_run == 3
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    pretrained = cut._top.state_dict()
    moved = [k for k, v in a.tops["image"].state_dict().items() if v.is_floating_point() and not torch.equal(v, pretrained[k])]
    assert moved and all(torch.isfinite(v).all() for v in a.state_dict().values())
    frozen_stats = [k for k in pretrained if "running_" in k]
    assert frozen_stats and all(torch.equal(a.tops["image"].state_dict()[k], pretrained[k]) for k in frozen_stats)

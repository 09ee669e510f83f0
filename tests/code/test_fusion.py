"""Every registered fusion head: shapes, gradients to every parameter, missing modalities, rebuild from config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmfusion.fusion import create_head, list_heads
from mmfusion.training.loop import compute_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


DIMS = {"image": 12, "text": 8}
CLASSES = 5
BATCH = 6


def _inputs(dims=DIMS, batch=BATCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g) for m, d in dims.items()}


def _mixed_presence(batch=BATCH, modalities=2):
    """Rows with everything, and rows missing each modality in turn (so missing-tokens get gradients too)."""
    present = torch.ones(batch, modalities, dtype=torch.bool)
    for i in range(modalities):
        present[i + 1, i] = False
    return present


def test_registry_has_every_strategy_of_the_issue():
    expected = {"image_only", "text_only", "concat", "weighted_sum", "gated", "attention", "cross_attention", "late"}
    assert expected <= set(list_heads(DIMS))
    assert "late_stacking" in list_heads()
    assert not any(n.endswith("_only") for n in list_heads())  # baselines come from the modalities


def test_a_new_modality_gets_its_baseline_without_new_code():
    dims = {**DIMS, "audio": 6}
    assert "audio_only" in list_heads(dims)
    head = create_head("audio_only", dims, CLASSES, hidden_dim=16).eval()
    assert head.unimodal and head.config["name"] == "audio_only"
    out = head(_inputs(dims), torch.tensor([[True, True, False], [False, False, True]] * (BATCH // 2)))
    assert torch.equal(out.logits[::2], torch.zeros(BATCH // 2, CLASSES))  # no audio: knows nothing
    assert torch.equal(out.weights[1::2], torch.tensor([[0.0, 0.0, 1.0]] * (BATCH // 2)))
    with pytest.raises(ValueError, match="unknown fusion strategy 'audio_only'"):
        create_head("audio_only", DIMS, CLASSES)


def test_unknown_head_fails_loudly():
    with pytest.raises(ValueError, match="unknown fusion strategy 'nope'.*registered: .*concat"):
        create_head("nope", DIMS, CLASSES)


@pytest.mark.parametrize("name", list_heads(DIMS))
def test_output_shapes(name):
    head = create_head(name, DIMS, CLASSES, hidden_dim=16).eval()
    out = head(_inputs())
    assert out.logits.shape == (BATCH, CLASSES)
    assert out.present.shape == (BATCH, 2) and out.present.all()
    if out.weights is not None:
        assert out.weights.shape == (BATCH, 2)
        assert torch.allclose(out.weights.sum(dim=1), torch.ones(BATCH), atol=1e-5)


@pytest.mark.parametrize("name", list_heads(DIMS))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    head = create_head(name, DIMS, CLASSES, hidden_dim=16, dropout=0.0).train()
    out = head(_inputs(), _mixed_presence())
    loss = compute_loss(out, torch.arange(BATCH) % CLASSES, nn.CrossEntropyLoss())
    loss.backward()
    for pname, param in head.named_parameters():
        if name.endswith("_only") and not pname.startswith(("projector", "classifier")):
            continue
        assert param.grad is not None, f"{name}: no gradient for {pname}"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", list_heads(DIMS))
@pytest.mark.parametrize("missing", ["image", "text"])
def test_missing_modality_is_ignored_not_guessed(name, missing):
    """With a modality marked missing, its values must not change the output (and logits stay finite)."""
    head = create_head(name, DIMS, CLASSES, hidden_dim=16).eval()
    present = torch.ones(BATCH, 2, dtype=torch.bool)
    present[:, head.modalities.index(missing)] = False
    a = _inputs(seed=1)
    b = dict(a, **{missing: torch.randn(BATCH, DIMS[missing]) * 100})
    with torch.no_grad():
        out_a, out_b = head(a, present), head(b, present)
        out_absent = head({m: x for m, x in a.items() if m != missing})  # the key left out: missing too
    assert torch.isfinite(out_a.logits).all()
    assert torch.allclose(out_a.logits, out_b.logits, atol=1e-5)
    assert torch.allclose(out_a.logits, out_absent.logits, atol=1e-5)
    if out_a.weights is not None:
        assert (out_a.weights[:, head.modalities.index(missing)] == 0).all()


@pytest.mark.parametrize("name", list_heads())
def test_fusion_heads_are_n_modality_generic(name):
    dims = {"image": 12, "text": 8, "audio": 6}
    head = create_head(name, dims, CLASSES, hidden_dim=16).eval()
    present = _mixed_presence(modalities=3)
    out = head(_inputs(dims), present)
    assert out.logits.shape == (BATCH, CLASSES)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", list_heads(DIMS))
def test_rebuilds_from_its_config(name):
    head = create_head(name, DIMS, CLASSES, hidden_dim=16).eval()
    clone = create_head(**head.config)
    clone.load_state_dict(head.state_dict())
    clone.eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(head(x).logits, clone(x).logits)


def test_weighted_sum_fixed_weights_are_renormalised_over_present_modalities():
    head = create_head("weighted_sum", DIMS, CLASSES, hidden_dim=16, weights={"image": 3.0, "text": 1.0}).eval()
    present = torch.tensor([[True, True], [False, True]])
    out = head(_inputs(batch=2), present)
    assert torch.allclose(out.weights, torch.tensor([[0.75, 0.25], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        create_head("weighted_sum", DIMS, CLASSES, weights={"audio": 1.0})


def test_unimodal_baseline_without_its_modality_is_uniform():
    head = create_head("image_only", DIMS, CLASSES, hidden_dim=16).eval()
    out = head(_inputs(), torch.tensor([[False, True]] * BATCH))
    assert torch.equal(out.logits, torch.zeros(BATCH, CLASSES))

"""Fusion heads under ONNX Runtime (mmfusion.inference.head_runtime): every registered head, any number of modalities."""

from __future__ import annotations

import logging

import pytest
import torch

from mmfusion.errors import UserError
from mmfusion.fusion import create_head, list_heads
from mmfusion.fusion.base import FusionHead, FusionOutput
from mmfusion.inference.head_runtime import HeadExportError, check_inputs, compile_head, presence_patterns

# two modalities as today, three as with audio next: small dims keep the exports quick
SHAPES = {
    "image+text": {"image": 24, "text": 16},
    "image+text+audio": {"image": 24, "text": 16, "audio": 12},
}


def _heads():
    for shape, dims in SHAPES.items():
        for name in list_heads(dims):
            yield pytest.param(shape, name, id=f"{shape}-{name}")
        yield pytest.param(shape, "bag", id=f"{shape}-bag")  # a CV bag: an ensemble of fold heads


def _build(shape: str, name: str) -> FusionHead:
    torch.manual_seed(0)
    dims = SHAPES[shape]
    if name == "bag":
        head = create_head("ensemble", dims, 5, hidden_dim=8, members=[{"name": "gated"}, {"name": "late"}, {"name": "concat"}])
    else:
        head = create_head(name, dims, 5, hidden_dim=8)
    for p in head.parameters():  # trained-looking weights (zero inits would hide wiring mistakes)
        torch.nn.init.normal_(p, std=0.3)
    return head.eval()


@pytest.mark.parametrize("shape,name", list(_heads()))
def test_every_head_runs_under_onnx_runtime_with_torchs_answers(shape, name):
    head = _build(shape, name)
    runner = compile_head(head, "onnx")
    assert runner.runtime == "onnx"
    x, mask = check_inputs(head, 3 * len(presence_patterns(len(head.modalities))), seed=7)  # not the check's inputs
    with torch.no_grad():
        out = head(x, mask)
    logits, weights = runner(x, mask)
    assert torch.allclose(logits, out.logits, atol=1e-5)
    assert runner.gives_weights == (out.weights is not None)
    if out.weights is not None:
        assert torch.allclose(weights, out.weights, atol=1e-5)
    one = {m: v[:1] for m, v in x.items()}  # the batch axis is dynamic: a lone request too
    assert torch.allclose(runner(one, mask[:1])[0], out.logits[:1], atol=1e-5)


class BranchyHead(FusionHead):
    """Exports without error but wrongly: a Python branch on the mask is frozen into the trace."""

    name = "branchy"

    def __init__(self, dims, num_classes):
        super().__init__(dims, num_classes)
        self.out = torch.nn.Linear(sum(dims.values()), num_classes)

    def forward(self, embeddings, present=None) -> FusionOutput:
        present = self.presence(embeddings, present)
        x = torch.cat([embeddings[m] for m in self.modalities], dim=1)
        if bool(present.all()):  # traced once, with whatever mask the export used
            x = x * 2
        return FusionOutput(logits=self.out(x), present=present)


def test_a_head_whose_export_disagrees_with_torch_is_served_by_torch_or_refused(caplog):
    head = BranchyHead({"image": 6, "text": 4}, 3).eval()
    with caplog.at_level(logging.WARNING, logger="mmfusion.inference.head_runtime"):
        runner = compile_head(head, "auto")
    assert runner.runtime == "torch"
    assert "runs in torch" in caplog.text and "differ from torch" in caplog.text
    with pytest.raises(HeadExportError, match="branchy cannot run under ONNX Runtime: the exported head's logits differ"):
        compile_head(head, "onnx")
    # the torch runner is the head itself
    x, mask = check_inputs(head, 4, seed=3)
    assert torch.equal(runner(x, mask)[0], head(x, mask).logits)


def test_an_unknown_head_runtime_is_a_clear_error():
    with pytest.raises(UserError, match="unknown head runtime 'tensorrt'; expected one of auto, torch, onnx"):
        compile_head(_build("image+text", "concat"), "tensorrt")

"""Head runtimes: a trained fusion head run by torch, or exported to ONNX and run by ONNX Runtime.

    runner = compile_head(head, "auto", device="cpu", threads=1)
    logits, weights = runner({"image": x_img, "text": x_txt}, present)   # torch tensors; weights None if the head has none

    torch   the head itself (eager)
    onnx    exported from that head (opset 17, dynamic batch) and run by ONNX Runtime in fp32
    auto    onnx on CPU, torch on CUDA; torch (with a warning) where the export fails or disagrees

A head is a few dozen small ops, so at serving batch sizes eager torch spends its time in
per-op Python dispatch, not arithmetic: measured at batch 3 on one thread of the 2-core CPU, a
CV bag of five concat heads took 6.8 ms in torch and 0.8 ms in ONNX Runtime (docs/results.md,
"Speed, served"). The export is built in memory when a Predictor loads (well under a second)
and checked before use: on random embeddings with every presence pattern the head can see, at
two batch sizes, its logits and modality weights must match torch's within `ATOL`. A head whose
trace does not generalise (data-dependent Python branches) fails that check instead of
silently serving something else. Nothing is cached on disk: the export is a function of the
weights the model folder already holds.
"""

from __future__ import annotations

import io
import itertools
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mmfusion.encoders.runtime import create_session_options
from mmfusion.errors import UserError

log = logging.getLogger(__name__)

HEAD_RUNTIMES = ("torch", "onnx")
AUTO = "auto"
OPSET = 17
ATOL = 1e-4  # logits and weights, ONNX vs torch (measured agreement of every registered head: < 1e-6)


def check_head_runtime(runtime: str, where: str = "head runtime") -> str:
    runtime = str(runtime).strip().lower()
    if runtime not in (AUTO, *HEAD_RUNTIMES):
        raise UserError(f"{where}: unknown head runtime {runtime!r}; expected one of {', '.join((AUTO, *HEAD_RUNTIMES))}")
    return runtime


class HeadExportError(UserError):
    """The head could not be exported to ONNX, or its export disagrees with torch."""


def presence_patterns(modalities: int) -> Tensor:
    """Every non-empty presence row over `modalities` columns: `[2**M - 1, M]` bool."""
    rows = [bits for bits in itertools.product((True, False), repeat=modalities) if any(bits)]
    return torch.tensor(rows, dtype=torch.bool)


def check_inputs(head: nn.Module, batch: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """Random embeddings (on the head's scale: unit normal) and a mask cycling through every presence pattern."""
    gen = torch.Generator().manual_seed(seed)
    patterns = presence_patterns(len(head.modalities))
    mask = patterns[torch.arange(batch) % len(patterns)]
    x = {m: torch.randn(batch, int(head.dims[m]), generator=gen) for m in head.modalities}
    return x, mask


class _Flat(nn.Module):
    """The head with positional tensor inputs (one per modality, then the mask) and tuple outputs, for export."""

    def __init__(self, head: nn.Module, gives_weights: bool):
        super().__init__()
        self.head = head
        self.gives_weights = gives_weights

    def forward(self, *args: Tensor):
        *embeddings, present = args
        out = self.head(dict(zip(self.head.modalities, embeddings)), present)
        return (out.logits, out.weights) if self.gives_weights else (out.logits,)


@dataclass
class HeadRunner:
    """Calls a head on `({modality: [B, dim] tensor}, present [B, M] bool)`; gives (logits, weights or None)."""

    head: nn.Module
    runtime: str
    gives_weights: bool
    session: object | None = None  # onnxruntime.InferenceSession for runtime onnx
    inputs: tuple[str, ...] = ()  # the session's inputs (the exporter drops those a head never reads)

    def __call__(self, x: dict[str, Tensor], present: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.session is None:
            out = self.head(x, present)
            return out.logits, out.weights
        feed = {name: (present if name == "present" else x[name]).detach().cpu().numpy() for name in self.inputs}
        outs = self.session.run(None, feed)
        logits = torch.from_numpy(outs[0])
        return logits, torch.from_numpy(outs[1]) if self.gives_weights else None


def _gives_weights(head: nn.Module, device: torch.device) -> bool:
    x, mask = check_inputs(head, 2, seed=0)
    with torch.no_grad():
        return head({m: v.to(device) for m, v in x.items()}, mask.to(device)).weights is not None


def export_head(head: nn.Module, gives_weights: bool, threads: int = 1):
    """An ONNX Runtime session of the head (exported in memory), and its input names."""
    import onnxruntime as ort

    flat = _Flat(head, gives_weights).eval()
    x, mask = check_inputs(head, len(presence_patterns(len(head.modalities))), seed=1)
    names = [*head.modalities, "present"]
    outputs = ["logits", "weights"] if gives_weights else ["logits"]
    buf = io.BytesIO()
    # the TorchScript exporter warns about every traced shape; a bad trace is caught by `verify`.
    # nn.MultiheadAttention's inference fast path is one fused op ONNX has no export for: trace the plain ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(
                flat,
                (*(x[m] for m in head.modalities), mask),
                buf,
                input_names=names,
                output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in names + outputs},
                opset_version=OPSET,
                dynamo=False,
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    session = ort.InferenceSession(buf.getvalue(), create_session_options(threads), providers=["CPUExecutionProvider"])
    return session, tuple(i.name for i in session.get_inputs())


def verify(runner: HeadRunner, reference: HeadRunner, batches: tuple[int, ...] = (1, 11)) -> float:
    """Largest |difference| of logits and weights between two runners on every presence pattern; raises over ATOL."""
    worst = 0.0
    for seed, batch in enumerate(batches, start=2):
        x, mask = check_inputs(runner.head, batch, seed)
        with torch.no_grad():
            got, want = runner(x, mask), reference(x, mask)
        for name, a, b in (("logits", got[0], want[0]), ("weights", got[1], want[1])):
            if (a is None) != (b is None):
                raise HeadExportError(f"the exported head's {name} are {'missing' if a is None else 'extra'}")
            if a is None:
                continue
            if a.shape != b.shape:
                raise HeadExportError(f"the exported head's {name} have shape {tuple(a.shape)}, torch's {tuple(b.shape)}")
            diff = float((a.float() - b.float().cpu()).abs().max())
            if not diff <= ATOL:  # NaN too
                raise HeadExportError(f"the exported head's {name} differ from torch by {diff:.3g} (> {ATOL}) at batch {batch}")
            worst = max(worst, diff)
    return worst


def compile_head(head: nn.Module, runtime: str = AUTO, device: torch.device | str = "cpu", threads: int = 1) -> HeadRunner:
    """A runner for `head` under `runtime` (module docstring); `threads`: ONNX Runtime's intra-op threads."""
    runtime = check_head_runtime(runtime)
    device = torch.device(device)
    head = head.eval()
    name = getattr(head, "name", type(head).__name__)
    gives_weights = _gives_weights(head, device)
    torch_runner = HeadRunner(head, "torch", gives_weights)
    if runtime == "torch" or (runtime == AUTO and device.type != "cpu"):
        return torch_runner
    if device.type != "cpu":
        raise HeadExportError(f"head runtime onnx runs on the CPU; this model is on {device} (use auto or torch)")
    try:
        session, inputs = export_head(head, gives_weights, threads)
        runner = HeadRunner(head, "onnx", gives_weights, session, inputs)
        diff = verify(runner, torch_runner)
    except Exception as exc:  # noqa: BLE001 - any export failure is the same decision: torch, or a clear error
        reason = exc if isinstance(exc, HeadExportError) else f"{type(exc).__name__}: {exc}"
        if runtime == AUTO:
            log.warning("fusion head %s runs in torch: its ONNX export is unusable (%s)", name, reason)
            return torch_runner
        raise HeadExportError(f"fusion head {name} cannot run under ONNX Runtime: {reason}") from exc
    log.info("fusion head %s runs in ONNX Runtime (max |diff| to torch %.2g)", name, diff)
    return runner

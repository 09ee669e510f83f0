"""Explanations: which words, image regions and time segments made the model decide, through Captum.

    explainer = Explainer(predictor, params.package.explain)
    explainer.explain({"image": pil_rgb, "text": "grinning face"}, overlay=True)

Each present modality of an item comes apart into parts (`ModalitySpec.parts`: words, an N x N grid of
image cells, time segments; `mmfusion.modalities.parts`). Captum's perturbation attributions (feature
ablation, Shapley value sampling, KernelSHAP, LIME) run over one binary vector with an entry per part:
1 keeps the part, 0 removes it. The model behind that vector rebuilds the perturbed inputs and sends
them through the model's own encoders and head, under the runtimes the service runs (ONNX, int8), so
an explanation explains the served model, not a float copy of it. Embeddings of a modality's rebuilt
value are computed once per explanation (the text stays whole while image cells are removed).

The attribution of a part is its effect on the predicted class's calibrated probability (feature
ablation: the drop when it alone is removed). The cost is bounded: an explanation needs a known number
of model evaluations (`cost`), and one over `max_evaluations` is refused before any work
(`ExplainTooCostly`, the service's 413).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmfusion.errors import UserError
from mmfusion.modalities.parts import Parts, RegionParts, b64

METHODS = ("feature_ablation", "shapley_sampling", "kernel_shap", "lime")


class ExplainTooCostly(ValueError):
    """The explanation would need more model evaluations than the limit allows; nothing was computed."""

    def __init__(self, needed: int, limit: int, parts: Mapping[str, int]):
        detail = ", ".join(f"{m} {n} part{'s' * (n != 1)}" for m, n in parts.items())
        super().__init__(f"the explanation needs {needed} model evaluations ({detail}), over the limit of {limit} "
                         "(package.explain.max_evaluations): send a shorter text or clip")  # fmt: skip
        self.needed, self.limit = needed, limit


def check_settings(s: Any) -> None:
    """package.explain, checked once: a method Captum runs here, and positive sizes."""
    if s.method not in METHODS:
        raise UserError(f"package.explain.method: {s.method!r} is not one of {', '.join(METHODS)}")
    for key in ("samples", "max_evaluations", "batch_size", "image_grid", "audio_segments"):
        if int(getattr(s, key)) < 1:
            raise UserError(f"package.explain.{key}: must be at least 1, got {getattr(s, key)!r}")
    if int(getattr(s, "max_pending", 0)) < 0:
        raise UserError(f"package.explain.max_pending: 0 (no limit) or more, got {s.max_pending!r}")


def evaluations(method: str, parts: int, samples: int) -> int:
    """Model evaluations an explanation of `parts` parts costs (the unperturbed input included)."""
    if method == "feature_ablation":
        return parts + 1
    if method == "shapley_sampling":
        return samples * parts + 1
    return samples + 1


class Explainer:
    """Attributions of one item's prediction to the parts of its inputs, through a Predictor."""

    def __init__(self, predictor: Any, settings: Any, seed: int = 0):
        check_settings(settings)
        self.predictor = predictor
        self.settings = settings
        self.seed = seed

    def parts(self, item: Mapping[str, Any]) -> dict[str, Parts]:
        """{modality: its parts} for the modalities the item carries (as the Predictor reads them)."""
        out = {}
        for m, spec in self.predictor.inputs.items():
            value = spec.value(item.get(m))
            if value is not None:
                out[m] = spec.parts(value, self.settings)
        if not out:
            raise ValueError(f"the item has none of the modalities {list(self.predictor.modalities)}")
        return out

    def cost(self, parts: Mapping[str, Parts]) -> int:
        return evaluations(self.settings.method, sum(p.n for p in parts.values()), int(self.settings.samples))

    def check_cost(self, item: Mapping[str, Any]) -> dict[str, Parts]:
        """The item's parts, or ExplainTooCostly when explaining it would cost more than the limit."""
        parts = self.parts(item)
        needed = self.cost(parts)
        if needed > self.settings.max_evaluations:
            raise ExplainTooCostly(needed, int(self.settings.max_evaluations), {m: p.n for m, p in parts.items()})
        return parts

    def explain(self, item: Mapping[str, Any], overlay: bool = False, target: str | None = None,
                parts: Mapping[str, Parts] | None = None) -> dict[str, Any]:  # fmt: skip
        """Attributions of the prediction of `item` (or of class `target`) per part of each present modality.

        {method, target, probability (of the target, everything kept), evaluations, seconds,
        modalities: {modality: {kind, parts or attributions, total, overlay_png (images, with `overlay`)}}}"""
        t0 = time.perf_counter()
        model, c, probs, attr = self.attribute(item, target, parts)
        out = {}
        for m, p in model.parts.items():
            a = attr[model.slices[m]]
            out[m] = {**p.describe(a), "total": round(float(a.sum()), 5)}
            if overlay and isinstance(p, RegionParts):
                out[m]["overlay_png"] = b64(p.overlay_png(a))
        return {
            "method": self.settings.method,
            "target": self.predictor.labels[c],
            "probability": round(float(probs[c]), 5),
            "evaluations": model.evaluations,
            "seconds": round(time.perf_counter() - t0, 3),
            "modalities": out,
        }

    def attribute(self, item: Mapping[str, Any], target: str | None = None, parts: Mapping[str, Parts] | None = None
                  ) -> tuple[PerturbedModel, int, np.ndarray, np.ndarray]:  # fmt: skip
        """The unrounded attributions behind `explain`: (the perturbed model, with its parts' `slices` and embeddings
        cache; the target class index; the probabilities with every part kept; attributions [parts])."""
        import torch

        parts = dict(parts) if parts is not None else self.check_cost(item)
        model = PerturbedModel(self.predictor, parts)
        ones = torch.ones(1, model.width, dtype=torch.float32)
        probs = model(ones)[0].numpy()
        model.evaluations = 0  # Captum evaluates the whole item again (its embeddings cached): the count is `cost`'s
        c = self.predictor.labels.index(target) if target is not None else int(probs.argmax())
        return model, c, probs, self._attribute(model, ones, c).reshape(-1)

    def _attribute(self, model: PerturbedModel, ones: Any, target: int) -> np.ndarray:
        import torch
        from captum import attr as ca

        s = self.settings
        common = {"target": target, "baselines": 0.0, "perturbations_per_eval": int(s.batch_size)}
        with torch.random.fork_rng(devices=[]):  # the sampling methods draw from torch's RNG: seeded, repeatable
            torch.manual_seed(self.seed)
            if s.method == "feature_ablation":
                out = ca.FeatureAblation(model).attribute(ones, **common)
            elif s.method == "shapley_sampling":
                out = ca.ShapleyValueSampling(model).attribute(ones, n_samples=int(s.samples), **common)
            elif s.method == "kernel_shap":
                out = ca.KernelShap(model).attribute(ones, n_samples=int(s.samples), **common)
            else:
                out = ca.Lime(model).attribute(ones, n_samples=int(s.samples), **common)
        return out.detach().float().numpy()


class PerturbedModel:
    """The model as a function of a binary vector over the parts of one item: each row of `x` [B, parts] keeps the
    parts where it is 1 and removes the others; returns the calibrated probabilities [B, classes] (a torch tensor,
    as Captum wants). Each modality's embedding of a rebuilt value is computed once (keyed by its mask)."""

    def __init__(self, predictor: Any, parts: Mapping[str, Parts]):
        self.predictor = predictor
        self.parts = dict(parts)
        self.slices: dict[str, slice] = {}
        start = 0
        for m, p in self.parts.items():
            self.slices[m] = slice(start, start + p.n)
            start += p.n
        self.width = start
        self.cache: dict[str, dict[bytes, np.ndarray | None]] = {m: {} for m in self.parts}
        self.evaluations = 0

    def _embeddings(self, m: str, masks: np.ndarray) -> list[np.ndarray | None]:
        cache = self.cache[m]
        keys = [np.packbits(row).tobytes() + bytes([row.size % 8]) for row in masks]
        todo = {}
        for key, row in zip(keys, masks):
            if key not in cache and key not in todo:
                todo[key] = self.parts[m].rebuild(row)
        values = {k: v for k, v in todo.items() if v is not None}
        if values:
            for k, e in zip(values, self.predictor.encode(m, list(values.values()))):
                cache[k] = e
        cache.update({k: None for k, v in todo.items() if v is None})
        return [cache[k] for k in keys]

    def __call__(self, x: Any) -> Any:
        import torch

        rows = x.detach().cpu().numpy() > 0.5
        n = len(rows)
        self.evaluations += n
        p = self.predictor
        present = np.zeros((n, len(p.modalities)), dtype=bool)
        emb = {m: np.zeros((n, int(p.head.dims[m])), dtype=np.float32) for m in p.modalities}
        for j, m in enumerate(p.modalities):
            if m not in self.parts:
                continue
            for i, e in enumerate(self._embeddings(m, rows[:, self.slices[m]])):
                if e is not None:
                    emb[m][i], present[i, j] = e, True
        return torch.from_numpy(p.head_probabilities(emb, present))

"""Predictor: a model directory (models/best) rebuilt into encoders + fusion head, for evaluation, batch and serving.

    p = Predictor.from_dir("models/best", device="auto")
    p.predict([{"image": pil_rgb, "text": "grinning face"}, {"image": None, "text": "red apple"}])

Inputs are what the service has after decoding: images are PIL RGB (from
`mmfusion.modalities.image.decode_image`), text is raw (the predictor normalises it with the
same `normalize_text` setting cleaning used). Either may be missing (None, or text that is
empty after normalisation), not both.

Missing modalities, in `embed` and `predict_embeddings`: an embedding row of a missing
modality is all zeros and is ignored; what says it is missing is the `present` mask
({modality: bool array [N]}), never the values. `Predictor.presence(items)` builds that mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfusion.devices import resolve_device
from mmfusion.inference.checkpoint import load_checkpoint, model_version, read_metrics, read_temperature
from mmfusion.inference.head_runtime import compile_head
from mmfusion.modalities import ModalitySpec, recorded_settings, row_item, specs_for

# Encoders run concurrently for batches up to this size (bench/serve.py, 2 cores: a lone request's
# p50 46 -> 34 ms; sequential for larger batches kept c=32 throughput, concurrent lowered it).
PARALLEL_MAX_ITEMS = 2


class Predictor:
    """Encoders + fusion head + label map + calibration from one self-describing model directory."""

    def __init__(
        self,
        head: torch.nn.Module,
        config: dict[str, Any],
        encoders: dict[str, Any],
        temperature: float = 1.0,
        metrics: dict | None = None,
        version: str = "",
        device: torch.device | str = "cpu",
        head_runtime: str = "torch",
    ):
        self.head = head.eval()
        self.config = config
        self._encoders = encoders
        self.temperature = float(temperature)
        self.metrics: dict = metrics or {}
        self.device = torch.device(device)
        self.labels: list[str] = list(config["labels"])
        self.strategy: str = config["strategy"]
        self.modalities: tuple[str, ...] = tuple(head.modalities)
        self.encoders: dict[str, str] = {m: config["encoders"][m]["encoder"] for m in self.modalities}
        self.runtimes: dict[str, str] = {m: getattr(encoders.get(m), "runtime", "torch") for m in self.modalities}
        # each input's preprocessing as the model folder records it (never params): decode, normalise, check
        self.inputs: dict[str, ModalitySpec] = specs_for(self.modalities, settings=recorded_settings(config))
        self.version = version
        # Small batches (a lone request) run each modality's encoder on its own thread (ONNX Runtime
        # and torch release the GIL), so their latency is the slowest encoder's, not the sum; larger
        # batches (a loaded server, whose cores are all busy anyway) run them one after the other.
        self.parallel_max_items = PARALLEL_MAX_ITEMS
        # the head under its runtime (mmfusion.inference.head_runtime: auto = ONNX Runtime on CPU), which also
        # says whether the head gives its own modality weights or needs ablations for contributions
        self._head = compile_head(self.head, head_runtime, self.device, threads=max(1, torch.get_num_threads()))
        self.head_runtime = self._head.runtime
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        device: str = "auto",
        encoders: dict[str, Any] | None = None,
        onnx_cache_dir: str | Path | None = None,
        head_runtime: str = "auto",
    ) -> Predictor:
        """Rebuild a predictor from `model_dir`; `encoders` ({modality: encoder}) overrides creation by name (tests).

        Encoders run under the runtime the model folder recorded (torch, onnx, onnx-int8: the one
        featurize used), their ONNX files from `onnx_cache_dir` ($MMFUSION_ONNX_CACHE or
        .cache/onnx by default), rebuilt offline when missing. ONNX Runtime gets torch's current
        thread count. Each encoder's fingerprint must match the one the head was trained on: a
        different encoder, preprocessing or runtime would feed the head embeddings it has never seen.
        The fusion head runs under `head_runtime` (`mmfusion.inference.head_runtime`: auto is ONNX
        Runtime on CPU, checked against torch when it loads).
        """
        model_dir = Path(model_dir)
        dev = resolve_device(device)
        head, config = load_checkpoint(model_dir, dev)
        if encoders is None:
            from mmfusion.encoders import create_encoder

            threads = torch.get_num_threads()
            encoders = {}
            for m in head.modalities:
                entry = config["encoders"][m]
                encoder = create_encoder(entry["encoder"], device=str(dev))
                if entry.get("tuned"):  # fine-tuned top weights in the model folder (mmfusion.training.finetune)
                    encoder.load_tuned(model_dir / entry["tuned"]["file"])
                encoders[m] = encoder.set_runtime_from(entry.get("runtime"), threads=threads, cache_dir=onnx_cache_dir)
        for m in head.modalities:
            if m not in encoders:
                raise ValueError(f"model needs an encoder for modality {m!r}")
            want = config["encoders"][m].get("fingerprint")
            got = getattr(encoders[m], "fingerprint", None)
            if want and got != want:
                raise ValueError(
                    f"encoder for {m!r} has fingerprint {got!r} but the model was trained on {want!r}: "
                    "re-run featurize and train with this encoder"
                )
        temperature, metrics = read_temperature(model_dir), read_metrics(model_dir)
        return cls(head, config, encoders, temperature, metrics, model_version(model_dir, config), dev, head_runtime)

    # -- inputs ---------------------------------------------------------------------------------

    def _value(self, item: dict, modality: str) -> Any:
        return self.inputs[modality].value(item.get(modality))

    def read_rows(self, rows: Iterable[Mapping[str, Any]], root: str | Path) -> list[dict]:
        """Manifest rows (file values relative to `root`) as Predictor items, read with the model's recorded
        preprocessing: the one conversion evaluate's raw check and promotion use (an empty cell is missing)."""
        specs = specs_for(self.modalities, root, {m: spec.settings for m, spec in self.inputs.items()})
        return [row_item(r, specs) for r in rows]

    def presence(self, items: Sequence[dict]) -> dict[str, np.ndarray]:
        """{modality: bool [N]}: which items carry each modality. An item with none is an error."""
        present = {m: np.array([self._value(it, m) is not None for it in items], dtype=bool) for m in self.modalities}
        empty = [i for i in range(len(items)) if not any(present[m][i] for m in self.modalities)]
        if empty:
            raise ValueError(f"item {empty[0]} has none of the modalities {list(self.modalities)}")
        return present

    @torch.no_grad()
    def embed(self, items: Sequence[dict]) -> dict[str, np.ndarray]:
        """{modality: float32 [N, dim]} through the model's encoders; rows of a missing modality are zeros.

        Batches of up to `parallel_max_items` with more than one modality run the encoders
        concurrently, one thread each (docs/results.md, "Speed, served")."""
        present = self.presence(items)
        jobs = {}
        for m in self.modalities:
            rows = np.flatnonzero(present[m])
            if len(rows):
                jobs[m] = (rows, [self._value(items[i], m) for i in rows])
        if len(jobs) > 1 and len(items) <= self.parallel_max_items:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=len(self.modalities), thread_name_prefix="encoder")
            futures = {m: self._pool.submit(self.encode, m, values) for m, (_, values) in jobs.items()}
            encoded = {m: f.result() for m, f in futures.items()}
        else:
            encoded = {m: self.encode(m, values) for m, (_, values) in jobs.items()}
        out = {}
        for m in self.modalities:
            arr = np.zeros((len(items), int(self.head.dims[m])), dtype=np.float32)
            if m in jobs:
                arr[jobs[m][0]] = encoded[m]
            out[m] = arr
        return out

    @torch.no_grad()
    def encode(self, modality: str, values: list) -> np.ndarray:
        """float32 [len(values), dim]: `values` (present, as the encoder takes them) through `modality`'s encoder."""
        return self._encoders[modality].encode(values).detach().float().cpu().numpy()

    def head_probabilities(self, embeddings: dict[str, np.ndarray], present: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [N, classes] from embeddings and the presence mask [N, modalities] (in
        `self.modalities` order), without contributions: what explanations' many perturbed calls need. A row with
        no modality present gets the uniform distribution (what is left when everything was removed)."""
        present = np.asarray(present, dtype=bool)
        out = np.full((len(present), len(self.labels)), 1.0 / len(self.labels), dtype=np.float32)
        rows = np.flatnonzero(present.any(axis=1))
        if len(rows):
            x = {m: torch.as_tensor(np.asarray(embeddings[m][rows], np.float32), device=self.device) for m in self.modalities}
            out[rows], _ = self._probs(x, torch.as_tensor(present[rows], device=self.device))
        return out

    # -- prediction -----------------------------------------------------------------------------

    @torch.no_grad()
    def _probs(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        logits, weights = self._head(x, mask)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1).cpu().numpy()
        return probs, weights.float().cpu().numpy() if weights is not None else None

    def predict_embeddings(
        self, embeddings: dict[str, np.ndarray], present: dict[str, Sequence[bool]] | None = None
    ) -> list[dict]:
        """Predict from embeddings (as from `embed`); `present` defaults to every modality given in `embeddings`.

        Contributions: the head's own per-sample modality weights (attention, gates, late-fusion
        weights) where it has them; otherwise ablation deltas: how much the predicted class's
        probability drops when each modality is hidden, normalised to sum to 1.
        """
        n = len(next(iter(embeddings.values())))
        x = {}
        cols = []
        for m in self.modalities:
            if m in embeddings:
                x[m] = torch.as_tensor(np.asarray(embeddings[m], dtype=np.float32), device=self.device)
                given = np.ones(n, dtype=bool) if present is None or m not in present else np.asarray(present[m], bool)
            else:
                x[m] = torch.zeros(n, int(self.head.dims[m]), device=self.device)
                given = np.zeros(n, dtype=bool)
            cols.append(given)
        mask_np = np.stack(cols, axis=1)
        if not mask_np.any(axis=1).all():
            raise ValueError("every item needs at least one modality present")
        if self._head.gives_weights:
            probs, weights = self._probs(x, torch.as_tensor(mask_np, device=self.device))
        else:  # ablations: the prediction and every hidden-modality variant in one head call
            probs, weights = self._probs_with_ablations(x, mask_np)
        pred = probs.argmax(axis=1)
        results = []
        for i in range(n):
            results.append(
                {
                    "label": self.labels[pred[i]],
                    "probabilities": {label: float(probs[i, c]) for c, label in enumerate(self.labels)},
                    "contributions": {m: float(weights[i, j]) if mask_np[i, j] else 0.0 for j, m in enumerate(self.modalities)},
                    "embeddings": {
                        m: x[m][i].cpu().tolist() for j, m in enumerate(self.modalities) if mask_np[i, j]
                    },
                }
            )
        return results

    def _hidden_masks(self, mask_np: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(modality index, mask with it hidden, rows where hiding it leaves something) per modality that has such rows."""
        out = []
        for j in range(mask_np.shape[1]):
            hidden = mask_np.copy()
            hidden[:, j] = False
            ok = mask_np[:, j] & hidden.any(axis=1)  # only where hiding it leaves something
            if ok.any():
                out.append((j, np.where(hidden.any(axis=1, keepdims=True), hidden, mask_np), ok))
        return out

    def _contributions(self, mask_np, probs, pred, hidden, p_hidden) -> np.ndarray:
        """Per modality, the drop of the predicted class's probability when it is hidden, normalised to sum to 1."""
        n = len(pred)
        rows = np.arange(n)
        deltas = np.zeros(mask_np.shape, dtype=np.float64)
        for t, (j, _, ok) in enumerate(hidden):
            p_without = p_hidden[t * n : (t + 1) * n]
            deltas[ok, j] = np.clip(probs[rows, pred] - p_without[rows, pred], 0, None)[ok]
        totals = deltas.sum(axis=1, keepdims=True)
        uniform = mask_np / mask_np.sum(axis=1, keepdims=True)
        return np.where(totals > 0, deltas / np.where(totals > 0, totals, 1), uniform)

    def _stacked(self, x: dict[str, torch.Tensor], masks: list[np.ndarray]):
        """The inputs repeated once per mask, and the masks one after the other: one head call for all."""
        xs = {m: v.repeat(len(masks), *([1] * (v.dim() - 1))) for m, v in x.items()}
        return xs, torch.as_tensor(np.concatenate(masks), device=self.device)

    def _probs_with_ablations(self, x, mask_np: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and ablation contributions from one head call (a head without its own weights)."""
        n = len(mask_np)
        hidden = self._hidden_masks(mask_np)
        p_all, _ = self._probs(*self._stacked(x, [mask_np] + [h for _, h, _ in hidden]))
        probs = p_all[:n]
        return probs, self._contributions(mask_np, probs, probs.argmax(axis=1), hidden, p_all[n:])

    def predict(self, items: Sequence[dict]) -> list[dict]:
        """Label, calibrated probabilities, per-modality contributions and embeddings for each item."""
        if not items:
            return []
        present = self.presence(items)
        return self.predict_embeddings(self.embed(items), present)

    def describe(self) -> dict:
        """The model in one JSON-able dict: what the package stage records and the service reports."""
        return {
            "version": str(self.version),
            "strategy": self.strategy,
            "labels": list(self.labels),
            "modalities": list(self.modalities),
            "encoders": dict(self.encoders),
            "inputs": {m: dict(spec.settings) for m, spec in self.inputs.items()},
            "runtimes": self.runtimes,
            "head_runtime": self.head_runtime,
            "temperature": self.temperature,
            "metrics": self.metrics,
        }

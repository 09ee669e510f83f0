"""Fine-tuning: strategy `tuned_<strategy>` trains that strategy's head together with the top blocks of its encoders.

    train.strategies: [..., tuned_weighted_sum]     train.finetune.blocks: {image: 2}

How a tuned strategy is trained, without paying for the whole encoder every epoch:

1. Each tuned modality's pretrained encoder is cut (`Encoder.bottom` / `Encoder.top`). The frozen bottom
   runs once per row as a `CutEncoder` through the content-addressed feature cache, so its activations
   are computed once and reused by every epoch, fold and rerun (fp32 torch, never int8).
2. `TunedModel` = the trainable tops + the strategy's head (built and seeded as the frozen strategy is).
   The project's train loop trains it (`train_head`: AdamW, warm-up + cosine, modality dropout, early
   stopping on val macro-F1), with the tops at `train.finetune.encoder_lr` and the head at `train.lr`;
   the tops stay in eval mode (frozen norm statistics: the batches are small).
3. The tuned tops are saved into the model folder (`tuned/<modality>.safetensors`, the encoder's own
   keys) and named in config.json (`encoders.<modality>.tuned`). `Encoder.load_tuned` hashes them into
   the encoder's fingerprint, so everything keyed by it follows with no code of its own: the ONNX export
   and int8 calibration (with the fidelity guard), the feature cache, the Predictor's check and the Bento.
4. The strategy's own features are those of the tuned encoders under the runtime featurize uses
   (`<strategy folder>/features/`, written by featurize's `build_features`): evaluate scores the tuned
   model on them, and the drift reference is made from them, so the served model, its evaluation and its
   monitoring see the same embeddings.

Under cross-validated selection (evaluate) a tuned strategy is tuned again on each fold (`fit_tuned_fold`, one
trial per strategy and fold through `compute.map_tasks`, as the frozen strategies' folds); its served model is the
one train fitted (train split, early stopping on val), not a bag of k tuned encoders.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mmfusion import paths
from mmfusion.config import FinetuneParams, Params
from mmfusion.errors import UserError
from mmfusion.fusion import FusionHead, create_head
from mmfusion.fusion.registry import TUNED_PREFIX, base_strategy, is_tuned  # noqa: F401 - re-exported
from mmfusion.training.data import FeatureSet
from mmfusion.training.loop import TrainResult, predict_logits, seed_everything
from mmfusion.training.presence import mark_missing, presence_from_nan
from mmfusion.training.strategies import head_options, model_config, torch_threads, train_with_presence

log = logging.getLogger(__name__)

TUNED_DIR = "tuned"  # in a model folder: <modality>.safetensors
FEATURES_DIR = "features"  # in a tuned strategy's folder: its own features (never copied into models/best)


def read_modalities(head: FusionHead) -> tuple[str, ...]:
    """The modalities a head reads (a `<modality>_only` baseline: that one)."""
    return (head.modality,) if getattr(head, "unimodal", False) else tuple(head.modalities)


def tuned_modalities(name: str, head: FusionHead, p: FinetuneParams) -> dict[str, int]:
    """{modality: top blocks} that strategy `name` (with `head`) tunes."""
    return {m: k for m, k in p.blocks.items() if m in read_modalities(head)} if is_tuned(name) else {}


def strategy_blocks(name: str, encoders: dict[str, dict], p: FinetuneParams) -> tuple[dict[str, int], FusionHead]:
    """(`tuned_modalities`, an untrained head of the strategy) for features made by `encoders`."""
    head = create_head(base_strategy(name), dims={m: e["dim"] for m, e in encoders.items()}, num_classes=2)
    return tuned_modalities(name, head, p), head


def pretrained_tops(encoders: dict[str, dict], blocks: dict[str, int], device: torch.device) -> dict[str, nn.Module]:
    """Each modality's pretrained top (`Encoder.top`) of its `blocks` last blocks; `fit_tuned` trains copies."""
    from mmfusion.encoders import create_encoder

    return {m: create_encoder(encoders[m]["encoder"], device=str(device)).top(k) for m, k in blocks.items()}


def check_finetune(names: tuple[str, ...], encoders: dict[str, dict], p: FinetuneParams) -> None:
    """Fail before any training on a tuned strategy that cannot run: nothing to tune, a modality the features
    lack, an encoder that cannot be cut, a bad number of blocks or epochs."""
    tuned = [n for n in names if is_tuned(n)]
    if not tuned:
        return
    from mmfusion.encoders import create_encoder

    if not p.blocks:
        raise UserError(f"{tuned[0]} needs train.finetune.blocks ({{modality: top blocks to train}}); it is empty")
    for m, k in p.blocks.items():
        if m not in encoders:
            raise UserError(f"train.finetune.blocks names {m!r}, but the features have {', '.join(encoders)}")
        if int(k) < 1:
            raise UserError(f"train.finetune.blocks.{m} must be >= 1, got {k}")
        encoder = create_encoder(encoders[m]["encoder"], device="cpu")
        if not encoder.tunable:
            raise encoder._not_tunable()
    if p.epochs < 1 or p.patience < 1 or p.batch_size < 1 or p.encoder_lr <= 0:
        raise UserError("train.finetune.epochs, patience and batch_size must be >= 1 and encoder_lr > 0")
    for name in tuned:
        blocks, head = strategy_blocks(name, encoders, p)
        if not blocks:
            raise UserError(
                f"{name} would tune nothing: its head reads {', '.join(read_modalities(head))}, "
                f"train.finetune.blocks names {', '.join(p.blocks)}"
            )


class TunedModel(nn.Module):
    """The trainable encoder tops + a fusion head: cut activations (flattened) in, the head's output out.

    Rows marked missing (NaN, `presence.mark_missing`) go through the top as zeros and come out NaN again,
    so the head's NaN hook still sees them as missing, and no NaN reaches the tops' gradients."""

    def __init__(self, head: FusionHead, tops: dict[str, nn.Module], encoder_lr: float):
        super().__init__()
        self.head, self.tops, self.encoder_lr = head, nn.ModuleDict(tops), encoder_lr
        self.modalities, self.num_classes, self.name = head.modalities, head.num_classes, head.name

    def param_groups(self, lr: float) -> list[dict]:
        """For the loop's AdamW: the head at `lr`, the tops at `encoder_lr`."""
        return [{"params": list(self.head.parameters()), "lr": lr},
                {"params": list(self.tops.parameters()), "lr": self.encoder_lr}]  # fmt: skip

    def embed(self, m: str, x: Tensor) -> Tensor:
        if m not in self.tops:
            return x
        missing = torch.isnan(x).any(dim=1)
        if not missing.any():
            return self.tops[m](x)
        return self.tops[m](torch.nan_to_num(x, nan=0.0)).masked_fill(missing[:, None], float("nan"))

    def forward(self, x: dict[str, Tensor], present: Tensor | None = None):
        return self.head({m: self.embed(m, v) for m, v in x.items()}, present)


# --- the cut activations ---------------------------------------------------------------------


def _values_by_id(root: Path, column: str) -> dict[str, str]:
    """Every split manifest's (and augment's) value of `column` by row id."""
    from mmfusion.data.manifest import read_manifest

    sources = [root / paths.SPLIT / f"{s}.csv" for s in paths.SPLITS] + [root / paths.AUGMENTED / paths.MANIFEST]
    out: dict[str, str] = {}
    for path in sources:
        if path.exists():
            frame = read_manifest(path, required=("id",))
            if column in frame.columns:
                out.update(zip(frame["id"].astype(str), frame[column].fillna("").astype(str)))
    return out


class Activations:
    """Each tuned modality's cut encoder (pretrained, torch) and the cached activations below its top."""

    def __init__(self, params: Params, root: Path, encoders: dict[str, dict], blocks: dict[str, int], device: torch.device):
        from mmfusion.encoders import create_encoder
        from mmfusion.encoders.tuning import CutEncoder
        from mmfusion.features.cache import is_url, open_cache
        from mmfusion.features.extract import build_input
        from mmfusion.features.shards import cache_namespace
        from mmfusion.modalities import get_modality

        fp = params.featurize
        self.params, self.root = params, Path(root)
        cache_root = fp.cache_dir if is_url(fp.cache_dir) else str(self.root / fp.cache_dir)
        self.cuts, self.caches, self.sources, self.values = {}, {}, {}, {}
        for m, k in blocks.items():
            base = create_encoder(encoders[m]["encoder"], device=str(device), batch_size=fp.batch_size or None)
            cut = CutEncoder(base, k)
            self.cuts[m] = cut
            self.caches[m] = open_cache(cache_root, cache_namespace(cut), cut.dim, cut.describe(brief=True))
            self.sources[m] = build_input(m, root=self.root, **get_modality(m).settings_from_params(params))
            self.values[m] = _values_by_id(self.root, self.sources[m].column)

    @property
    def tops(self) -> dict[str, nn.Module]:
        """The pretrained tops above the cuts (`fit_tuned` trains copies)."""
        return {m: cut._top for m, cut in self.cuts.items()}

    def replace(self, data: FeatureSet, progress: str = "") -> FeatureSet:
        """`data` with each tuned modality's embeddings replaced by its cut activations (same rows)."""
        from mmfusion.features.extract import extract_features

        x = dict(data.x)
        for m, cut in self.cuts.items():
            present = data.presence([m])[:, 0].numpy()
            rows = np.flatnonzero(present)
            missing_ids = [data.ids[i] for i in rows if data.ids[i] not in self.values[m]]
            if missing_ids:
                raise UserError(f"fine-tuning: rows {missing_ids[:3]} are in features/ but not in the split manifests")
            values = [self.values[m][data.ids[i]] for i in rows]
            result = extract_features(cut, self.sources[m], values, self.caches[m], self.params.featurize.num_workers,
                                      progress=bool(progress))  # fmt: skip
            if result.failed:
                row, reason = next(iter(result.failed.items()))
                raise UserError(f"fine-tuning: {m} of row {data.ids[rows[row]]} could not be read again: {reason}")
            acts = torch.zeros((len(data), cut.dim), dtype=torch.float32)
            acts[torch.as_tensor(rows)] = torch.from_numpy(result.features)
            x[m] = acts
        return FeatureSet(x=x, y=data.y, ids=data.ids, present=data.present, groups=data.groups)


# --- training ---------------------------------------------------------------------------------


def fit_tuned(
    name: str, train: FeatureSet, val: FeatureSet, labels: list[str], encoders: dict[str, dict], params: Params,
    tops: dict[str, nn.Module], device: torch.device,
) -> tuple[TunedModel, TrainResult]:  # fmt: skip
    """Train strategy `name`'s head + copies of the pretrained `tops` of its tuned modalities on activation sets
    (`Activations.replace`)."""
    p, ft = params.train, params.train.finetune
    base = base_strategy(name)
    seed_everything(p.seed)  # the head starts as the frozen strategy's does
    head = create_head(base, dims={m: encoders[m]["dim"] for m in train.x}, num_classes=len(labels), **head_options(base, p))
    trained = {m: copy.deepcopy(tops[m]).requires_grad_(True) for m in tuned_modalities(name, head, ft)}
    model = TunedModel(head, trained, ft.encoder_lr).to(device)
    loop = replace(p, epochs=ft.epochs, patience=ft.patience, batch_size=ft.batch_size,
                   warmup_epochs=min(p.warmup_epochs, ft.epochs))  # fmt: skip
    return model, train_with_presence(model, head, train, val, loop, device)


def tuned_logits(model: TunedModel, data: FeatureSet) -> np.ndarray:
    """Held-out logits of a tuned model on an activation set (missing modalities as the data says)."""
    with presence_from_nan(model.head):
        return predict_logits(model, mark_missing(data))


def fit_tuned_fold(
    trial: tuple[str, int], data: FeatureSet, folds: list[np.ndarray], labels: list[str], encoders: dict[str, dict],
    blocks: dict[str, int], params: Params, root: str,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """One CV trial `(strategy, k)` of a tuned strategy (evaluate): tuned on every fold of `data` (activation rows)
    but fold k, early stopping on fold k; returns (its logits on fold k, best epoch). Module-level: it runs in pool
    workers (`blocks`: the modalities tuned in `data`; the strategy's head takes those it reads)."""
    name, k = trial
    device = _trial_device(params)
    with torch_threads(device, params.train.cpu_threads):
        held = folds[k]
        fit_rows = np.setdiff1d(np.arange(len(data)), held)
        tops = pretrained_tops(encoders, blocks, device)
        model, result = fit_tuned(name, data.subset(fit_rows), data.subset(held), labels, encoders, params, tops, device)
        log.info("cv %s fold %d/%d: best epoch %d of %d, %.1f s", name, k + 1, len(folds), result.best_epoch,
                 result.epochs_run, result.seconds)  # fmt: skip
        return tuned_logits(model, data.subset(held)), result.best_epoch


def fit_tuned_strategy(name: str, params: Params, root: Path, out_dir: Path, device: torch.device) -> dict:
    """The train stage's work for a tuned strategy: fit on train (early stopping on val), then write `out_dir`:
    the head, tuned/<modality>.safetensors, features/ (the tuned encoders' embeddings of every split, under
    featurize's runtime), config.json, history.json and curves.png. Returns its summary."""
    from mmfusion.features.store import load_meta
    from mmfusion.inference.checkpoint import save_checkpoint
    from mmfusion.features.build import build_features
    from mmfusion.training.data import load_training_data
    from mmfusion.training.plots import plot_curves
    start = time.perf_counter()
    features = root / paths.FEATURES
    encoders = load_meta(features).get("modalities", {})
    train, val, labels = load_training_data(features, params.train.use_augmented)
    blocks, _ = strategy_blocks(name, encoders, params.train.finetune)
    acts = Activations(params, root, encoders, blocks, device)
    train_a, val_a = acts.replace(train, "train"), acts.replace(val, "val")
    seconds_acts = time.perf_counter() - start
    model, result = fit_tuned(name, train_a, val_a, labels, encoders, params, acts.tops, device)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TUNED_DIR).mkdir(exist_ok=True)
    files = {}
    for m, top in model.tops.items():
        files[m] = out_dir / TUNED_DIR / f"{m}.safetensors"
        save_file(top.encoder_state(), str(files[m]), metadata={"encoder": encoders[m]["encoder"], "blocks": str(blocks[m])})
    # the tuned encoders' features, made as featurize makes them (runtime, int8 calibration and guard, cache)
    t_features = time.perf_counter()
    local = replace(params, compute=replace(params.compute, engine="local"))
    build_features(local, root, out_dir / FEATURES_DIR, progress=True, tuned=files, augmented=params.train.use_augmented)
    tuned_meta = load_meta(out_dir / FEATURES_DIR)["modalities"]
    for m, path in files.items():
        tuned_meta[m]["tuned"] = {"file": f"{TUNED_DIR}/{path.name}", "blocks": blocks[m], "from": encoders[m]["fingerprint"]}
    config = {
        **model_config(model.head, labels, tuned_meta, params),
        "strategy": name,
        "best_epoch": result.best_epoch,
        "best_val_macro_f1": result.best_val_macro_f1,
        "parameters": sum(t.numel() for t in model.head.parameters()),
        "tuned_parameters": sum(t.numel() for t in model.tops.parameters()),
    }
    save_checkpoint(out_dir, model.head, config)
    (out_dir / "history.json").write_text(json.dumps(result.history, indent=1) + "\n")
    plot_curves(result.history, out_dir / "curves.png", title=name)
    runtimes = {m: tuned_meta[m]["runtime"]["name"] for m in files}
    log.info(
        "train %-16s best epoch %2d/%2d  val macro-F1 %.4f  %.1fs (activations %.1fs, tuned features %.1fs, %s)",
        name, result.best_epoch, result.epochs_run, result.best_val_macro_f1, time.perf_counter() - start,
        seconds_acts, time.perf_counter() - t_features, runtimes,
    )  # fmt: skip
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_macro_f1": round(result.best_val_macro_f1, 4),
        "seconds": round(time.perf_counter() - start, 2),
        "seconds_per_epoch": round(result.seconds / max(result.epochs_run, 1), 2),
        "parameters": config["parameters"],
        "tuned": {m: {"blocks": blocks[m], "runtime": runtimes[m]} for m in files},
        "tuned_parameters": config["tuned_parameters"],
    }


def fit_tuned_from_files(name: str, params: Params, root: str) -> dict:
    """`fit_tuned_strategy` as one training trial (as `strategies.fit_strategy_from_files`): reads `root`, writes
    `root`/models/strategies/<name>/ under train.cpu_threads; returns the summary only."""
    device = _trial_device(params)
    with torch_threads(device, params.train.cpu_threads):
        return fit_tuned_strategy(name, params, Path(root), Path(root) / paths.STRATEGIES / name, device)


def _trial_device(params: Params) -> torch.device:
    """The device a training trial runs on, here or on a cluster worker (train.device)."""
    from mmfusion.compute import worker_device
    from mmfusion.devices import resolve_device

    return resolve_device(worker_device(params.train.device))


def strategy_features(strategy_dir: Path | None, root: Path) -> Path:
    """The features a model reads: a strategy folder's own (tuned strategies), else the project's features/
    (other strategies, and models with no folder of their own: bags, ensembles)."""
    own = Path(strategy_dir) / FEATURES_DIR if strategy_dir is not None else None
    return own if own is not None and own.is_dir() else Path(root) / paths.FEATURES

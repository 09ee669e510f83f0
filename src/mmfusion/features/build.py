"""What the featurize stage does, as a function: every split's rows encoded with each configured encoder, through
the content-addressed cache, into a features folder (`build_features`). The stage (mmfusion.stages.featurize)
writes the project's features/ with it; a tuned strategy (mmfusion.training.finetune) its own, with its tuned
encoders.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmfusion import paths
from mmfusion.compute import check_compute
from mmfusion.config import FeaturizeParams, Params
from mmfusion.data.manifest import read_manifest
from mmfusion.encoders import create_encoder, encoder_modality
from mmfusion.encoders.runtime import apply_featurize_runtime, check_featurize_runtime
from mmfusion.features.cache import is_url, open_cache
from mmfusion.features.extract import build_input, extract_features
from mmfusion.features.shards import (
    ClusterEncoder,
    EncoderSpec,
    ShardsFailedError,
    absolute,
    cache_namespace,
    describe_on_cluster,
)
from mmfusion.features.store import save_features
from mmfusion.modalities import get_modality
from mmfusion.paths import fresh_dir, write_json
from mmfusion.errors import UserError

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("id", "label", "group")
AUGMENTED_INDEX_COLUMNS = INDEX_COLUMNS + ("source_id", "view")
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
BAD_INPUT_POLICIES = ("skip", "fail")


def check_params(p: FeaturizeParams) -> None:
    """Fail before any work on a param that cannot run (unknown encoder, dtype, policy, modality mismatch)."""
    if not p.encoders:
        raise UserError("featurize.encoders is empty: configure at least one modality -> encoder")
    if p.storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"featurize.storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {p.storage_dtype!r}")
    if p.on_bad_input not in BAD_INPUT_POLICIES:
        raise UserError(f"featurize.on_bad_input must be one of {', '.join(BAD_INPUT_POLICIES)}, got {p.on_bad_input!r}")
    if p.batch_size < 0 or p.num_workers < -1 or p.cpu_threads < 0:
        raise UserError("featurize.batch_size and cpu_threads must be >= 0, num_workers >= -1 (auto)")
    for modality, name in p.encoders.items():
        produced = encoder_modality(name)  # unknown name -> ValueError listing the available ones
        if produced != modality:
            raise UserError(f"featurize.encoders.{modality}: encoder {name!r} makes {produced!r} features, not {modality!r}")
    check_featurize_runtime(p)


def read_splits(root: Path) -> dict[str, pd.DataFrame]:
    """The samples to encode: data/split/{train,val,test}.csv and data/augmented/manifest.csv (if any)."""
    frames = {s: read_manifest(root / paths.SPLIT / f"{s}.csv", required=INDEX_COLUMNS) for s in paths.SPLITS}
    augmented = root / paths.AUGMENTED / paths.MANIFEST
    if augmented.exists():
        frames["augmented"] = read_manifest(augmented, required=AUGMENTED_INDEX_COLUMNS)
    return frames


def presence_column(modality: str) -> str:
    """The index column saying which rows have `modality` (1) and which are missing it (0)."""
    return f"has_{modality}"


def encode_modality(
    modality: str, name: str, allrows: pd.DataFrame, params: Params, root: Path, cache_root: str, progress: bool,
    tuned: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[int, str], dict[str, Any], dict[str, Any]]:
    """One modality over every row: (embeddings [N, dim], presence [N], failed rows, encoder description, stats).

    A row whose value is empty is missing this modality: it is not encoded, its embedding row is
    zeros and its presence is False. A row whose value cannot be read is `failed` (dropped later).
    `tuned`: fine-tuned top weights for the encoder (a tuned strategy's own features; always local).
    """
    p = params.featurize
    on_cluster = params.compute.engine != "local" and tuned is None
    # On a cluster the driver never encodes: its encoder only hashes, counts truncations and sets the runtime.
    encoder = create_encoder(name, device="cpu" if on_cluster else p.device, batch_size=p.batch_size or None)
    if tuned is not None:
        encoder.load_tuned(tuned)
    inputs = {"root": root, **get_modality(modality).settings_from_params(params)}
    source = build_input(modality, **inputs)
    encoder.check_input_settings(inputs)
    if source.column not in allrows.columns:
        raise UserError(f"featurize: modality {modality!r} needs a {source.column!r} column in the split manifests")
    values = allrows[source.column].fillna("").astype(str).tolist()
    train_values = allrows.loc[allrows["_split"] == "train", source.column]  # int8 calibration: training inputs
    calibration = lambda: [v for v in train_values.fillna("").astype(str).tolist() if v.strip()]  # noqa: E731
    apply_featurize_runtime(encoder, p, modality, root, calibration, source.content)
    cluster = None
    if on_cluster:  # the workers say how they encode: namespace, meta entry, device, batch
        spec = EncoderSpec(
            modality, name, p.device, p.batch_size, encoder.describe()["runtime"], p.onnx_threads or p.cpu_threads,
            absolute(p.onnx_cache_dir, root), p.cpu_threads, p.num_workers,
            cache_root if is_url(cache_root) else str(Path(cache_root).resolve()),
            {**inputs, "root": root.resolve()},
        )  # fmt: skip
        worker = describe_on_cluster(spec, params.compute)
        namespace, describe, brief = worker["namespace"], worker["describe"], worker["brief"]
        cluster = ClusterEncoder(spec, params.compute, worker["batch_size"])
    else:
        namespace, describe, brief = cache_namespace(encoder), encoder.describe(), encoder.describe(brief=True)
    cache = open_cache(cache_root, namespace, encoder.dim, brief)
    present = np.array([source.present(v) for v in values], dtype=bool)
    rows = np.flatnonzero(present)
    try:
        result = extract_features(
            encoder, source, [values[i] for i in rows], cache, p.num_workers, progress, encode_misses=cluster
        )
    except ShardsFailedError as exc:  # positions among the present rows -> rows of allrows
        exc.rows = [[int(rows[i]) for i in held] for held in exc.rows]
        raise
    features = np.zeros((len(values), encoder.dim), dtype=np.float32)
    features[rows] = result.features
    failed = {int(rows[i]): reason for i, reason in result.failed.items()}
    stats = {**result.stats, "missing": int((~present).sum())}
    if cluster is not None:
        stats.update(device=worker["device"], batch_size=worker["batch_size"], **cluster.stats())
    s = stats
    log.info(
        "featurize %s (%s): %d samples, %d unique, %d cache hits, %d encoded, %d failed, %d truncated, "
        "%d missing, %.1f s, %.1f samples/s (%s encoded/s on %s, batch %d)",
        modality, name, s["samples"], s["unique"], s["cache_hits"], s["encoded"], s["failed"], s["truncated"],
        s["missing"], s["seconds"], s["samples_per_s"] or 0.0, s["encoded_per_s"], s["device"], s["batch_size"],
    )  # fmt: skip
    return features, present, failed, describe, stats


def report_failed(allrows: pd.DataFrame, failed: dict[int, list[str]], policy: str) -> list[dict]:
    """The rows that could not be read, as report entries; an error under `on_bad_input: fail`."""
    dropped = [
        {"split": allrows.at[row, "_split"], "id": allrows.at[row, "id"], "reason": "; ".join(reasons)}
        for row, reasons in sorted(failed.items())
    ]
    if dropped:
        listing = ", ".join(f"{d['split']}/{d['id']} ({d['reason']})" for d in dropped[:5])
        more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        if policy == "fail":
            raise UserError(
                f"featurize: {len(dropped)} sample(s) could not be read: {listing}{more}; "
                "every other sample is cached, so a rerun after fixing them is quick (or set featurize.on_bad_input: skip)"
            )
        log.warning("featurize: dropped %d sample(s) that could not be read: %s%s", len(dropped), listing, more)
    return dropped


class FeaturizeShardsError(RuntimeError):
    """Shards failed on the cluster; `shards` lists each with its modality, error and rows (split, id)."""

    def __init__(self, message: str, shards: list[dict[str, Any]]):
        super().__init__(message)
        self.shards = shards


def raise_shard_failures(allrows: pd.DataFrame, failures: list[ShardsFailedError]) -> None:
    """One error naming every failed shard with the rows it held; the cache keeps every other shard."""
    shards = [
        {"modality": exc.modality, "shard": shard.index, "error": f"{type(error).__name__}: {error}",
         "rows": [f"{allrows.at[r, '_split']}/{allrows.at[r, 'id']}" for r in held]}
        for exc in failures for (shard, error), held in zip(exc.failed, exc.rows)
    ]  # fmt: skip
    for s in shards:
        log.error("featurize: %s shard %d failed (%s) holding %d rows: %s", s["modality"], s["shard"], s["error"],
                  len(s["rows"]), ", ".join(s["rows"]))  # fmt: skip
    listing = "; ".join(
        f"{s['modality']} shard {s['shard']} ({len(s['rows'])} rows: {', '.join(s['rows'][:5])}"
        f"{' ...' if len(s['rows']) > 5 else ''}) {s['error']}"
        for s in shards
    )
    raise FeaturizeShardsError(
        f"featurize: {len(shards)} shard(s) failed on the cluster: {listing}; every other shard is cached, "
        "so a rerun encodes only these rows",
        shards,
    )


def build_features(
    params: Params, root: Path, out_dir: Path, progress: bool = True, tuned: dict[str, Path] | None = None,
    augmented: bool = True,
) -> dict:
    """The work of `run`: read the split manifests under `root`, encode (through the cache), write `out_dir`.

    `tuned` ({modality: weights file}): encoders with fine-tuned tops (mmfusion.training.finetune), encoded here;
    `augmented=False` leaves augment's views out."""
    p = params.featurize
    check_params(p)
    check_compute(params.compute)
    if p.cpu_threads:
        torch.set_num_threads(p.cpu_threads)
    frames = read_splits(root)
    if not augmented:
        frames.pop("augmented", None)
    # a folder (relative to the project root) or an fsspec URL
    cache_root = p.cache_dir if is_url(p.cache_dir) else str(root / p.cache_dir)  # root / an absolute path = it
    # Every split in one pass per encoder: one DataLoader, and duplicates across splits are encoded once.
    allrows = pd.concat([f.assign(_split=s) for s, f in frames.items()], ignore_index=True)

    arrays: dict[str, np.ndarray] = {}
    presence: dict[str, np.ndarray] = {}
    modalities: dict[str, dict[str, Any]] = {}
    encoder_stats: dict[str, dict[str, Any]] = {}
    failed: dict[int, list[str]] = {}
    shard_failures: list[ShardsFailedError] = []
    for modality, name in p.encoders.items():
        try:
            arrays[modality], presence[modality], bad, modalities[modality], encoder_stats[modality] = encode_modality(
                modality, name, allrows, params, root, cache_root, progress, (tuned or {}).get(modality)
            )
        except ShardsFailedError as exc:  # the other modalities still fill the cache
            shard_failures.append(exc)
            continue
        for row, reason in bad.items():
            failed.setdefault(row, []).append(f"{modality}: {reason}")
    if shard_failures:
        raise_shard_failures(allrows, shard_failures)
    none_present = np.flatnonzero(~np.any(np.stack(list(presence.values())), axis=0))
    for row in none_present:  # clean keeps no such row; an augmented view or a hand-edited split could
        failed.setdefault(int(row), []).append("no modality present")
    dropped = report_failed(allrows, failed, p.on_bad_input)

    out = fresh_dir(out_dir)
    keep = np.ones(len(allrows), dtype=bool)
    keep[list(failed)] = False
    dtype = STORAGE_DTYPES[p.storage_dtype]
    counts = {}
    for m, has in presence.items():
        allrows[presence_column(m)] = has.astype(int)
    for split in frames:
        mask = (allrows["_split"] == split).to_numpy() & keep
        columns = AUGMENTED_INDEX_COLUMNS if split == "augmented" else INDEX_COLUMNS
        index = allrows.loc[mask, list(columns) + [presence_column(m) for m in presence]].reset_index(drop=True)
        save_features(out, split, {m: a[mask].astype(dtype) for m, a in arrays.items()}, index)
        counts[split] = int(mask.sum())
    meta = {
        "modalities": modalities,
        "storage_dtype": p.storage_dtype,
        "splits": counts,
        "missing": {m: int((~has & keep).sum()) for m, has in presence.items()},
        "dropped": dropped,
    }
    # meta.json last: its presence means features/ is complete.
    write_json(out / "meta.json", meta)
    return {
        "splits": counts,
        "dropped": len(dropped),
        "missing": meta["missing"],
        "encoders": encoder_stats,
        "cache_dir": cache_root,
    }

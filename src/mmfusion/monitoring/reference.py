"""The model's reference: what it was validated on, in the shape drift monitoring compares windows with.

`models/best/reference/` is written by `evaluate` next to the winner's weights, so the BentoML model
carries it and a served model and its reference can never disagree:

    rows.parquet            one row per reference sample: id, split, label (truth), prediction,
                            confidence, present_<modality>, and the input statistics the service logs
                            (text_chars, image_width, image_height)
    embeddings.safetensors  {modality: float32 [N, dim]}: the cached features (the same encoders and
                            preprocessing the service runs), zero rows where a modality is missing
    reference.json          model version, splits, row count
    previews.parquet        id, modality, format, data: each item's small preview per modality (the spec's
                            `preview` of the loaded manifest value), shown beside the window items that drifted

The predictions come from `Predictor.predict_embeddings`, the service's own code path after encoding.
The same frame layout (`MonitorData`) holds a window of the inference log (`monitoring/windows.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from mmfusion.data.manifest import read_manifest
from mmfusion.features.store import load_features
from mmfusion.modalities import ModalitySpec, recorded_settings, specs_for, stats_of
from mmfusion.tables import read_parquet

log = logging.getLogger(__name__)

REFERENCE_DIR = "reference"
ROWS = "rows.parquet"
EMBEDDINGS = "embeddings.safetensors"
META = "reference.json"
PREVIEWS = "previews.parquet"

class MonitorError(Exception):
    """Monitoring cannot run on what it was given (no log, no reference, unknown version): one clear line."""


@dataclass
class MonitorData:
    """Rows (prediction, confidence, presence, input stats) and aligned per-modality embeddings."""

    rows: pd.DataFrame
    embeddings: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def modalities(self) -> list[str]:
        return list(self.embeddings)

    def present(self, modality: str) -> np.ndarray:
        col = f"present_{modality}"
        if col in self.rows:
            return self.rows[col].to_numpy(dtype=bool)
        return np.zeros(len(self.rows), dtype=bool)

    def take(self, idx: np.ndarray) -> MonitorData:
        idx = np.asarray(idx, dtype=np.int64)
        return MonitorData(self.rows.iloc[idx].reset_index(drop=True), {m: a[idx] for m, a in self.embeddings.items()})


def _input_stats(manifest: pd.DataFrame, root: Path, present: dict[str, np.ndarray]) -> pd.DataFrame:
    """The input statistics the service logs (each modality's `stats`), measured on the raw reference inputs."""
    stats = pd.DataFrame(index=manifest.index)
    for m, spec in specs_for([m for m in present if stats_of(m)], root).items():
        values = manifest[spec.column].fillna("").astype(str) if spec.column in manifest else pd.Series("", index=manifest.index)
        measured = [spec.measure(v) if ok and v else {} for v, ok in zip(values, present[m])]
        for col in spec.stats:
            stats[col] = [row.get(col, np.nan) for row in measured]
    return stats


def _presence(index: pd.DataFrame, arr: np.ndarray, modality: str) -> np.ndarray:
    """Which rows carry `modality`: the features index's has_<m> column where featurize wrote one, else non-zero rows."""
    for col in (f"has_{modality}", f"present_{modality}"):
        if col in index:
            return index[col].astype(str).str.lower().isin(("1", "true", "1.0")).to_numpy()
    return np.any(arr != 0, axis=1)


def _previews(manifest: pd.DataFrame, present: dict[str, np.ndarray], specs: dict[str, ModalitySpec]) -> list[dict]:
    """Rows of previews.parquet for one split: the preview of every present value of each modality whose spec has one
    (a value that no longer loads has none: the report says so)."""
    rows = []
    for m, spec in specs.items():
        if type(spec).preview is ModalitySpec.preview or spec.column not in manifest:
            continue  # no preview: nothing to load
        for rid, raw, ok in zip(manifest["id"].astype(str), manifest[spec.column], present[m]):
            if not ok or not spec.present(raw):
                continue
            try:
                got = spec.preview(spec.load(str(raw)))
            except Exception as exc:  # noqa: BLE001  (one unreadable file must not fail evaluate)
                log.warning("reference: no %s preview of %s: %s", m, rid, exc)
                continue
            if got is not None:
                rows.append({"id": rid, "modality": m, "format": got[0], "data": got[1]})
    return rows


def build_reference(model_dir: Path, features_dir: Path, split_dir: Path, splits: tuple[str, ...], root: Path,
                    previews: Mapping[str, float] | None = None) -> dict:  # fmt: skip
    """Write `model_dir/reference/` from the cached features of `splits`; returns its summary.

    `previews` is package.log.previews: a modality whose share is 0 there gets no reference previews either (the
    reference travels inside the BentoML model and the Bento, so switching previews off keeps the training data's
    pictures out of them too).

    Presence per modality: the features index's `has_<modality>` column, else an all-zero
    embedding row means "missing" (the featurize/Predictor convention).
    """
    from mmfusion.inference.predictor import Predictor  # torch: the monitor, which only reads a reference, never loads it
    from mmfusion.inference.checkpoint import load_checkpoint, model_version, read_temperature

    model_dir = Path(model_dir)
    head, config = load_checkpoint(model_dir)
    version = model_version(model_dir, config)
    predictor = Predictor(head, config, encoders={}, temperature=read_temperature(model_dir), version=version)
    modalities = list(predictor.modalities)
    frames, embs, kept = [], {m: [] for m in modalities}, []
    specs = specs_for(modalities, root, recorded_settings(config))
    shown = {m: s for m, s in specs.items() if float((previews or {}).get(m, 1.0)) > 0}
    for split in splits:
        arrays, index = load_features(features_dir, split)
        missing = [m for m in modalities if m not in arrays]
        if missing:
            raise MonitorError(f"features/{split} has no {missing} embeddings, which the model needs")
        present = {m: _presence(index, arrays[m], m) for m in modalities}
        results = predictor.predict_embeddings({m: arrays[m] for m in modalities}, present)
        manifest_path = Path(split_dir) / f"{split}.csv"
        manifest = read_manifest(manifest_path, required=("id",)) if manifest_path.exists() else pd.DataFrame(index=range(len(index)))
        manifest = manifest.set_index("id").reindex(index["id"]).reset_index() if "id" in manifest else manifest
        frame = pd.DataFrame(
            {
                "id": index["id"].astype(str),
                "split": split,
                "label": index["label"].astype(str),
                "prediction": [r["label"] for r in results],
                "confidence": [max(r["probabilities"].values()) for r in results],
            }
        )
        for m in modalities:
            frame[f"present_{m}"] = present[m]
        frame = pd.concat([frame, _input_stats(manifest, root, present).reset_index(drop=True)], axis=1)
        if "id" in manifest:
            kept += _previews(manifest, present, shown)
        frames.append(frame)
        for m in modalities:
            embs[m].append(np.where(present[m][:, None], arrays[m], 0).astype(np.float32))
    rows = pd.concat(frames, ignore_index=True)
    out = model_dir / REFERENCE_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(out / ROWS, index=False)
    save_file({m: np.ascontiguousarray(np.concatenate(a)) for m, a in embs.items()}, str(out / EMBEDDINGS))
    pd.DataFrame(kept, columns=["id", "modality", "format", "data"]).to_parquet(out / PREVIEWS, index=False)
    meta = {"model_version": version, "splits": list(splits), "rows": int(len(rows)), "modalities": modalities}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("reference: %d rows of %s for %s", len(rows), list(splits), version)
    return meta


def load_reference(model_dir: Path) -> tuple[MonitorData, dict]:
    """(reference data, reference.json) of a model folder; a clear MonitorError when it has none."""
    ref = Path(model_dir) / REFERENCE_DIR
    if not (ref / META).exists():
        raise MonitorError(
            f"model folder {model_dir} has no drift reference ({REFERENCE_DIR}/{META}): "
            "re-run `dvc repro evaluate` (and package) to write one"
        )
    meta = json.loads((ref / META).read_text())
    rows = read_parquet(ref / ROWS)
    embeddings = {m: a.astype(np.float32, copy=False) for m, a in load_file(str(ref / EMBEDDINGS)).items()}
    return MonitorData(rows, embeddings), meta


def read_reference_previews(model_dir: Path, ids: list[str]) -> dict[str, dict[str, tuple[str, bytes]]] | None:
    """{id: {modality: (MIME type, bytes)}} of reference items `ids`; None when the reference has no previews
    (written before they existed)."""
    path = Path(model_dir) / REFERENCE_DIR / PREVIEWS
    if not path.exists():
        return None
    df = read_parquet(path, filters=[("id", "in", sorted({str(i) for i in ids}) or [""])])
    out: dict[str, dict[str, tuple[str, bytes]]] = {}
    for rid, m, fmt, data in zip(df["id"], df["modality"], df["format"], df["data"]):
        out.setdefault(str(rid), {})[str(m)] = (str(fmt), bytes(data))
    return out

"""Cached features as tensors: what the train loop and evaluation iterate over."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmfusion.errors import UserError
from mmfusion.features.store import load_features


@dataclass
class FeatureSet:
    """One split's embeddings by modality (rows aligned), integer labels and sample ids."""

    x: dict[str, Tensor]
    y: Tensor
    ids: list[str]
    # [N, M] bool, columns in `x` order: which modality each row really has (None: all of them).
    # A missing modality's rows in `x` are zeros; only this mask says they are missing.
    present: Tensor | None = None
    groups: list[str] | None = None  # rows of one group stay in one cross-validation fold

    def presence(self, modalities: tuple[str, ...] | list[str] | None = None) -> Tensor:
        """The `[N, len(modalities)]` presence mask in the given column order (default: `x` order)."""
        order = list(self.x)
        modalities = list(modalities) if modalities is not None else order
        if self.present is None:
            return torch.ones(len(self), len(modalities), dtype=torch.bool)
        return self.present[:, [order.index(m) for m in modalities]]

    @property
    def complete(self) -> bool:
        """Every row has every modality."""
        return self.present is None or bool(self.present.all())

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(a.shape[1]) for m, a in self.x.items()}

    def concat(self, other: FeatureSet) -> FeatureSet:
        if set(self.x) != set(other.x):
            raise ValueError(f"cannot join feature sets with modalities {sorted(self.x)} and {sorted(other.x)}")
        present = None
        if self.present is not None or other.present is not None:
            present = torch.cat([self.presence(), other.presence(list(self.x))])
        return FeatureSet(
            x={m: torch.cat([self.x[m], other.x[m]]) for m in self.x},
            y=torch.cat([self.y, other.y]),
            ids=self.ids + other.ids,
            present=present,
            groups=(self.groups or self.ids) + (other.groups or other.ids),
        )

    def subset(self, rows: np.ndarray | list[int]) -> FeatureSet:
        """The rows `rows` (indices), e.g. a cross-validation fold."""
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return FeatureSet(
            x={m: a[idx] for m, a in self.x.items()},
            y=self.y[idx],
            ids=[self.ids[i] for i in idx.tolist()],
            present=self.present[idx] if self.present is not None else None,
            groups=[(self.groups or self.ids)[i] for i in idx.tolist()],
        )


def load_split(features_dir: Path, split: str, labels: list[str]) -> FeatureSet:
    """One split of features/ with labels mapped to indices of `labels` (an unknown label is an error)."""
    arrays, index = load_features(Path(features_dir), split)
    to_idx = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(index["label"]) - set(to_idx))
    if unknown:
        raise UserError(f"split {split!r} has labels not seen in training: {unknown[:5]}")
    y = torch.as_tensor(index["label"].map(to_idx).to_numpy(dtype=np.int64))
    present = None
    columns = [f"has_{m}" for m in arrays]  # written by featurize; absent in older features/ (all present)
    if all(c in index.columns for c in columns):
        present = torch.as_tensor(index[columns].astype(int).to_numpy() > 0)
    x = {m: torch.from_numpy(np.ascontiguousarray(a)) for m, a in arrays.items()}
    groups = list(index["group"]) if "group" in index.columns else list(index["id"])
    return FeatureSet(x=x, y=y, ids=list(index["id"]), present=present, groups=groups)


def training_labels(features_dir: Path) -> list[str]:
    """The label map: the sorted labels of the train split (index = class id)."""
    _, index = load_features(Path(features_dir), "train")
    return sorted(set(index["label"]))


def load_training_data(features_dir: Path, use_augmented: bool = True) -> tuple[FeatureSet, FeatureSet, list[str]]:
    """(train [+ augmented views], val, labels) from a features/ folder."""
    labels = training_labels(features_dir)
    train = load_split(features_dir, "train", labels)
    if use_augmented and (Path(features_dir) / "augmented.safetensors").exists():
        augmented = load_split(features_dir, "augmented", labels)
        if len(augmented):
            train = train.concat(augmented)
    return train, load_split(features_dir, "val", labels), labels
